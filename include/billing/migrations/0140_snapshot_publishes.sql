-- Each publish of the invoice snapshot that changed it (billing.transform.publish_snapshot),
-- in order. The Stripe push names the publish it pushed from, so an asset-triggered
-- reconciliation can tell a snapshot that is merely ahead of Stripe (a later nightly
-- published, its push has not run yet) from a real disagreement.
CREATE TABLE billing.snapshot_publishes (
    seq           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    published_at  timestamptz NOT NULL DEFAULT now(),
    rows_changed  bigint NOT NULL CHECK (rows_changed > 0)
);
