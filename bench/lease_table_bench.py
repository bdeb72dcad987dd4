"""Lease table benchmark: what a tracked lease costs, in memory, per scrape, and when the table is full.

In one process, on the gateway's own parts (the heartbeat core as the driver
feeds it, with answers shaped like the API's, and the metrics registry the
admin port serves), side by side at a small and a large table:

- bytes per tracked lease (tracemalloc, everything a lease's row holds);
  the collector runs with `serve`'s thresholds;
- CPU time of one `/metrics` rendering (`prometheus_client.generate_latest`)
  with N leases tracked, median of 20;
- with the table full (`max_tracked` = N), the cost of the heartbeat that
  brings a new lease in (so evicts): the slowest and the 99th percentile of
  2,000 such `completed()` calls against the median of ordinary ones.

    .venv/bin/python bench/lease_table_bench.py --sizes 100 100000

Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
import tracemalloc

from prometheus_client import generate_latest

from gateway.cli import GC_THRESHOLDS
from gateway.config.load import load_settings
from gateway.config.settings import LeaseTrackingSettings
from gateway.heartbeat.actions import Send, Succeeded
from gateway.heartbeat.core import Coalescer
from gateway.heartbeat.lease import Beat
from gateway.heartbeat.sending import Reply
from gateway.heartbeat.wire import HeartbeatAnswer, read_answer
from gateway.observability.metrics import GatewayMetrics
from gateway.upstream.client import BufferedResponse

ENV_ID = "env_011CZkZ9X2dpNyB7HsEFoRfW"
CONFIG = f"""
environments: [{{id: {ENV_ID}, name: prod, key_env: K}}]
clients: {{tokens: [{{token_env: T}}]}}
"""
HEADERS = (
    ("Content-Type", "application/json"),
    ("request-id", "req_011CZkZ9X2dpNyB7HsEFoRfW"),
    ("Date", "Tue, 01 Dec 2026 00:00:00 GMT"),
    ("heartbeat-gateway-outcome", "forwarded"),
)
IDENTITY = ("Bearer sk-ant-api03-" + "x" * 80, "", "beta=true")
Core = Coalescer[Reply, str]


def claim(core: Core, n: int, now: float) -> float:
    """Lease `n` claimed through the core as the driver does it; the seconds `completed()` took."""
    key = (ENV_ID, f"work_{n:020d}")
    value = f"2026-12-01T00:00:00.{n:06d}Z"
    answer = {"type": "work_heartbeat", "last_heartbeat": value, "lease_extended": True, "state": "active"}
    body = json.dumps({**answer, "ttl_seconds": 300}).encode()
    (send,) = [a for a in core.submit(Beat(n, key, "NO_HEARTBEAT", IDENTITY), now) if isinstance(a, Send)]
    response = BufferedResponse(200, "OK", HEADERS, body)
    outcome = Succeeded(HeartbeatAnswer(value, "active", True, 300), Reply(response, read_answer(200, body)))
    started = time.process_time()
    core.completed(key, send.flight, outcome, now + 0.01)
    return time.process_time() - started


def measure(size: int) -> dict[str, object]:
    metrics = GatewayMetrics(load_settings(CONFIG, {"K": "key", "T": "token"}))
    core: Core = Coalescer(tracking=LeaseTrackingSettings(max_tracked=size))
    metrics.track_leases(core.table_counts)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    ordinary = [claim(core, n, n / 1000) for n in range(size)]
    gc.collect()
    per_lease = (tracemalloc.get_traced_memory()[0] - before) / size
    tracemalloc.stop()
    scrapes = []
    for _ in range(20):
        started = time.process_time()
        generate_latest(metrics.registry)
        scrapes.append(time.process_time() - started)
    # The table is full: every new lease evicts.
    evicting = sorted(claim(core, size + n, (size + n) / 1000) for n in range(2000))
    return {
        "leases": size,
        "bytes_per_lease": round(per_lease),
        "scrape_cpu_ms_median": round(statistics.median(scrapes) * 1000, 3),
        "scrape_cpu_ms_max": round(max(scrapes) * 1000, 3),
        "new_lease_cpu_us_median_when_not_full": round(statistics.median(ordinary) * 1e6, 1),
        "new_lease_cpu_us_p99_when_full": round(evicting[int(0.99 * len(evicting))] * 1e6, 1),
        "new_lease_cpu_ms_max_when_full": round(evicting[-1] * 1000, 3),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 100_000])
    arguments = parser.parse_args()
    # As `serve` runs: far fewer collections (a full one still walks every lease's objects).
    gc.set_threshold(*GC_THRESHOLDS)
    print(f"{platform.machine()}, Python {platform.python_version()}")
    for size in arguments.sizes:
        print(json.dumps(measure(size)))
