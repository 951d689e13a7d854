-- Foundation: organisations and the pricing catalog reference tables.
-- Money is integer minor units (bigint, *_cents) or exact numeric, never float.

CREATE TABLE billing.organizations (
    org_id      text PRIMARY KEY CHECK (org_id ~ '^[A-Za-z0-9_.-]{1,64}$'),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    email       text NOT NULL CHECK (email ~ '^[^@\s]+@[^@\s]+$'),
    plan        text NOT NULL,
    currency    char(3) NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
