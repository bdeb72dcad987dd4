"""What the throughput and scale benchmarks share: a fake API, the proxies under test, pinning, and a lean client.

The proxy under test runs alone on one core (`PROXY_CORE`); the fake API and
the load generator share the other (`LOAD_CORE`), so the load generator never
competes with what it measures. The fake API is nginx answering as the
environments API does (a 128-byte heartbeat answer; a long poll that waits its
`block_ms` and answers `null`; a work item on GET): it costs next to nothing,
so what a proxy adds is the proxy's own.

With `--upstream https` (`UpstreamTls`), the fake API is served over TLS with
a private CA, as the real API is over TLS: every proxy verifies it (nginx with
`proxy_ssl_verify`, the minimal proxy and the gateway with the CA added to
their trust), and `direct` workers speak TLS to it themselves. Worker to proxy
stays plain HTTP, as inside a cluster.

Needs nginx with the echo module (`apt-get install nginx libnginx-mod-http-echo`)
and, for the closed-loop rows, wrk (`apt-get install wrk`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from gateway import loop as event_loop

ENV_ID = "env_bench00000000000000001"
BETA = "managed-agents-2026-04-01"
# BENCH_PROXY_CORE=1 swaps them: two instruction counts (`instructions_bench.py`, which the other load does
# not change) can then run at once.
PROXY_CORE = int(os.environ.get("BENCH_PROXY_CORE", "0"))
LOAD_CORE = 1 - PROXY_CORE
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")
# What the fake API answers every heartbeat with: 128 bytes, as the API's own answer.
# The TTL is the one asked for (`desired_ttl_seconds`), else 10 s.
HEARTBEAT_ANSWER = (
    '{"type":"work_heartbeat","last_heartbeat":"2026-12-02T00:00:00.000000Z",'
    '"lease_extended":true,"state":"active","ttl_seconds":$ttl}'
)
WORK_ANSWER = (
    '{"type":"work","id":"work_bench","environment_id":"' + ENV_ID + '","state":"active",'
    '"data":{"type":"session","id":"sesn_bench"}}'
)
DESCRIPTORS = 65_536
TARGETS = ("direct", "nginx", "minimal", "gateway")

_NGINX_COMMON = """
daemon off;
master_process off;
worker_processes 1;
error_log {tmp}/{name}-error.log warn;
pid {tmp}/{name}.pid;
worker_rlimit_nofile 65536;
events {{ worker_connections 30000; }}
"""
_TEMP_PATHS = (
    "client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;"
    " uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;"
)
FAKE_API = (
    "load_module {module};\n"
    + _NGINX_COMMON
    + """
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 600s;
  """
    + _TEMP_PATHS
    + """
  default_type application/json;
  # A long poll waits its own block_ms (the SDK sends 999), then the queue is empty.
  map $arg_block_ms $poll_wait {{ "~^(\\d)$" "0.00$1"; "~^(\\d\\d)$" "0.0$1"; "~^(\\d\\d\\d)$" "0.$1"; default "1"; }}
  map $arg_desired_ttl_seconds $ttl {{ "~^\\d+$" $arg_desired_ttl_seconds; default 10; }}
  server {{
    listen 127.0.0.1:{port} {ssl}backlog=16384;
    {certificate}
    location ~ /work/poll$ {{ echo_sleep $poll_wait; echo_exec /_empty; }}
    location = /_empty {{ internal; return 200 "null"; }}
    location ~ /heartbeat$ {{ return 200 '{heartbeat}'; }}
    location / {{ return 200 '{work}'; }}
  }}
}}
"""
)
NGINX_PROXY = (
    _NGINX_COMMON
    + """
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 600s;
  """
    + _TEMP_PATHS
    + """
  upstream api {{ server 127.0.0.1:{upstream_port}; keepalive 1024; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{port} backlog=16384;
    location / {{
      proxy_pass {scheme}://api;
      {verify}
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {key}";
      proxy_set_header anthropic-beta "{beta}";
      proxy_buffering off;
      proxy_read_timeout 600s;
    }}
  }}
}}
"""
)


NGINX_UPSTREAM_NAME = "fake-api.bench"


@dataclass(frozen=True)
class UpstreamTls:
    """The fake API's certificate and the private CA that signed it, made fresh for a run."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def make(cls, tmp: Path) -> UpstreamTls:
        import trustme  # the test extra, like the rest of the benchmarks' tools

        ca = trustme.CA(organization_name="heartbeat-gateway benchmark CA")
        # nginx checks a name, never an IP address, against the certificate: it gets the name.
        served = ca.issue_cert("127.0.0.1", NGINX_UPSTREAM_NAME)
        tls = cls(tmp / "bench-ca.pem", tmp / "fake-api.crt", tmp / "fake-api.key")
        ca.cert_pem.write_to_path(str(tls.ca_file))
        tls.cert_file.write_bytes(b"".join(blob.bytes() for blob in served.cert_chain_pems))
        served.private_key_pem.write_to_path(str(tls.key_file))
        return tls

    def gateway_upstream(self, base_url: str) -> str:
        """The gateway's `upstream:` settings for the fake API served with this: its CA added to the trust."""
        return f"base_url: '{base_url}', tls: {{ca_files: ['{self.ca_file}']}}"

    def client_context(self) -> ssl.SSLContext:
        """What a worker going direct verifies the API with."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    @property
    def nginx_server(self) -> str:
        return f"ssl_certificate {self.cert_file}; ssl_certificate_key {self.key_file};"

    @property
    def nginx_proxy(self) -> str:
        # Verified as the others verify it; nginx also resumes TLS sessions on new upstream connections.
        return (
            f"proxy_ssl_verify on; proxy_ssl_trusted_certificate {self.ca_file}; proxy_ssl_name {NGINX_UPSTREAM_NAME};"
            " proxy_ssl_server_name on; proxy_ssl_session_reuse on;"
        )


def upstream_tls(kind: str, tmp: Path) -> UpstreamTls | None:
    """`--upstream http|https`: the fake API over plain HTTP, or over TLS with a CA made for the run."""
    if kind not in ("http", "https"):
        raise SystemExit(f"--upstream must be http or https, not {kind!r}")
    return UpstreamTls.make(tmp) if kind == "https" else None


@dataclass(frozen=True)
class Endpoint:
    """Where the load generator's workers connect: a proxy's port in plain HTTP, as inside a cluster,
    or, for `direct`, the API's own port, over TLS when the API is served over it."""

    port: int
    tls: ssl.SSLContext | None = None

    @classmethod
    def of(cls, target: str, port: int, tls: UpstreamTls | None) -> Endpoint:
        return cls(port, tls.client_context() if target == "direct" and tls is not None else None)

    async def connect(self) -> Connection:
        return await Connection.open(self.port, self.tls)


