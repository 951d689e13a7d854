"""The development commands of ``billing``: the local stack and what drives it.

Registered through the ``billing.commands`` entry point group (``dev/pyproject.toml``), so
they appear in ``billing --help`` wherever this package is installed and nowhere else.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess

from billing.cli import _day, _positive, _ratio

COMMANDS = ("stack", "generate-usage", "run-day", "demo", "simulate", "airflow", "monitoring")


def before(args) -> None:
    """Point every command but ``billing stack`` at the local stack, unless connections are
    configured already."""
    if args.command != "stack":
        from billing_dev.stack.manager import activate

        activate()


def register(sub) -> None:
    """Add the development commands to ``billing``'s subparsers."""
    s = sub.add_parser(
        "stack",
        help="start/stop/inspect the embedded local services; destroy = stop + delete their data",
    )
    s.add_argument("action", choices=["up", "down", "status", "destroy"])
    s.add_argument("--format", choices=["table", "json"], default="table")
    s.add_argument(
        "--show-secrets", action="store_true", help="status: print passwords in URIs unmasked"
    )
    s.add_argument(
        "--executor",
        choices=["local", "celery"],
        default="local",
        help="up: celery adds the distributed mode (scheduler, api-server, dag-processor, "
        "Celery workers, metadata DB on PostgreSQL)",
    )
    s.add_argument("--workers", type=_positive, default=2, help="up --executor celery: workers")
    s.set_defaults(func=cmd_stack)

    g = sub.add_parser("generate-usage", help="write synthetic usage files into the landing zone")
    g.add_argument("--day", type=_day, required=True)
    g.add_argument("--orgs", type=_positive, required=True)
    g.add_argument("--events", type=_positive, required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--bad-ratio", type=_ratio, default=0.0, help="share of malformed/invalid lines")
    g.add_argument("--dup-ratio", type=_ratio, default=0.0, help="share of repeated lines")
    g.add_argument(
        "--late-ratio", type=_ratio, default=0.0, help="share of events from earlier days"
    )
    g.add_argument("--files", type=_positive, default=1)
    g.add_argument("--gzip", action="store_true")
    g.set_defaults(func=cmd_generate_usage)

    r = sub.add_parser(
        "run-day",
        help="billing_nightly for one arrival day (logical date D) without a scheduler; "
        "refused while D runs or a scheduler is up",
    )
    r.add_argument("day", type=_day)
    r.add_argument("--dag", default="billing_nightly", choices=["billing_nightly"])
    r.set_defaults(func=cmd_run_day)

    d = sub.add_parser("demo", help="stack up, demo orgs, one day of usage, run-day, summary")
    d.add_argument("--day", type=_day, default=dt.date(2026, 11, 2))
    d.add_argument("--orgs", type=_positive, default=8)
    d.add_argument("--events", type=_positive, default=20_000)
    d.add_argument("--seed", type=int, default=42)
    d.set_defaults(func=cmd_demo)

    sim = sub.add_parser(
        "simulate", help="a month of nightly runs under faults on a private stack, then invariants"
    )
    sim.add_argument("--days", type=_positive, default=35)
    sim.add_argument("--orgs", type=_positive, default=5)
    sim.add_argument("--events-per-day", type=_positive, default=2000)
    sim.add_argument("--seed", type=int, default=7)
    sim.add_argument("--start", type=_day, default=None, help="first day (default: near month end)")
    sim.add_argument("--faults", choices=("none", "stripe", "all"), default="all")
    sim.add_argument("--stack-dir", default=None, help="private stack (default .local/simulate)")
    sim.add_argument("--keep-stack", action="store_true", help="leave the stack running")
    sim.add_argument("--dunning-step", type=_positive, default=None)
    sim.add_argument("--no-dag", action="store_true", help="skip the real-DAG day")
    sim.add_argument("--report", default=None, help="also write the JSON report here")
    sim.add_argument("--json", action="store_true", help="print the JSON report only")
    sim.add_argument("--verbose", action="store_true", help="keep the steps' INFO logs")
    sim.set_defaults(func=cmd_simulate)

    a = sub.add_parser("airflow", help="run the Airflow UI (standalone) against the local stack")
    a.set_defaults(func=cmd_airflow)

    mo = sub.add_parser(
        "monitoring", help="Prometheus with the billing alert rules, scraping `billing airflow`"
    )
    mo.add_argument("action", choices=("up", "down", "status"))
    mo.add_argument("--format", choices=("table", "json"), default="table")
    mo.set_defaults(func=cmd_monitoring)


# ---------------------------------------------------------------- commands
def cmd_stack(args) -> int:
    from billing_dev.stack.manager import current

    stack = current()
    if args.action == "up":
        result = stack.up()
        _print_status(stack.status(), result)
        if args.executor == "celery":
            from billing_dev.stack.celery import CeleryCluster

            cluster = CeleryCluster(stack, workers=args.workers)
            started = cluster.up()
            for name, info in cluster.status().items():
                print(f"{name:<14} {info['state']:<8} {started.get(name, '')}")
            print(f"\nAirflow (CeleryExecutor): {cluster.base_url}  login: admin / password in "
                  f"{cluster.home / 'passwords.json'}")  # fmt: skip
        print(f"\nshell env: source {stack.root / 'stack.env'}")
    elif args.action in ("down", "destroy"):
        for name, state in (stack.down() if args.action == "down" else stack.destroy()).items():
            print(f"{name:<10} {state}")
    else:
        status = stack.status(show_secrets=args.show_secrets)
        if args.format == "json":
            print(json.dumps(status, indent=2))
        else:
            _print_status(status)
    return 0


def _print_status(status: dict, result: dict | None = None) -> None:
    for name, info in status.items():  # URIs come masked unless --show-secrets
        note = f"  ({result[name]})" if result and name in result else ""
        uri = info.get("uri") or ""
        print(f"{name:<10} {info['state']:<8} {uri}{note}")


def cmd_generate_usage(args) -> int:
    from billing import pricing
    from billing.platform import settings
    from billing_dev import usage_gen

    spec = usage_gen.UsageSpec(
        args.day, args.orgs, args.events, args.seed, args.bad_ratio, args.dup_ratio, args.late_ratio
    )
    metrics = sorted(pricing.load_catalog().metrics)
    for uri in usage_gen.write_day(spec, metrics, settings.landing_uri(), args.files, args.gzip):
        print(uri)
    return 0


def cmd_run_day(args) -> int:
    from billing_dev import runner

    return runner.run_day(args.day, dag_id=args.dag)


def cmd_demo(args) -> int:
    from billing_dev import demo

    return demo.run(args.day, orgs=args.orgs, events=args.events, seed=args.seed)


def cmd_simulate(args) -> int:
    from billing_dev import simulate

    return simulate.main(args)


def cmd_airflow(args) -> int:
    from billing.platform import settings
    from billing_dev.stack.manager import current

    stack = current()
    if not stack.state_file.exists():
        stack.up()
    env = {**os.environ, **stack.env()}
    # `airflow standalone` starts its api-server with [api] workers.
    env.setdefault("AIRFLOW__API__WORKERS", str(settings.api_workers()))
    port = stack.load_state()["ports"]["airflow"]
    print(
        f"Airflow UI: http://127.0.0.1:{port}  login: admin / password in "
        f"{stack.airflow_home / 'passwords.json'}  (Ctrl-C to stop)",
        flush=True,
    )
    pidfile = stack.run_dir / "airflow.pid"
    proc = subprocess.Popen(["airflow", "standalone"], env=env)
    pidfile.write_text(f"{proc.pid}\n")
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()
    finally:
        pidfile.unlink(missing_ok=True)


def cmd_monitoring(args) -> int:
    from billing_dev import monitoring
    from billing_dev.stack.manager import current

    stack = current()
    if args.action == "up":
        s = monitoring.up(stack)
        verb = "started" if s["started"] else "running (token and config refreshed)"
        print(f"Prometheus {verb}: {s['url']}  scraping http://{s['target']}/billing/metrics")
    elif args.action == "down":
        print("prometheus: " + ("stopped" if monitoring.down(stack) else "not running"))
    else:
        s = monitoring.status(stack)
        print(json.dumps(s, indent=2) if args.format == "json" else monitoring.format_status(s))
    return 0
