-- Subscriptions over time (docs/SUBSCRIPTIONS.md) and catalog versions with effective dates.
--
-- billing.subscriptions: an org's plan history as non-overlapping intervals
-- [starts_at, ends_at) in UTC, at whole UTC days (proration is by day). ends_at null: open.
-- starts_at '-infinity': since always (an org's first plan from `billing orgs import`).
-- Rows are never overwritten in place by the tools: a change closes one interval and opens
-- another, and billing.subscription_changes records every edit with who made it and when.

CREATE TABLE billing.subscriptions (
    subscription_id bigserial PRIMARY KEY,
    org_id          text NOT NULL REFERENCES billing.organizations (org_id),
    plan            text NOT NULL,
    starts_at       timestamptz NOT NULL,
    ends_at         timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    created_by      text NOT NULL,
    CHECK (ends_at IS NULL OR ends_at > starts_at),
    CHECK (starts_at = '-infinity' OR starts_at = date_trunc('day', starts_at, 'UTC')),
    CHECK (ends_at IS NULL OR ends_at = date_trunc('day', ends_at, 'UTC'))
);
CREATE INDEX subscriptions_org ON billing.subscriptions (org_id, starts_at);

-- No two intervals of one org overlap: checked under a lock on the org's row, so two
-- concurrent edits of one org serialise (no btree_gist extension needed).
CREATE FUNCTION billing.subscriptions_no_overlap() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM billing.organizations WHERE org_id = NEW.org_id FOR UPDATE;
    IF EXISTS (
        SELECT 1 FROM billing.subscriptions s
         WHERE s.org_id = NEW.org_id
           AND s.subscription_id <> NEW.subscription_id
           AND tstzrange(s.starts_at, s.ends_at) && tstzrange(NEW.starts_at, NEW.ends_at)
    ) THEN
        RAISE EXCEPTION 'subscription of org % from % overlaps another of its subscriptions',
            NEW.org_id, NEW.starts_at USING ERRCODE = 'exclusion_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER subscriptions_no_overlap
    BEFORE INSERT OR UPDATE ON billing.subscriptions
    FOR EACH ROW EXECUTE FUNCTION billing.subscriptions_no_overlap();

-- Every edit of billing.subscriptions: append-only.
CREATE TABLE billing.subscription_changes (
    change_id   bigserial PRIMARY KEY,
    org_id      text NOT NULL,
    action      text NOT NULL,
    before      jsonb,
    after       jsonb,
    changed_by  text NOT NULL,
    source      text NOT NULL,
    reason      text,
    changed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscription_changes_org ON billing.subscription_changes (org_id, change_id);

-- The actor an edit is recorded under: the session setting billing.actor (the CLI sets
-- "cli:<user>", a DAG "airflow:<user>"), else the database role.
CREATE FUNCTION billing.actor() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('billing.actor', true), ''), 'db:' || current_user)
$$;

-- A new org starts on the plan it is created with (organizations.plan: its first plan),
-- since always; later plans are subscriptions of their own (`billing subscriptions`).
CREATE FUNCTION billing.organizations_first_subscription() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO billing.subscriptions (org_id, plan, starts_at, created_by)
    VALUES (NEW.org_id, NEW.plan, '-infinity', billing.actor());
    INSERT INTO billing.subscription_changes (org_id, action, after, changed_by, source)
    VALUES (NEW.org_id, 'create',
            jsonb_build_object('plan', NEW.plan, 'starts_at', '-infinity', 'ends_at', null),
            billing.actor(), 'orgs');
    RETURN NULL;
END $$;

CREATE TRIGGER organizations_first_subscription
    AFTER INSERT ON billing.organizations
    FOR EACH ROW EXECUTE FUNCTION billing.organizations_first_subscription();

COMMENT ON COLUMN billing.organizations.plan IS
    'The plan the org was created on; its plans over time are billing.subscriptions';

-- Every org's current plan becomes its first subscription, since always.
INSERT INTO billing.subscriptions (org_id, plan, starts_at, created_by)
SELECT org_id, plan, '-infinity', 'migration 0150' FROM billing.organizations;
INSERT INTO billing.subscription_changes (org_id, action, after, changed_by, source)
SELECT org_id, 'create',
       jsonb_build_object('plan', plan, 'starts_at', '-infinity', 'ends_at', null),
       'migration 0150', 'migration'
  FROM billing.organizations;

-- Catalog versions in force over time: an activation makes a version the catalog from
-- effective_from (a UTC day; '-infinity': since always) until the next activation's date.
-- Append-only; of two activations from one date the later one wins. billing.pricing.catalog_sync
-- never activates a version from a day inside a closed period (billing.period_closes).
CREATE TABLE billing.catalog_activations (
    activation_id   bigserial PRIMARY KEY,
    catalog_version text NOT NULL REFERENCES billing.catalog_versions ON DELETE CASCADE,
    effective_from  date NOT NULL,
    activated_at    timestamptz NOT NULL DEFAULT now()
);
INSERT INTO billing.catalog_activations (catalog_version, effective_from)
SELECT catalog_version, '-infinity' FROM billing.catalog_versions WHERE is_current;
