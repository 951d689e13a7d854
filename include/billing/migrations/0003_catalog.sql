-- Pricing catalog reference tables, keyed by catalog version (billing.pricing.catalog_version).
-- Loaded by billing.catalog_sync.sync() before dbt runs; content-addressed, so a version's
-- rows never change once written. Exactly one version is current: the one dbt prices with.

CREATE TABLE billing.catalog_versions (
    catalog_version text PRIMARY KEY CHECK (catalog_version ~ '^[0-9a-f]{64}$'),
    is_current      boolean NOT NULL DEFAULT false,
    loaded_at       timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX catalog_versions_one_current ON billing.catalog_versions (is_current) WHERE is_current;

CREATE TABLE billing.catalog_metrics (
    catalog_version text NOT NULL REFERENCES billing.catalog_versions ON DELETE CASCADE,
    metric          text NOT NULL,
    unit            text NOT NULL,
    description     text NOT NULL,
    PRIMARY KEY (catalog_version, metric)
);

CREATE TABLE billing.catalog_plans (
    catalog_version text NOT NULL REFERENCES billing.catalog_versions ON DELETE CASCADE,
    plan            text NOT NULL,
    currency        text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    base_fee        numeric NOT NULL CHECK (base_fee >= 0),
    base_fee_cents  bigint NOT NULL CHECK (base_fee_cents >= 0),
    minor_exponent  smallint NOT NULL CHECK (minor_exponent BETWEEN 0 AND 4),
    PRIMARY KEY (catalog_version, plan)
);

CREATE TABLE billing.catalog_plan_metrics (
    catalog_version text NOT NULL,
    plan            text NOT NULL,
    metric          text NOT NULL,
    mode            text NOT NULL CHECK (mode IN ('graduated', 'volume', 'package')),
    package_size    numeric CHECK (package_size > 0),
    package_price   numeric CHECK (package_price >= 0),
    PRIMARY KEY (catalog_version, plan, metric),
    FOREIGN KEY (catalog_version, plan) REFERENCES billing.catalog_plans ON DELETE CASCADE,
    FOREIGN KEY (catalog_version, metric) REFERENCES billing.catalog_metrics ON DELETE CASCADE,
    CHECK ((mode = 'package') = (package_size IS NOT NULL AND package_price IS NOT NULL))
);

CREATE TABLE billing.catalog_plan_tiers (
    catalog_version text NOT NULL,
    plan            text NOT NULL,
    metric          text NOT NULL,
    tier_index      smallint NOT NULL CHECK (tier_index >= 0),
    lower_bound     numeric NOT NULL CHECK (lower_bound >= 0),
    up_to           numeric CHECK (up_to > lower_bound),
    unit_price      numeric NOT NULL CHECK (unit_price >= 0),
    PRIMARY KEY (catalog_version, plan, metric, tier_index),
    FOREIGN KEY (catalog_version, plan, metric) REFERENCES billing.catalog_plan_metrics ON DELETE CASCADE
);
