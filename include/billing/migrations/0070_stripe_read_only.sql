-- Stripe outage (read-only) mode, durable: at most one row, present while the mode is on.
-- It used to be a Redis key only, so a FLUSHALL (or a Redis restart without persistence)
-- silently switched outage mode off and the next push hit a Stripe that was down.
-- Readers: billing.stripe_sync.mode (engine, `billing stripe read-only`, the Billing page,
-- billing_stripe_read_only). Switching off deletes the row.
CREATE TABLE billing.stripe_read_only (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    since       timestamptz NOT NULL DEFAULT now(),  -- first switched on (kept when re-set)
    reason      text NOT NULL DEFAULT '',
    updated_at  timestamptz NOT NULL DEFAULT now()
);
