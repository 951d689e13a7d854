-- Stripe sync: org -> customer mapping, the write outbox, and invoice status for dunning.
-- Every Stripe write is an outbox row before any HTTP call; the row's idempotency key is
-- also the SDK idempotency key and sits in the Stripe object's metadata.

CREATE TABLE billing.stripe_customers (
    org_id              text PRIMARY KEY,
    stripe_customer_id  text NOT NULL UNIQUE,
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE billing.stripe_outbox (
    outbox_id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- drain order
    idempotency_key   text NOT NULL UNIQUE,
    kind              text NOT NULL
                      CHECK (kind IN ('customer', 'usage_item', 'base_fee', 'invoice', 'finalize')),
    org_id            text NOT NULL,
    period            date NOT NULL CHECK (extract(day FROM period) = 1),
    day               date,
    metric            text,
    amount_cents      bigint,
    currency          char(3),
    payload           jsonb NOT NULL,
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'sent', 'parked', 'cancelled')),
    attempts          integer NOT NULL DEFAULT 0,
    retries           integer NOT NULL DEFAULT 0,
    error_counts      jsonb NOT NULL DEFAULT '{}'::jsonb,  -- error class -> count, for export
    last_error        text,
    last_error_class  text,
    stripe_object_id  text,
    is_adopted        boolean NOT NULL DEFAULT false,  -- found in Stripe by metadata, not re-sent
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    first_attempt_at  timestamptz,
    sent_at           timestamptz,
    parked_at         timestamptz,
    CHECK (kind NOT IN ('usage_item', 'base_fee') OR (amount_cents IS NOT NULL AND currency IS NOT NULL)),
    CHECK (status <> 'sent' OR stripe_object_id IS NOT NULL)
);

CREATE INDEX stripe_outbox_open_idx ON billing.stripe_outbox (outbox_id) WHERE status IN ('pending', 'parked');
CREATE INDEX stripe_outbox_org_period_idx ON billing.stripe_outbox (org_id, period, kind, metric);

CREATE TABLE billing.stripe_invoices (
    org_id                  text NOT NULL,
    period                  date NOT NULL CHECK (extract(day FROM period) = 1),
    stripe_invoice_id       text NOT NULL UNIQUE,
    status                  text NOT NULL,  -- draft | open | paid | uncollectible | void
    currency                char(3),
    amount_due_cents        bigint,
    amount_paid_cents       bigint,
    amount_remaining_cents  bigint,
    due_at                  timestamptz,
    finalized_at            timestamptz,
    created_at              timestamptz NOT NULL DEFAULT now(),
    synced_at               timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, period)
);
