"""The benchmark script runs and prints its table. Timings are printed, never asserted."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.server
def test_bench_smoke_run_prints_the_ratio_table() -> None:
    if not shutil.which("wrk"):
        pytest.skip("wrk is not installed (scripts/install-system-deps installs it)")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--quick",
            "--sections",
            "ingest,render",
            "--duration",
            "2",
            "--render-sizes",
            "100",
            "--output",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "| § | measurement | exporter | baseline | ratio | target | holds |" in lines
    assert any(line.startswith("| 1 | saturated ingest throughput") for line in lines)
    assert any(line.startswith("| 3 | /metrics render, 100 label sets") for line in lines)
    errors = next(line for line in lines if line.startswith("| 1 | errors / requests"))
    assert errors.split("|")[3].strip().startswith("0 /")
