"""Finding the external tools some tests need: skipped with a clear message locally, a failure in CI."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trustme


def free_port() -> int:
    """A loopback port free now (for a helper process that must be told its port up front)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_pair(ca: trustme.CA, directory: Path, *names: str) -> tuple[Path, Path]:
    """A certificate from `ca` for `names` and its key, as a `kubernetes.io/tls` Secret holds them:
    `directory/tls.crt` and `directory/tls.key`."""
    directory.mkdir(parents=True, exist_ok=True)
    issued = ca.issue_cert(*(names or ("heartbeat-gateway.test",)))
    cert, key = directory / "tls.crt", directory / "tls.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


def require(tool: str, install: str) -> str:
    # The project's own virtualenv first (tools installed with the test extra), then PATH.
    venv_tool = Path(sys.executable).parent / tool
    path = str(venv_tool) if venv_tool.exists() else shutil.which(tool)
    if path is not None:
        return path
    message = f"{tool} is not installed ({install})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must have it: .ci/run installs it")
    pytest.skip(f"{message}; with CI=true this is a failure")


def wait_listening(port: int, process: subprocess.Popen[bytes], what: str, patience: float = 15.0) -> None:
    """Until a helper process we started accepts connections on `port` (failing if it exits first)."""
    deadline = time.monotonic() + patience
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        assert process.poll() is None, f"{what} exited"
        assert time.monotonic() < deadline, f"{what} did not start"
        time.sleep(0.05)
