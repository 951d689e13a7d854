-- The month close that cannot be missed (docs/MONTH_CLOSE.md). billing_nightly used to close
-- month M only in M's last arrival-day run, so a missed last day (catchup=False never
-- creates it) left M open for ever. Now every run records its arrival day, and closes each
-- month that is due (billing.stripe_sync.closing); a close is recorded once it is complete.

-- One row per arrival day billing_nightly took through ingest, snapshot and Stripe push
-- (written by its stripe_close_period task; a re-run keeps the first row).
CREATE TABLE billing.nightly_days (
    arrival_day  date PRIMARY KEY,
    run_id       text,
    done_at      timestamptz NOT NULL DEFAULT now()
);

-- One row per closed period: every org with items in it has a finalized Stripe invoice.
CREATE TABLE billing.period_closes (
    period         date PRIMARY KEY CHECK (extract(day FROM period) = 1),
    closed_on_day  date,          -- the arrival day whose run closed it (NULL: `billing stripe close-period`)
    missing_days   date[] NOT NULL DEFAULT '{}',  -- arrival days of the period not run by then
    invoices       integer NOT NULL CHECK (invoices >= 0),
    closed_at      timestamptz NOT NULL DEFAULT now()
);