def machine(placement: str = f"proxy on core {PROXY_CORE}, load and fake API on {LOAD_CORE}") -> str:
    """The machine a result was measured on, and where the benchmark put its processes."""
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{event_loop.loop_name()} event loop; {placement}"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin_this_process_to_load_core() -> None:
    os.sched_setaffinity(0, {LOAD_CORE})


def check_tools(*tools: str) -> None:
    missing = [t for t in tools if subprocess.run(["which", t], capture_output=True).returncode]
    if not ECHO_MODULE.exists():
        missing.append("libnginx-mod-http-echo")
    if missing:
        sys.exit(f"missing: {', '.join(missing)} (apt-get install nginx libnginx-mod-http-echo wrk)")


@dataclass
class Process:
    """A process of the benchmark, pinned to one core, measured from /proc."""

    name: str
    popen: subprocess.Popen[bytes]
    stop_signal: int = signal.SIGTERM
    # Stopped after it (a gateway's trace receiver).
    companions: tuple[Process, ...] = ()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        return int(match.group(1)) / 1024 if match else 0.0

    def stop(self, patience: float = 30.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(self.stop_signal)
        try:
            self.popen.wait(timeout=patience)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        for companion in self.companions:
            companion.stop(patience)


def _more_descriptors() -> None:
    """In the child: descriptors for 10,000 workers' connections and their upstream ones, where
    allowed (root here; a pod's limit is usually 1,048,576). The gateway sizes its connection cap
    by this limit, so a low one would refuse workers before the CPU is the limit."""
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (DESCRIPTORS, DESCRIPTORS))


