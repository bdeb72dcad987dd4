"""The README's commands, run as written: the offline trial with the simulator, the gateway and the SDK worker."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .tools import free_port

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(title)
    ends = [i for i in (README.find("\n## ", start + 1), README.find("\n### ", start + 1)) if i != -1]
    end = min(ends) if ends else -1
    return README[start : end if end != -1 else None]


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, re.S)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_until(check: Any, within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    while True:
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def shells(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
    for process in started:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_the_offline_trial_works_as_written(tmp_path: Path, shells: list[subprocess.Popen[bytes]]) -> None:
    blocks = shell_blocks(section("### Try it offline"))
    assert len(blocks) == 3
    # The same commands, on free ports, with this checkout's virtualenv.
    ports = {"8000": str(free_port()), "8080": str(free_port()), "9090": str(free_port())}
    config = (ROOT / "config" / "simulator.yaml").read_text()
    for fixed, port in ports.items():
        config = config.replace(f":{fixed}", f":{port}").replace(f"port: {fixed}", f"port: {port}")
    (tmp_path / "simulator.yaml").write_text(config)
    venv = str(Path(sys.executable).parent) + "/"
    commands = []
    for block in blocks:
        for fixed, port in ports.items():
            block = block.replace(f"--port {fixed}", f"--port {port}").replace(f":{fixed}", f":{port}")
        commands.append(
            block.replace(".venv/bin/", venv).replace("config/simulator.yaml", str(tmp_path / "simulator.yaml"))
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    for i, command in enumerate(commands):
        with (tmp_path / f"shell{i + 1}.log").open("wb") as log:
            shells.append(
                subprocess.Popen(
                    ["bash", "-c", command],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        if i == 0:
            wait_until(lambda: get_json(f"http://127.0.0.1:{ports['8000']}/_sim/stats"), 20, "the simulator")
        if i == 1:
            wait_until(lambda: get_json(f"http://127.0.0.1:{ports['9090']}/readyz"), 20, "the gateway")
    simulator = f"http://127.0.0.1:{ports['8000']}"

    def one_item_done() -> bool:
        items = get_json(f"{simulator}/_sim/environments/env_sim/work")["data"]
        return any(item["state"] == "stopped" for item in items)

    wait_until(one_item_done, 40, "the worker to finish an item")
    items = get_json(f"{simulator}/_sim/environments/env_sim/work")["data"]
    (done,) = [item for item in items if item["state"] == "stopped"]
    assert done["force_stops"] == 1
    assert done["heartbeats"] >= 3  # every 3 s through a 10 s idle
    sessions = {s["id"]: s for s in get_json(f"{simulator}/_sim/sessions")["data"]}
    (result,) = sessions[done["data"]["id"]]["tool_results"]
    assert result["content"] == [{"type": "text", "text": "hello"}]
    stats = get_json(f"{simulator}/_sim/stats")
    assert set(stats["credentials"]) == {"environment_key"}
    leases = get_json(f"http://127.0.0.1:{ports['9090']}/admin/leases")
    assert any(row["work_id"] == done["id"] for row in leases["data"])
    worker_log = (tmp_path / "shell3.log").read_text()
    for line in ("claimed work", "executing tool tool=bash", "session idle"):
        assert line in worker_log, worker_log[-3000:]
