-- Dunning: one row per (Stripe invoice, stage) makes every notice go out exactly once,
-- plus each org's service level (mirrored to Redis for backend services) and its audit.

CREATE TABLE billing.dunning_notices (
    notice_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stripe_invoice_id  text NOT NULL,
    org_id             text NOT NULL,
    stage              text NOT NULL,
    days_past_due      integer NOT NULL,   -- the stage threshold that applied
    days_overdue       integer NOT NULL,   -- the invoice's age when the row was written
    as_of              date NOT NULL,      -- run day that claimed (or skipped) it
    -- claimed: reserved before the send; a re-run resends it with the same message_id.
    -- sent | failed (retried next run) | skipped (a later stage was current)
    -- | cancelled (invoice paid/void/uncollectible, or a later stage superseded a failure)
    status             text NOT NULL
                       CHECK (status IN ('claimed', 'sent', 'failed', 'skipped', 'cancelled')),
    recipient          text,
    message_id         text,
    currency           char(3),
    amount_due_cents   bigint,
    attempts           integer NOT NULL DEFAULT 0,
    failures           integer NOT NULL DEFAULT 0,
    error              text,
    claimed_at         timestamptz NOT NULL DEFAULT now(),
    sent_at            timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stripe_invoice_id, stage),
    CHECK (status <> 'sent' OR (message_id IS NOT NULL AND sent_at IS NOT NULL)),
    CHECK (status NOT IN ('claimed', 'failed') OR message_id IS NOT NULL)
);

CREATE INDEX dunning_notices_open_idx ON billing.dunning_notices (stripe_invoice_id)
    WHERE status IN ('claimed', 'failed');
CREATE INDEX dunning_notices_org_idx ON billing.dunning_notices (org_id, as_of);

CREATE TABLE billing.org_service_levels (
    org_id         text PRIMARY KEY,
    service_level  text NOT NULL CHECK (service_level IN ('normal', 'degraded')),
    as_of          date NOT NULL,  -- run day of the last change; older runs never override it
    reason         text NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE billing.service_level_changes (
    change_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id             text NOT NULL,
    from_level         text NOT NULL,
    to_level           text NOT NULL CHECK (to_level IN ('normal', 'degraded')),
    as_of              date NOT NULL,
    reason             text NOT NULL,
    stripe_invoice_id  text,
    actor              text NOT NULL,
    changed_at         timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX service_level_changes_org_idx ON billing.service_level_changes (org_id, changed_at);
