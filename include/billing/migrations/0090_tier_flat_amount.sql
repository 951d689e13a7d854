-- A flat amount per tier (Stripe's tiers[].flat_amount; docs/PRICING.md "Flat amount per
-- tier"): charged once when the month's quantity reaches into the tier. 0 for every tier
-- written before, so prices stay as they were.
ALTER TABLE billing.catalog_plan_tiers
    ADD COLUMN flat_amount numeric NOT NULL DEFAULT 0 CHECK (flat_amount >= 0);
