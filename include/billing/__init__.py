"""Billing data platform: usage ingest, pricing, Stripe sync, reconciliation, dunning.

The package reads like the playbook: one module per flow. The CLI, the DAGs and the
Airflow plugin are thin shells over these functions.
"""
