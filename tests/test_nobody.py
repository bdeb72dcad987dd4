"""The observer nobody listens to (`gateway/observability/nobody.py`): every part runs without metrics wired."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from gateway.edge.polls import PollObserver
from gateway.heartbeat.driver import HeartbeatObserver
from gateway.observability.nobody import NOBODY
from gateway.upstream.capacity import CapacityObserver
from gateway.upstream.client import UpstreamObserver
from gateway.upstream.discovery import DiscoveryObserver

PROTOCOLS: list[Any] = [CapacityObserver, UpstreamObserver, DiscoveryObserver, PollObserver, HeartbeatObserver]


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.__name__)
def test_nobody_takes_every_call_an_observer_protocol_declares_and_does_nothing(protocol: Any) -> None:
    methods = [name for name, _ in inspect.getmembers(protocol, inspect.isfunction) if not name.startswith("_")]
    assert methods
    for name in methods:
        parameters = list(inspect.signature(getattr(protocol, name)).parameters)[1:]
        assert getattr(NOBODY, name)(*[None] * len(parameters)) is None
