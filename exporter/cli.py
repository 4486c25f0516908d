"""The `mcn-exporter` command: serve, check-config, simulate."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime

from holidays import country_holidays

from exporter import __version__
from exporter.config import (
    EXAMPLE_SECRET,
    AccountConfig,
    Config,
    ConfigError,
    example_secret_accounts,
    load_config,
    locate_config,
)
from exporter.hours import Calendar

EXIT_CONFIG_ERROR = 2
EXIT_DIFFERENCES = 1  # simulate: events given up on, or /metrics not as the ground truth says
EXIT_CANNOT_RUN = 2  # simulate: the exporter cannot be reached or refuses the events as sent


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: int = args.run(args)
    return command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcn-exporter", description="Prometheus exporter for MCN Telecom call webhooks."
    )
    parser.add_argument("--version", action="version", version=f"mcn-exporter {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="receive webhooks and serve /metrics")
    serve.add_argument(
        "--config", help="config file (default: $MCN_EXPORTER_CONFIG, ./config.yaml)"
    )
    serve.add_argument("--bind", help="HOST:PORT to listen on (default: server.bind)")
    serve.add_argument("--workers", type=_positive_int, help="gunicorn workers (server.workers)")
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check-config", help="validate a config file; exit 0 or 2")
    check.add_argument("path", nargs="?", help="config file (default: as for serve)")
    check.add_argument(
        "--at",
        type=_iso_time,
        metavar="ISO-TIME",
        help="show the opening hours as at that time, e.g. 2026-12-24T10:00 (default: now); "
        "without an offset it is read in each account's time zone",
    )
    check.set_defaults(run=_check_config)

    simulate = commands.add_parser(
        "simulate",
        help="send realistic traffic; print the ground truth, or --verify /metrics against it",
    )
    simulate.add_argument(
        "--url",
        required=True,
        action="append",
        help="the webhook URL, e.g. http://host:9880/webhook; once per replica of a shared "
        "store: each event goes to one at random, a retry to the next",
    )
    simulate.add_argument(
        "--config", help="config with the accounts, secrets and extensions to use"
    )
    simulate.add_argument("--calls", type=_positive_int, default=200, help="calls to place (200)")
    simulate.add_argument("--rate", type=float, default=0.0, help="events per second (0: no limit)")
    simulate.add_argument("--seed", type=int, default=1, help="random seed (1)")
    simulate.add_argument(
        "--concurrency", type=_positive_int, default=16, help="calls at once (16)"
    )
    simulate.add_argument(
        "--missed-ratio", type=_ratio, default=0.1, help="share of inbound calls missed (0.1)"
    )
    simulate.add_argument(
        "--pace", type=float, default=0.2, help="longest ring or talk pause in seconds (0.2)"
    )
    simulate.add_argument(
        "--copies",
        type=_ratio,
        default=0.0,
        help="share of events also sent, at the same moment, to a second --url (0)",
    )
    simulate.add_argument(
        "--verify",
        action="store_true",
        help="read /metrics before and after; exit 1 unless it moved exactly by the ground truth",
    )
    simulate.add_argument(
        "--metrics-url", help="the /metrics to verify (default: /metrics on the --url host)"
    )
    simulate.add_argument(
        "--settle",
        type=_seconds,
        help="the exporter's callers.settle in seconds (default: the config's): call-backs "
        "wait that long after the missed call",
    )
    simulate.add_argument(
        "--line",
        type=_line,
        action="append",
        default=[],
        metavar="NAME=NUMBER",
        help="a company line of every account (default: the config's accounts[].lines)",
    )
    simulate.set_defaults(run=_simulate)
    return parser


def _serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG_ERROR
    from exporter.server import run

    return run(config, bind=args.bind, workers=args.workers)


def _check_config(args: argparse.Namespace) -> int:
    config = _load(args.path)
    if config is None:
        return EXIT_CONFIG_ERROR
    path = locate_config(args.path)
    on_example = set(example_secret_accounts(config))
    for index, account in enumerate(config.accounts.values()):
        if account.id in on_example:
            print(
                f"{path}: warning: accounts[{index}].secret: account {account.id} uses "
                f'"{EXAMPLE_SECRET}", the example secret of the provider\'s documentation: '
                "set your own in the portal and here",
                file=sys.stderr,
            )
    extensions = sum(len(numbers) for numbers in config.extensions.values())
    print(
        f"{path}: OK ({len(config.accounts)} account(s), {extensions} extension(s), "
        f"store {config.store.describe()})"
    )
    for account in config.accounts.values():
        if account.hours is not None:
            print(_opening_line(account, account.hours, args.at))
    return 0


def _opening_line(account: AccountConfig, calendar: Calendar, at: datetime | None) -> str:
    """`account 10123: open now, closes Mon 2026-11-30 12:00 CET, opens ...` as at `at`."""
    head = f"account {account.id}:"
    if calendar.always_open:
        return f"{head} always open (every hour of every day)"
    if at is None:
        instant = time.time()
    else:
        instant = (at if at.tzinfo else at.replace(tzinfo=calendar.timezone)).timestamp()
    is_open = calendar.is_open(instant)
    state = "open now" if is_open else f"closed now{_closed_because(calendar, instant)}"
    first, then = ("closes", "opens") if is_open else ("opens", "closes")
    change = calendar.next_change(instant)
    if change is None:
        return f"{head} {state}, no {'closing' if is_open else 'opening'} in the next two years"
    parts = [f"{head} {state}", f"{first} {_local_time(calendar, change)}"]
    following = calendar.next_change(change)
    if following is not None:
        parts.append(f"{then} {_local_time(calendar, following)}")
    return ", ".join(parts)


def _closed_because(calendar: Calendar, instant: float) -> str:
    """Why a closed account is closed, when it is the day itself: a holiday or a closed day."""
    day = datetime.fromtimestamp(instant, calendar.timezone).date()
    holidays = calendar.holidays
    if day in holidays.open:
        return ""  # an exceptional opening, outside its hours
    if holidays.country is not None and holidays.is_public_holiday(day):
        names = country_holidays(holidays.country, subdiv=holidays.subdivision, years=day.year)
        return f" (public holiday: {names.get(day)})"
    return " (closed day)" if day in holidays.closed else ""


def _local_time(calendar: Calendar, instant: float) -> str:
    return datetime.fromtimestamp(instant, calendar.timezone).strftime("%a %Y-%m-%d %H:%M %Z")


def _simulate(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG_ERROR
    from exporter.simulate import Options, SimulationError, simulate

    options = Options(
        url=args.url[0],
        other_urls=tuple(args.url[1:]),
        copies=args.copies,
        calls=args.calls,
        rate=args.rate,
        seed=args.seed,
        concurrency=args.concurrency,
        missed_ratio=args.missed_ratio,
        pace=args.pace,
        verify=args.verify,
        metrics_url=args.metrics_url,
        settle=config.callers.settle if args.settle is None else args.settle,
        lines={account: dict(args.line) for account in config.accounts} if args.line else {},
    )
    try:
        result = simulate(config, options)
    except SimulationError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
    if result["failed"]:
        print(f"simulate: {result['failed']} event(s) not delivered", file=sys.stderr)
    if args.verify:
        _report_differences(result["differences"])
    return EXIT_DIFFERENCES if result["failed"] or result.get("differences") else 0


def _report_differences(differences: list[str]) -> None:
    if not differences:
        print("verify: /metrics moved exactly as the ground truth says", file=sys.stderr)
        return
    print(
        f"verify: {len(differences)} difference(s) between how /metrics moved during the run "
        "and the ground truth:",
        file=sys.stderr,
    )
    for line in differences:
        print(f"  {line}", file=sys.stderr)


def _load(explicit: str | None) -> Config | None:
    """The config, or None once every error has been printed (each names the file)."""
    try:
        return load_config(locate_config(explicit))
    except ConfigError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return None


def _iso_time(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO time: {text!r} (e.g. 2026-12-24T10:00 or 2026-12-24T10:00+01:00)"
        ) from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError("must be a number of seconds, 0 or more")
    return value


def _line(text: str) -> tuple[str, str]:
    """NAME=NUMBER as (number, name), the way accounts[].lines maps them."""
    name, sep, number = text.rpartition("=")
    if not sep or not name or not any(c.isdigit() for c in number):
        raise argparse.ArgumentTypeError("must be NAME=NUMBER, e.g. 'Main line=0222202999'")
    return number, name


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value