def start(
    name: str, command: list[str], core: int, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Process:
    # Output is dropped (a log pipe's reader would compete for the load core); BENCH_LOGS=DIR keeps it.
    keep = os.environ.get("BENCH_LOGS")
    output = open(Path(keep) / f"{name}.log", "ab") if keep else subprocess.DEVNULL  # noqa: SIM115
    popen = subprocess.Popen(
        ["taskset", "-c", str(core), *command],
        env=env,
        cwd=cwd,
        stdout=output,
        stderr=output,
        preexec_fn=_more_descriptors,
    )
    # nginx, run with `master_process off`, ends on SIGQUIT after its requests (SIGTERM cuts them).
    return Process(name, popen, signal.SIGQUIT if command[0] == "nginx" else signal.SIGTERM)


def profile(process: Process | None, seconds: float, path: str) -> subprocess.Popen[bytes]:
    """py-spy samples the process for `seconds`, from the load core, writing collapsed stacks to `path`."""
    assert process is not None
    spy = Path(sys.executable).with_name("py-spy")
    command = ["taskset", "-c", str(LOAD_CORE), str(spy), "record", "-p", str(process.pid), "-d", str(int(seconds)),
               "-r", "200", "-f", "raw", "-o", path, "--nonblocking"]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def wait_for_port(port: int, patience: float = 20.0) -> None:
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


@dataclass
class Credentials:
    key: str
    token: str

    @classmethod
    def fresh(cls) -> Credentials:
        return cls("bench-env-key-" + secrets.token_urlsafe(16), "bench-token-" + secrets.token_urlsafe(16))

    def env(self) -> dict[str, str]:
        return {**os.environ, "BENCH_ENV_KEY": self.key, "BENCH_TOKEN": self.token}


def start_fake_api(tmp: Path, port: int, tls: UpstreamTls | None = None) -> Process:
    conf = tmp / "fake-api.conf"
    conf.write_text(
        FAKE_API.format(
            module=ECHO_MODULE,
            tmp=tmp,
            name="fake-api",
            port=port,
            heartbeat=HEARTBEAT_ANSWER,
            work=WORK_ANSWER,
            ssl="ssl " if tls else "",
            certificate=tls.nginx_server if tls else "",
        )
    )
    return start("fake-api", ["nginx", "-c", str(conf)], LOAD_CORE)


def gateway_yaml(
    upstream_port: int,
    port: int,
    admin_port: int,
    extra: str = "",
    tls: UpstreamTls | None = None,
    upstream_extra: str = "",
) -> str:
    """The README's minimal config, pointed at the fake API, plus what a benchmark sets (`upstream_extra`:
    in the `upstream` section)."""
    upstream = f"base_url: http://127.0.0.1:{upstream_port}"
    if tls is not None:
        upstream = tls.gateway_upstream(f"https://127.0.0.1:{upstream_port}")
    upstream += upstream_extra
    return f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin_port}}}
upstream: {{{upstream}}}
environments: [{{id: {ENV_ID}, key_env: BENCH_ENV_KEY}}]
clients: {{tokens: [{{token_env: BENCH_TOKEN}}]}}
{extra}
"""


def file_safe(name: str) -> str:
    """A target's or revision's name as part of a file name (`gateway@HEAD~1` → `gateway_HEAD_1`)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def is_gateway(target: str) -> bool:
    """`gateway`, or `gateway@REV`: the gateway as committed at git revision REV, so that a change
    and its parent are measured side by side in one run (`--targets gateway@HEAD~1,gateway`).
    Either may end in a variant (`TRACING_VARIANTS`, `CLIENT_VARIANTS`): `gateway+tracing`."""
    base = target.partition("+")[0]
    return base == "gateway" or base.startswith("gateway@")


# `gateway+tracing`: `tracing.enabled`, every request sampled and its spans exported over OTLP/HTTP to a
# receiver (tests/otlp_receiver.py) on the load core; `gateway+tracing-unsampled`: the spans made, none
# sampled (what a low sampling ratio costs for the requests it leaves out).
TRACING_VARIANTS = {"tracing": "always_on", "tracing-unsampled": "always_off"}
# `gateway+aiohttp-client`: every upstream call by aiohttp's client (`upstream.client: aiohttp`), the lean
# client's baseline in the same run.
CLIENT_VARIANTS = {"aiohttp-client": ", client: aiohttp"}
OTLP_RECEIVER = Path(__file__).resolve().parent.parent / "tests" / "otlp_receiver.py"


