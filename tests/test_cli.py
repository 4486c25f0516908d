"""The command line of SPEC §6: check-config, serve on the example config, refusal on errors."""

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
    "config error: accounts[0].secret: required (or secret_file)",
    "config error: accounts[1].id: must be a positive integer, not 'abc'",
    "config error: server.workers: must be an integer from 1 to 64, not 'lots'",
    "config error: logging.level: must be one of debug, info, warning, error",
]


def mcn_exporter(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def test_version() -> None:
    result = mcn_exporter("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"mcn-exporter {__version__}")


def test_check_config_accepts_the_example() -> None:
    result = mcn_exporter("check-config", str(ROOT / "config.example.yaml"))
    assert result.returncode == 0, result.stderr
    assert "OK (1 account(s), 2 extension(s)" in result.stdout


def test_check_config_prints_every_error_with_its_path_and_exits_2(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text(BROKEN)
    result = mcn_exporter("check-config", str(tmp_path / "broken.yaml"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == BROKEN_ERRORS


def test_check_config_reads_the_environment_variable_when_no_path_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken.yaml").write_text(BROKEN)
    monkeypatch.setenv("MCN_EXPORTER_CONFIG", str(tmp_path / "broken.yaml"))
    assert mcn_exporter("check-config").returncode == 2


def test_serve_refuses_a_broken_config_with_the_same_messages(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text(BROKEN)
    result = mcn_exporter("serve", "--config", str(tmp_path / "broken.yaml"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == BROKEN_ERRORS


def test_serve_with_no_config_anywhere_says_which_file_it_looked_for(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MCN_EXPORTER_CONFIG"}
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "serve"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "config.yaml: cannot read" in result.stderr


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
