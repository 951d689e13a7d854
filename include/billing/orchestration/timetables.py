"""billing_nightly's timetable: the logical date *is* the arrival day.

Airflow's ``CronDataIntervalTimetable`` gives a scheduled run for day D the logical date D,
but infers a manual run's interval as the day *before* its logical date, so the Trigger form
(and ``airflow dags test``) at logical date D+1 ran arrival day D, and the same day had two
logical dates. This one keeps the scheduled behaviour (run once D has ended, logical date D,
interval [D, D+1)) and makes every manual run work on the UTC day of its logical date, with
a run id that names that day. The convention itself lives in ``billing.orchestration``.

Registered by ``plugins/billing_timetables.py`` (Airflow serializes only known timetables).
Imported by the DAG file and the plugin only: importing Airflow reads its configuration.
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.timetables.base import DataInterval
from airflow.timetables.interval import CronDataIntervalTimetable

from billing.platform.dates import arrival_day, arrival_interval, arrival_run_id


class ArrivalDayTimetable(CronDataIntervalTimetable):
    """Daily after 00:00 UTC for the day that just ended; logical date = arrival day."""

    def __init__(self) -> None:
        super().__init__("0 0 * * *", timezone="UTC")
        self.description = (
            "Arrival day D runs once D has ended (after 00:00 UTC of D+1); "
            "logical date D, data interval [D, D+1) UTC, for scheduled, backfilled and "
            "triggered runs alike"
        )

    @property
    def summary(self) -> str:
        return "daily 00:00 UTC, logical date = arrival day"

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> ArrivalDayTimetable:
        return cls()

    def serialize(self) -> dict[str, Any]:
        return {}

    def infer_manual_data_interval(self, *, run_after) -> DataInterval:
        # Callers pass the run's logical date here (the Trigger form, `dags test`).
        start, end = arrival_interval(arrival_day(run_after))
        return DataInterval(pendulum.instance(start), pendulum.instance(end))

    def generate_run_id(self, *, run_type, run_after, data_interval, **extra) -> str:
        if data_interval is None:
            return super().generate_run_id(
                run_type=run_type, run_after=run_after, data_interval=None, **extra
            )
        return arrival_run_id(str(run_type), arrival_day(data_interval.start), run_after)