def _tracing(target: str) -> tuple[str, dict[str, str], Process | None]:
    """A gateway target's tracing variant: config to add, environment to add, and the receiver started."""
    variant = target.partition("+")[2]
    if not variant or variant in CLIENT_VARIANTS:
        return "", {}, None
    sampler = TRACING_VARIANTS[variant]
    port = free_port()
    receiver = start(f"otlp-receiver-{port}", [sys.executable, str(OTLP_RECEIVER), "--port", str(port)], LOAD_CORE)
    # Exported every 100 ms: what is counted includes the export of nearly every span it made.
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_TRACES_SAMPLER": sampler}
    env["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    return "tracing: {enabled: true}\n", env, receiver


def _gateway_source(target: str, tmp: Path) -> Path | None:
    """For `gateway@REV`: where that revision's `gateway` package is unpacked (once); run from
    there, it is the one `python -m gateway` imports (the current directory comes first)."""
    target = target.partition("+")[0]
    if target == "gateway":
        return None
    revision = target.removeprefix("gateway@")
    source = tmp / f"source-{file_safe(revision)}"
    if not source.exists():
        source.mkdir()
        repo = Path(__file__).resolve().parent.parent
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", revision, "gateway"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    return source


async def start_target(
    target: str,
    tmp: Path,
    upstream_port: int,
    credentials: Credentials,
    gateway_extra: str = "",
    pool: int = 0,
    *,
    prefix: Sequence[str] = (),
    patience: float = 20.0,
    tls: UpstreamTls | None = None,
) -> tuple[Process | None, int]:
    """The proxy under test on its own core, or none for `direct`; and the port workers call.

    `prefix` runs an aiohttp target under another program (valgrind, say), `patience` its start-up's bound,
    `tls` the fake API's TLS when it is served over HTTPS.
    """
    if target == "direct":
        return None, upstream_port
    port, admin_port = free_port(), free_port()
    if target == "nginx":
        conf = tmp / "nginx-proxy.conf"
        conf.write_text(
            NGINX_PROXY.format(
                tmp=tmp,
                name="nginx-proxy",
                port=port,
                upstream_port=upstream_port,
                key=credentials.key,
                beta=BETA,
                scheme="https" if tls else "http",
                verify=tls.nginx_proxy if tls else "",
            )
        )
        process = start("nginx", ["nginx", "-c", str(conf)], PROXY_CORE)
    else:
        config = tmp / f"{file_safe(target)}.yaml"
        traced, tracing_env, receiver = _tracing(target) if is_gateway(target) else ("", {}, None)
        extra = traced + gateway_extra if is_gateway(target) else ""
        client = CLIENT_VARIANTS.get(target.partition("+")[2], "") if is_gateway(target) else ""
        config.write_text(gateway_yaml(upstream_port, port, admin_port, extra, tls, client))
        cwd = None
        env = {**credentials.env(), **tracing_env}
        if is_gateway(target):
            cwd = _gateway_source(target, tmp)
            command = [*prefix, sys.executable, "-m", "gateway", "serve", "--config", str(config)]
        else:
            # `minimal-lean-client`, `minimal-low-level-server`: the minimal proxy's variants.
            minimal = str(Path(__file__).with_name("minimal_proxy.py"))
            variant = target.removeprefix("minimal").lstrip("-") or "aiohttp"
            command = [*prefix, sys.executable, minimal, "--pool", str(pool), "--variant", variant]
            command += ["--config", str(config)]
        process = start(target, command, PROXY_CORE, env, cwd)
        if receiver is not None:
            process.companions = (receiver,)
    await wait_for_port(port, patience)
    if is_gateway(target) or target.startswith("minimal"):
        await wait_for_port(admin_port, patience)
    return process, port


def admin_port(tmp: Path, target: str) -> int:
    """The gateway's admin port, from the config `start_target` wrote; 0 for any other target."""
    if not is_gateway(target):
        return 0
    match = re.search(r"admin: \{host: 127.0.0.1, port: (\d+)\}", (tmp / f"{file_safe(target)}.yaml").read_text())
    return int(match.group(1)) if match else 0


async def metric_totals(admin_port: int, name: str, label: str) -> Counter[str]:
    """`heartbeat_gateway_<name>_total` summed by one label, from the gateway's admin port."""
    conn = await Connection.open(admin_port)
    try:
        _, body = await conn.request(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    finally:
        conn.close()
    found: Counter[str] = Counter()
    pattern = rf'^heartbeat_gateway_{name}_total\{{[^}}]*{label}="([a-z_]+)"[^}}]*\}} ([0-9.e+]+)$'
    for m in re.finditer(pattern, body.decode(), re.M):
        found[m.group(1)] += int(float(m.group(2)))
    return found


def print_results(outcome: dict[str, Any], keys: Sequence[str], *, label_width: int, column_width: int) -> None:
    """A benchmark's results as a table: the command and machine, then a row per key and a column per target."""
    print(f"\n{outcome['command']}\n{outcome['machine']}")
    rows = outcome["results"]
    print(f"{'':{label_width}}" + "".join(f"{r['target']:>{column_width}}" for r in rows))
    for key in keys:
        print(f"{key:{label_width}}" + "".join(f"{json.dumps(r.get(key, '')):>{column_width}}" for r in rows))


def percentile_ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3) if ordered else float("nan")


def spread(values: list[float]) -> str:
    """A median with its range, as the benchmarks report every figure: `m [min..max]`."""
    ordered = sorted(values)
    if not ordered:
        return "-"
    mid = ordered[len(ordered) // 2]
    return f"{_figure(mid)} [{_figure(ordered[0])}..{_figure(ordered[-1])}]"


def _figure(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time.

    The least a load generator in Python can spend per request (aiohttp's
    client costs several times more), so one core drives 10,000 workers.
    Understands Content-Length and chunked answers; nothing else is needed here.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._answer: asyncio.Future[tuple[int, bytes]] | None = None
        self._transport: asyncio.Transport | None = None
        self.closed = False

    opened = 0  # by this process, to tell a keep-alive proxy from one that closes connections

    @classmethod
    async def open(cls, port: int, tls: ssl.SSLContext | None = None) -> Connection:
        cls.opened += 1
        _, protocol = await asyncio.get_running_loop().create_connection(cls, "127.0.0.1", port, ssl=tls)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass, but has the methods

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(ConnectionResetError("closed by the server"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._answer is not None and not self._answer.done():
            self._parse()

    def _parse(self) -> None:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buffer[:end]).lower()
        match = re.search(rb"\r\ncontent-length: *(\d+)", head)
        if match:
            total = end + 4 + int(match.group(1))
            if len(buffer) < total:
                return
            body = bytes(buffer[end + 4 : total])
        else:  # chunked
            tail = buffer.find(b"\r\n0\r\n\r\n", end)
            if tail < 0 and not buffer.startswith(b"0\r\n\r\n", end + 4):
                return
            total = (tail + 7) if tail >= 0 else end + 9
            body = bytes(_dechunk(bytes(buffer[end + 4 : total])))
        status = int(head[9:12])
        del buffer[:total]
        assert self._answer is not None
        self._answer.set_result((status, body))

    async def request(self, data: bytes) -> tuple[int, bytes]:
        assert self._transport is not None
        if self.closed:
            raise ConnectionResetError("closed by the server")
        self._answer = asyncio.get_running_loop().create_future()
        self._transport.write(data)
        if self._buffer:  # an answer that came first: a refused connection's 503
            self._parse()
        return await self._answer

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _dechunk(data: bytes) -> bytes:
    out, i = bytearray(), 0
    while True:
        line_end = data.index(b"\r\n", i)
        size = int(data[i:line_end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[line_end + 2 : line_end + 2 + size]
        i = line_end + 4 + size


def heartbeat_request(work_id: str, expected: str, credential: str) -> bytes:
    return (
        f"POST /v1/environments/{ENV_ID}/work/{work_id}/heartbeat?beta=true&expected_last_heartbeat={expected} "
        f"HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {credential}\r\nanthropic-beta: {BETA}\r\n"
        "anthropic-version: 2023-06-01\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def retrieve_request(work_id: str, credential: str) -> bytes:
    """A work item's retrieve, which the gateway passes through."""
    return (
        f"GET /v1/environments/{ENV_ID}/work/{work_id}?beta=true HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {credential}\r\nanthropic-beta: {BETA}\r\nanthropic-version: 2023-06-01\r\n\r\n"
    ).encode()


def poll_request(worker_id: str, credential: str, block_ms: int = 999) -> bytes:
    return (
        f"GET /v1/environments/{ENV_ID}/work/poll?beta=true&block_ms={block_ms} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {credential}\r\nanthropic-beta: {BETA}\r\nanthropic-version: 2023-06-01\r\n"
        f"Anthropic-Worker-ID: {worker_id}\r\n\r\n"
    ).encode()
