-- Each publish of the invoice snapshot that changed it (billing.transform.publish_snapshot),
-- in order, with the periods whose invoices it changed. The Stripe push names the publish it
-- pushed from, so an asset-triggered reconciliation can tell a period whose snapshot is
-- merely ahead of Stripe (a later run re-priced it, its push has not run yet) from a real
-- disagreement.
CREATE TABLE billing.snapshot_publishes (
    seq           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    published_at  timestamptz NOT NULL DEFAULT now(),
    rows_changed  bigint NOT NULL CHECK (rows_changed > 0),
    periods       date[] NOT NULL  -- the billing periods whose invoices it changed
);
