-- Prepaid credits (docs/SUBSCRIPTIONS.md#prepaid-credits): grants an operator gives an org,
-- and their applications to the org's invoices at the month close.
--
-- A grant's balance is its amount minus its applications. A grant is usable for period P
-- when it is not voided and expires_at is null (never) or at or after P's close (the first
-- instant after P): valid through P's last day. What an expired grant had left stays
-- visible as "expired"; a void takes only the unapplied remainder.

CREATE TABLE billing.credit_grants (
    grant_id      bigserial PRIMARY KEY,
    org_id        text NOT NULL REFERENCES billing.organizations (org_id),
    amount_cents  bigint NOT NULL CHECK (amount_cents > 0),
    currency      char(3) NOT NULL CHECK (currency = lower(currency)),
    expires_at    timestamptz,
    reason        text NOT NULL CHECK (reason <> ''),
    granted_by    text NOT NULL CHECK (granted_by <> ''),
    granted_at    timestamptz NOT NULL DEFAULT now(),
    voided_at     timestamptz,
    voided_by     text,
    void_reason   text,
    CHECK ((voided_at IS NULL) = (voided_by IS NULL))
);
CREATE INDEX credit_grants_org ON billing.credit_grants (org_id, grant_id);

-- One application per grant, org and invoice period: the close's claim. It is written in
-- the transaction that enqueues the Stripe credit item (outbox kind 'credit', key
-- outbox_key), so a re-run of the close (retry, clear, backfill) applies nothing twice.
CREATE TABLE billing.credit_applications (
    grant_id      bigint NOT NULL REFERENCES billing.credit_grants (grant_id),
    org_id        text NOT NULL REFERENCES billing.organizations (org_id),
    period        date NOT NULL CHECK (extract(day FROM period) = 1),
    amount_cents  bigint NOT NULL CHECK (amount_cents > 0),
    currency      char(3) NOT NULL,
    outbox_key    text NOT NULL UNIQUE,
    applied_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (grant_id, org_id, period)
);
CREATE INDEX credit_applications_org_period ON billing.credit_applications (org_id, period);

-- The Stripe credit item: a negative invoice item the period's finalize attaches.
ALTER TABLE billing.stripe_outbox DROP CONSTRAINT stripe_outbox_kind_check;
ALTER TABLE billing.stripe_outbox ADD CONSTRAINT stripe_outbox_kind_check
    CHECK (kind IN ('customer', 'usage_item', 'base_fee', 'credit', 'invoice', 'finalize'));
ALTER TABLE billing.stripe_outbox ADD CONSTRAINT stripe_outbox_credit_amount_check
    CHECK (kind <> 'credit' OR (amount_cents < 0 AND currency IS NOT NULL));
