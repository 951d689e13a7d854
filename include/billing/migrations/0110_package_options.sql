-- Pricing model v2 (docs/PRICING.md "Package options", "Tiered packages", "Maximum spend"):
-- package rounding (up | down) and free units, a tiered_package mode whose tiers are priced
-- in blocks, and a maximum spend on any priced metric. The defaults are today's prices:
-- rounding up, no free units, no cap, and no blocks on graduated / volume tiers.
ALTER TABLE billing.catalog_plan_metrics
    DROP CONSTRAINT catalog_plan_metrics_mode_check,
    ADD CONSTRAINT catalog_plan_metrics_mode_check
        CHECK (mode IN ('graduated', 'volume', 'package', 'tiered_package')),
    ADD COLUMN rounding text NOT NULL DEFAULT 'up' CHECK (rounding IN ('up', 'down')),
    ADD COLUMN free_units numeric NOT NULL DEFAULT 0 CHECK (free_units >= 0),
    ADD COLUMN max_spend numeric CHECK (max_spend >= 0),
    -- only the package modes take rounding and free units ((mode = 'package') = (package_size
    -- IS NOT NULL AND package_price IS NOT NULL) still holds: a tiered_package has neither)
    ADD CONSTRAINT catalog_plan_metrics_package_options_check
        CHECK (mode IN ('package', 'tiered_package') OR (rounding = 'up' AND free_units = 0));

-- A tiered_package tier counts its units in blocks of block_size at block_price each
-- (its unit_price and flat_amount are 0); graduated and volume tiers have no blocks.
ALTER TABLE billing.catalog_plan_tiers
    ADD COLUMN block_size numeric CHECK (block_size > 0),
    ADD COLUMN block_price numeric CHECK (block_price >= 0),
    ADD CONSTRAINT catalog_plan_tiers_block_check CHECK ((block_size IS NULL) = (block_price IS NULL));
