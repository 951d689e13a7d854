-- How a metric's events become the quantity that is priced (docs/PRICING.md
-- "Aggregations"; billing.pricing.aggregation). 'sum' for every metric written before, so
-- prices stay as they were. property: the event property unique_count counts.
ALTER TABLE billing.catalog_metrics
    ADD COLUMN aggregation text NOT NULL DEFAULT 'sum'
        CHECK (aggregation IN ('sum', 'count', 'unique_count', 'max', 'latest', 'time_weighted')),
    ADD COLUMN property text,
    ADD CONSTRAINT catalog_metrics_property_for_unique_count
        CHECK ((aggregation = 'unique_count') = (property IS NOT NULL));
