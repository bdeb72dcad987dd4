"""`heartbeat-gateway demo`: the simulator, the gateway and simulated SDK workers in one process.

`run.py` wires them together and prints the summary; `worker.py` is a worker
that behaves like the SDK's (poll, ack, claim, beat every ttl/2, stop).
"""

from gateway.demo.run import run_demo

__all__ = ["run_demo"]
