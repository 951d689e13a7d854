-- The nightly dbt run finds what arrived on its day (arrival_day) without scanning the
-- history. Events are appended in arrival order, so a BRIN index is tiny and nearly free
-- for ingest, yet lets Postgres read only the day's block ranges.
CREATE INDEX IF NOT EXISTS usage_events_arrival_day_brin
    ON billing.usage_events USING brin (arrival_day) WITH (pages_per_range = 16);
