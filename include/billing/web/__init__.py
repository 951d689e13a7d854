"""The web layer on Airflow's API server, mounted at ``/billing`` by ``plugins/billing_plugin.py``.

Playbook "Invoice PDFs" and the operators' views. Every route requires an authenticated
Airflow user with the ``Billing`` custom view (docs/BILLING_API.md).

* ``api``: the FastAPI app: invoice JSON and PDFs (ETag), metrics, the connection pool.
* ``page``: the Billing page and Admin → Health (templates and assets in ``assets/``).
* ``common``: what both share: the access check and the cached Stripe status.
"""
