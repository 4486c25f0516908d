"""The command line: check-config, serve on the example config, refusal on errors."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from exporter import __version__
from tests.conftest import ServerProcess, all_webhooks

ROOT = Path(__file__).parent.parent
BROKEN = """
server:
  workers: lots
accounts:
  - id: 10123
  - id: abc
    secret: x
logging:
  level: loud
"""
BROKEN_ERRORS = [
    "accounts[0].secret: required (or secret_file)",
    "accounts[1].id: must be a positive integer, not 'abc'",
    "server.workers: must be an integer from 1 to 64, not 'lots'",
    "logging.level: must be one of debug, info, warning, error, not 'loud'",
]
NO_CONFIG = [
    "no config file: none given, $MCN_EXPORTER_CONFIG is not set and there is no config.yaml in {}",
    "point at one with --config PATH or MCN_EXPORTER_CONFIG=PATH "
    "(config.example.yaml shows every key)",
]


def mcn_exporter(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The command, in an environment without the variables that choose its config or secret."""
    unset = ("MCN_EXPORTER_CONFIG", "MCN_WEBHOOK_SECRET")
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={
            **{k: v for k, v in os.environ.items() if k not in unset},
            "PYTHONPATH": str(ROOT),
        },
        check=False,
    )


def test_version() -> None:
    result = mcn_exporter("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"mcn-exporter {__version__}")


def test_check_config_accepts_the_example_and_warns_of_its_example_secret() -> None:
    path = ROOT / "config.example.yaml"
    result = mcn_exporter("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "OK (1 account(s), 2 extension(s)" in result.stdout
    assert result.stderr.splitlines() == [
        f'{path}: warning: accounts[0].secret: account 10123 uses "SecretToken", the example '
        "secret of the provider's documentation: set your own in the portal and here"
    ]


def test_check_config_with_an_own_secret_has_no_warning(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("accounts:\n  - id: 10123\n    secret: own\n")
    result = mcn_exporter("check-config", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("config.yaml: OK (1 account(s)")


def test_check_config_prints_every_error_with_its_file_and_path_and_exits_2(
    tmp_path: Path,
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    result = mcn_exporter("check-config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"{path}: {error}" for error in BROKEN_ERRORS]


def test_check_config_points_at_the_line_of_a_yaml_error(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("accounts:\n  - id: 1\n   secret: x\n")
    result = mcn_exporter("check-config", "config.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("config.yaml:3:4: not valid YAML: "), result.stderr
    assert "<unicode string>" not in result.stderr


def test_check_config_reads_the_environment_variable_when_no_path_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken.yaml").write_text(BROKEN)
    monkeypatch.setenv("MCN_EXPORTER_CONFIG", str(tmp_path / "broken.yaml"))
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"{tmp_path / 'broken.yaml'}: accounts[0].secret: required")


def test_serve_refuses_a_broken_config_with_the_same_messages(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    result = mcn_exporter("serve", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"{path}: {error}" for error in BROKEN_ERRORS]


@pytest.mark.parametrize("command", ["serve", "check-config", "simulate --url http://127.0.0.1:1/"])
def test_with_no_config_anywhere_it_says_where_it_looked_and_how_to_give_one(
    tmp_path: Path, command: str
) -> None:
    result = mcn_exporter(*command.split(), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        NO_CONFIG[0].format(tmp_path.resolve()),
        NO_CONFIG[1],
    ]


@pytest.mark.server
def test_serves_on_the_example_config_as_it_is(tmp_path: Path) -> None:
    shutil.copy(ROOT / "config.example.yaml", tmp_path / "config.yaml")
    # The example keeps its state in ./data, so it runs in a directory of its own.
    server = ServerProcess(tmp_path / "config.yaml", workers=2, cwd=tmp_path)
    server.start()
    try:
        for path in all_webhooks():
            status, body = server.post(path.read_bytes())
            assert status == 200, (path.name, body)
        assert (tmp_path / "data" / "mcn-exporter.sqlite3").exists()
        assert "uses the example secret" in server.log()
    finally:
        assert server.stop(signal.SIGTERM) == 0


HOURS_CONFIG = """
hours:
  timezone: Europe/Bratislava
  open:
    mon-fri: "08:00-12:00, 12:30-17:00"
    sat: "09:00-12:00"
  holidays:
    country: SK
    closed: ["2026-12-31"]
accounts:
  - id: 10123
    secret: own
  - id: 20456
    secret: other
    hours: {timezone: America/New_York, open: {sun-thu: "22:00-06:00"}}
  - id: 30789
    secret: third
    hours: {timezone: UTC, open: {mon-sun: "00:00-24:00"}}
"""


def check_hours_at(tmp_path: Path, at: str, config: str = HOURS_CONFIG) -> list[str]:
    """The calendar lines check-config prints as at `at` (after its OK line)."""
    (tmp_path / "config.yaml").write_text(config)
    result = mcn_exporter("check-config", "--at", at, cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    ok, *lines = result.stdout.splitlines()
    assert ok.startswith("config.yaml: OK (3 account(s)")
    return lines


def test_check_config_prints_when_each_account_opens_and_closes_next(tmp_path: Path) -> None:
    # A time without an offset is read in each account's own time zone.
    assert check_hours_at(tmp_path, "2026-11-30T09:15") == [
        "account 10123: open now, closes Mon 2026-11-30 12:00 CET, opens Mon 2026-11-30 12:30 CET",
        "account 20456: closed now, opens Mon 2026-11-30 22:00 EST, "
        "closes Tue 2026-12-01 06:00 EST",
        "account 30789: always open (every hour of every day)",
    ]


def test_check_config_names_the_public_holiday_it_is_closed_for(tmp_path: Path) -> None:
    lines = check_hours_at(tmp_path, "2026-12-24T10:00+01:00")
    assert lines[0] == (
        "account 10123: closed now (public holiday: Christmas Eve), "
        "opens Mon 2026-12-28 08:00 CET, closes Mon 2026-12-28 12:00 CET"
    )
    # 04:00 in New York: inside the night that started on Wednesday at 22:00.
    assert lines[1] == (
        "account 20456: open now, closes Thu 2026-12-24 06:00 EST, opens Thu 2026-12-24 22:00 EST"
    )


def test_check_config_says_a_configured_closed_day_is_one(tmp_path: Path) -> None:
    assert check_hours_at(tmp_path, "2026-12-31T09:00Z")[0] == (
        "account 10123: closed now (closed day), opens Sat 2027-01-02 09:00 CET, "
        "closes Sat 2027-01-02 12:00 CET"
    )


def test_check_config_shows_summer_time_before_the_autumn_change(tmp_path: Path) -> None:
    assert check_hours_at(tmp_path, "2026-10-23T16:30")[0] == (
        "account 10123: open now, closes Fri 2026-10-23 17:00 CEST, opens Sat 2026-10-24 09:00 CEST"
    )


def test_check_config_prints_no_calendar_for_accounts_without_hours(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(
        "accounts:\n  - id: 1\n    secret: a\n  - id: 2\n    secret: b\n"
        "    hours: {timezone: UTC, open: {mon: '08:00-09:00'}}\n"
    )
    result = mcn_exporter("check-config", "--at", "2026-11-30T08:30", cwd=tmp_path)
    assert result.stdout.splitlines()[1:] == [
        "account 2: open now, closes Mon 2026-11-30 09:00 UTC, opens Mon 2026-12-07 08:00 UTC"
    ]


def test_check_config_refuses_an_at_that_is_no_time(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(HOURS_CONFIG)
    result = mcn_exporter("check-config", "--at", "tomorrow", cwd=tmp_path)
    assert result.returncode == 2
    assert "argument --at: not an ISO time: 'tomorrow'" in result.stderr


def test_check_config_reports_hours_errors_by_key_path(tmp_path: Path) -> None:
    broken = HOURS_CONFIG.replace("Europe/Bratislava", "Europe/Atlantis").replace(
        "22:00-06:00", "late"
    )
    (tmp_path / "config.yaml").write_text(broken)
    result = mcn_exporter("check-config", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "config.yaml: hours.timezone: unknown time zone 'Europe/Atlantis' "
        "(an IANA name such as Europe/Bratislava)",
        "config.yaml: accounts[1].hours.open.sun-thu: bad range 'late': write HH:MM-HH:MM, "
        "e.g. 08:00-12:00",
    ]


def test_check_config_names_a_postgresql_store_without_its_password(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(
        "accounts:\n  - id: 10123\n    secret: own\n"
        "store:\n  url: postgresql://mcn:hunter2@db.example:5432/mcn\n"
    )
    result = mcn_exporter("check-config", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        "config.yaml: OK (1 account(s), 0 extension(s), "
        "store postgresql://mcn:****@db.example:5432/mcn)\n"
    )
