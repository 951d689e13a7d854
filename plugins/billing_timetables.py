"""Airflow plugin: registers billing_nightly's timetable so the scheduler, the API server and
``airflow dags test`` can (de)serialize it. The class lives in ``include/billing/orchestration/timetables.py``."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from billing.orchestration.timetables import ArrivalDayTimetable


class BillingTimetablesPlugin(AirflowPlugin):
    name = "billing_timetables"
    timetables = [ArrivalDayTimetable]
