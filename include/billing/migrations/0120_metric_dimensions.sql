-- Dimensions (docs/PRICING.md "Dimensions"): a metric can be priced per combination of
-- values of some event properties. catalog_metrics.dimensions names the properties (in
-- order); a plan's price rows carry price_key: '' for the metric's default price, else the
-- JSON array text of the values it is listed for (billing.pricing.aggregation.dimension_key).
-- Every row written before is a default price, so prices stay as they were.
ALTER TABLE billing.catalog_metrics
    ADD COLUMN dimensions text[] NOT NULL DEFAULT '{}';

ALTER TABLE billing.catalog_plan_tiers
    DROP CONSTRAINT catalog_plan_tiers_catalog_version_plan_metric_fkey,
    DROP CONSTRAINT catalog_plan_tiers_pkey,
    ADD COLUMN price_key text NOT NULL DEFAULT '';

ALTER TABLE billing.catalog_plan_metrics
    DROP CONSTRAINT catalog_plan_metrics_pkey,
    ADD COLUMN price_key text NOT NULL DEFAULT '',
    ADD PRIMARY KEY (catalog_version, plan, metric, price_key);

ALTER TABLE billing.catalog_plan_tiers
    ADD PRIMARY KEY (catalog_version, plan, metric, price_key, tier_index),
    ADD FOREIGN KEY (catalog_version, plan, metric, price_key)
        REFERENCES billing.catalog_plan_metrics ON DELETE CASCADE;
