-- Minimum spend (docs/PRICING.md "Minimum spend and commitment"): a metric's min_spend and a
-- plan's minimum_commitment, in minor units of the plan currency (exact: the catalog refuses
-- amounts finer than the currency). NULL for none, so prices stay as they were.
ALTER TABLE billing.catalog_plan_metrics
    ADD COLUMN min_spend_cents bigint CHECK (min_spend_cents >= 0);

ALTER TABLE billing.catalog_plans
    ADD COLUMN minimum_commitment_cents bigint CHECK (minimum_commitment_cents >= 0);
