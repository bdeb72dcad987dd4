"""Instructions per request, counted by callgrind: a figure the machine's noise does not move.

CPU time per request (`throughput_bench.py`) moves by ±20% from round to
round on a shared VM, as much as a change worth making. Instructions
retired in the proxy's own process, counted by `valgrind --tool=callgrind`,
are the same from run to run for the same code and requests, whatever else
the machine does, so two commits compare exactly. What they leave out: the
kernel's side of each syscall, and how fast each instruction runs (cache
misses, branch mispredictions); the throughput bench keeps measuring those.

Each target runs under callgrind; once the warm-up is done (start-up,
imports and first connections), the counts are zeroed, `--requests`
requests are sent one at a time on one keep-alive connection, and what was
counted since is dumped:

- `heartbeat`: a forwarded heartbeat, one of 1,000 leases in turn, as the
  throughput bench's closed loop sends them;
- `get`: a work-item retrieve, passed through.

Targets: `minimal` (`bench/minimal_proxy.py`) and its variants, `gateway`
(the README's minimal config) and `gateway@REV` (as committed at REV).
The fake API is nginx (`bench/rig.py`), outside valgrind.

    .venv/bin/python bench/instructions_bench.py --targets minimal,gateway@HEAD~1,gateway

Needs valgrind (and nginx with the echo module, as the other benchmarks).
Results and the commands that produced them: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import rig

from gateway import loop as event_loop

KINDS = ("heartbeat", "get")


def request_of(kind: str, n: int, credential: str) -> bytes:
    work_id = f"work_bench{n % 1000:016d}"
    if kind == "heartbeat":
        return rig.heartbeat_request(work_id, "2026-12-02T00:00:00.000000Z", credential)
    return rig.retrieve_request(work_id, credential)


async def send(port: int, kind: str, credential: str, count: int, first: int) -> None:
    conn = await rig.Connection.open(port)
    try:
        for n in range(first, first + count):
            status, _ = await conn.request(request_of(kind, n, credential))
            if status != 200:
                raise RuntimeError(f"a {kind} was answered {status}")
    finally:
        conn.close()


def callgrind(pid: int, command: str) -> None:
    """`-z`: zero the counts so far; `-d`: dump what was counted since (to `<out>.1`)."""
    subprocess.run(["callgrind_control", command, str(pid)], capture_output=True, check=True)


def instructions(dump: Path) -> int:
    match = re.search(r"^summary:\s+(\d+)", dump.read_text(errors="replace"), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no summary in {dump}")
    return int(match.group(1))


async def measure(target: str, kind: str, args: Any, tmp: Path) -> dict[str, Any]:
    credentials = rig.Credentials.fresh()
    api_port = rig.free_port()
    api = rig.start_fake_api(tmp, api_port)
    out = tmp / f"callgrind-{rig.file_safe(target)}-{kind}.out"
    prefix = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    proxy = None
    try:
        await rig.wait_for_port(api_port)
        proxy, port = await rig.start_target(target, tmp, api_port, credentials, prefix=prefix, patience=300.0)
        assert proxy is not None
        credential = credentials.token if rig.is_gateway(target) else credentials.key
        await send(port, kind, credential, args.warmup, 0)
        callgrind(proxy.pid, "-z")
        await send(port, kind, credential, args.requests, args.warmup)
        callgrind(proxy.pid, "-d")
    finally:
        for process in (proxy, api):
            if process is not None:
                process.stop(patience=60.0)
    counted = instructions(out.with_name(out.name + ".1"))
    return {"target": target, "kind": kind, "instructions_per_request": round(counted / args.requests)}


async def main(args: Any) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="instructions-bench-") as tmp:
        for kind in args.kinds.split(","):
            for target in args.targets.split(","):
                row = await measure(target, kind, args, Path(tmp))
                print(row, file=sys.stderr, flush=True)
                rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], args: Any) -> None:
    print(f"\nbench/instructions_bench.py --targets {args.targets} --kinds {args.kinds} --requests {args.requests}")
    print("instructions per request in the proxy's process (callgrind); ratio to the first target")
    targets = args.targets.split(",")
    print(f"{'':12}" + "".join(f"{t:>26}" for t in targets))
    for kind in args.kinds.split(","):
        counts = {r["target"]: r["instructions_per_request"] for r in rows if r["kind"] == kind}
        base = counts[targets[0]]
        cells = "".join(f"{f'{counts[t]:,} ({counts[t] / base:.2f}x)':>26}" for t in targets)
        print(f"{kind:12}{cells}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="minimal,gateway")
    parser.add_argument("--requests", type=int, default=2000, help="counted, per kind and target")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"of {', '.join(KINDS)}")
    parser.add_argument("--warmup", type=int, default=1100, help="sent first, not counted (every lease once)")
    arguments = parser.parse_args()
    print_table(event_loop.run(lambda: main(arguments)), arguments)
