"""Development tools: the local stack and everything that drives the pipeline on a laptop or in CI.

Never imported by the product (``include/billing``, the DAGs, the plugins): a test enforces
it, and the production wheel leaves this package out. It is its own distribution
(``dev/pyproject.toml``), installed by ``make setup``, and adds its commands to ``billing``
through the ``billing.commands`` entry point group.

* ``stack/``: the embedded services (PostgreSQL, Redis, the Stripe emulator, the SMTP sink)
  and a real ``airflow api-server`` for tests.
* ``cli``: ``billing stack|generate-usage|run-day|demo|simulate|airflow|monitoring``.
* ``runner``: ``billing run-day`` (billing_nightly through ``airflow dags test``).
* ``demo``: ``billing demo``, the pipeline end to end with a summary.
* ``simulate``: a month of nightly runs under faults, checked to the cent.
* ``faults``: the fault-injecting HTTP proxy in front of Stripe.
* ``usage_gen``: deterministic synthetic usage files.
* ``monitoring``: a local Prometheus with the alert rules.
"""
