"""The platform every flow stands on: settings, connections, PostgreSQL, ClickHouse, SMTP,
user errors, the time vocabulary and text for people.

* ``settings``: every ``BILLING_*`` setting, read in one place.
* ``connections``: outside systems from Airflow connections (``AIRFLOW_CONN_*``).
* ``db``: PostgreSQL sessions with timeouts, safe retries, migrations (``billing/migrations``).
* ``analytics``: the analytics store (chDB locally, a ClickHouse server in production) and
  analysts' read-only SQL.
* ``mailer``: outgoing email through ``billing_smtp``.
* ``errors``: the errors a user can cause (one line, non-zero exit).
* ``dates``: arrival day, run end, period, month end and the period pattern.
* ``tables``: aligned tables and money as people read them.
* ``csvfile``: CSV files people write (imports), every problem one line.
"""
