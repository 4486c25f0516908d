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
