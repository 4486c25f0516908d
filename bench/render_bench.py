"""/metrics render time against prometheus_client's plain `generate_latest` of the same series.

    python bench/render_bench.py [--sizes 100,1000,10000] [--repeats 15]

For each size N the real server (under gunicorn) receives one answered call on each of N leg
label sets (N/2 extensions x inbound/outbound), so /metrics shows N active-call, N started and
N ended series, the histograms, and the webhook counters in the workers' multiprocess files.
Then, in this process and with the server stopped:
- the exporter's side is a GET /metrics through its own Falcon app (`create_app(build_deps(...))`
  on the same store file and the same multiprocess directory): the store snapshot, the expiry
  check that precedes every scrape, the merge of the worker files and the text encoding;
- the baseline is a plain single-process CollectorRegistry holding the same series (same names,
  help, labels and values, checked sample by sample) in Counter, Gauge and Histogram objects,
  rendered by `prometheus_client.generate_latest`.
The two are timed alternately and the medians compared.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import falcon.testing
from benchkit import (
    BenchError,
    Server,
    median,
    post_bodies,
    webhook,
    write_config,
)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from exporter.app import create_app
from exporter.config import load_config
from exporter.startup import build_deps

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class RenderResult:
    label_sets: int
    samples: int  # sample lines in the output
    bytes: int
    exporter_ms: float  # median GET /metrics in-process
    baseline_ms: float  # median generate_latest of the plain registry
    http_ms: float  # median GET /metrics over HTTP from the running server (for reference)
    repeats: int

    @property
    def ratio(self) -> float:
        return self.exporter_ms / self.baseline_ms if self.baseline_ms else math.inf


def fill_bodies(label_sets: int) -> tuple[list[bytes], list[bytes]]:
    """Start and end events for one answered call on each leg label set."""
    starts, ends = [], []
    for index in range(label_sets):
        extension = str(10000 + index // 2)
        direction = "In" if index % 2 == 0 else "Out"
        call_id = f"render-{index}"
        starts.append(webhook(f"on{direction}CallingStart", extension, call_id))
        ends.append(webhook(f"on{direction}CallingEnd", extension, call_id, 30 + index % 300))
    return starts, ends


def samples_of(text: str) -> dict[SampleKey, float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def plain_registry(text: str) -> CollectorRegistry:
    """The series of an exposition, held in plain prometheus_client metric objects."""
    registry = CollectorRegistry()
    for family in text_string_to_metric_families(text):
        # A family without samples keeps a dummy label, so that it shows no sample either.
        first = family.samples[0].labels if family.samples else {"name": ""}
        names = [name for name in first if name != "le"]
        if family.type == "counter":
            counter = Counter(family.name, family.documentation, names, registry=registry)
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    (counter.labels(**sample.labels) if names else counter).inc(sample.value)
        elif family.type == "gauge":
            gauge = Gauge(family.name, family.documentation, names, registry=registry)
            for sample in family.samples:
                (gauge.labels(**sample.labels) if names else gauge).set(sample.value)
        elif family.type == "histogram":
            _plain_histogram(registry, family.name, family.documentation, names, family.samples)
        else:
            raise BenchError(f"no plain equivalent for {family.type} {family.name}")
    return registry


def _plain_histogram(
    registry: CollectorRegistry,
    name: str,
    documentation: str,
    names: list[str],
    samples: Sequence[Sample],
) -> None:
    buckets: dict[tuple[str, ...], list[tuple[float, float]]] = {}
    sums: dict[tuple[str, ...], float] = {}
    for sample in samples:
        key = tuple(sample.labels[n] for n in names)
        if sample.name.endswith("_bucket"):
            buckets.setdefault(key, []).append((float(sample.labels["le"]), sample.value))
        elif sample.name.endswith("_sum"):
            sums[key] = sample.value
    bounds = sorted({le for series in buckets.values() for le, _ in series})
    histogram = Histogram(name, documentation, names, registry=registry, buckets=bounds)
    finite = [b for b in bounds if not math.isinf(b)]
    for key, series in buckets.items():
        child = histogram.labels(*key)
        previous = 0.0
        for le, cumulative in sorted(series):
            value = le if not math.isinf(le) else (finite[-1] * 2 if finite else 1.0)
            for _ in range(round(cumulative - previous)):
                child.observe(value)
            previous = cumulative
        child._sum.set(sums.get(key, 0.0))  # the same sum as the exporter's, not the bounds'


def check_single_process() -> None:
    """The baseline must be prometheus_client's plain mode: no multiprocess directory here."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        raise BenchError("unset PROMETHEUS_MULTIPROC_DIR: the baseline is single-process")


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return (time.perf_counter() - start) * 1000


def measure_one(
    label_sets: int, repeats: int, workdir: Path, workers: int, log: Callable[[str], None]
) -> RenderResult:
    directory = workdir / f"render-{label_sets}"
    config_path = write_config(directory, "render", max_extensions=max(1000, label_sets))
    multiprocess_dir = directory / "multiprocess"
    multiprocess_dir.mkdir(parents=True, exist_ok=True)
    server = Server.exporter(
        f"render-{label_sets}",
        config_path,
        workers,
        workdir,
        env={"PROMETHEUS_MULTIPROC_DIR": str(multiprocess_dir)},
    )
    starts, ends = fill_bodies(label_sets)
    with server:
        failed = post_bodies(server.url + "/webhook", starts)
        failed += post_bodies(server.url + "/webhook", ends)
        if failed:
            raise BenchError(f"{failed} of the render bench's events were refused")
        http_times = [timed(lambda: _get(server.url + "/metrics")) for _ in range(repeats)]
    log(f"  render {label_sets}: store filled, {len(starts) + len(ends)} events")

    config = load_config(config_path)
    client = falcon.testing.TestClient(
        create_app(build_deps(config, multiprocess_dir=str(multiprocess_dir)))
    )
    text = client.simulate_get("/metrics").text
    registry = plain_registry(text)
    baseline_text = generate_latest(registry).decode()
    ours, theirs = samples_of(text), samples_of(baseline_text)
    if ours.keys() != theirs.keys() or any(
        not math.isclose(ours[key], theirs[key], rel_tol=1e-9) for key in ours
    ):
        raise BenchError("the plain registry does not hold the same series as /metrics")

    exporter_times: list[float] = []
    baseline_times: list[float] = []
    for index in range(repeats):
        pair = [
            (exporter_times, lambda: client.simulate_get("/metrics")),
            (baseline_times, lambda: generate_latest(registry)),
        ]
        for times, action in pair if index % 2 == 0 else reversed(pair):
            times.append(timed(action))
    return RenderResult(
        label_sets=label_sets,
        samples=len(ours),
        bytes=len(text.encode()),
        exporter_ms=median(exporter_times),
        baseline_ms=median(baseline_times),
        http_ms=median(http_times),
        repeats=repeats,
    )


def _get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as response:
        body: bytes = response.read()
        return body


def main() -> None:
    parser = argparse.ArgumentParser(description="/metrics render time against plain rendering")
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    check_single_process()
    with tempfile.TemporaryDirectory(prefix="mcn-bench-render-") as workdir:
        for size in (int(s) for s in args.sizes.split(",")):
            result = measure_one(size, args.repeats, Path(workdir), args.workers, print)
            print(
                f"{size:>6} label sets, {result.samples} samples: exporter "
                f"{result.exporter_ms:.2f} ms, plain {result.baseline_ms:.2f} ms, "
                f"ratio {result.ratio:.2f} (HTTP GET {result.http_ms:.2f} ms)"
            )


if __name__ == "__main__":
    main()
