"""The simulated control plane's state: work items and their leases, with time passed in.

No I/O here: every operation takes `now` (seconds on the simulator's clock)
and returns the JSON-ready answer or raises `SimError`. The aiohttp app in
`gateway.simulator.app` adds auth, long polls, faults and statistics around
it. Behaviours and their sources are listed in `gateway.simulator`'s
docstring.
"""

from __future__ import annotations

import base64
import itertools
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = ["NO_HEARTBEAT", "ControlPlane", "SimError", "TtlPolicy", "WorkItem"]

NO_HEARTBEAT = "NO_HEARTBEAT"
# Stats count a worker as polling if it polled within this window (environments-api.md §3).
WORKERS_POLLING_WINDOW = 30.0
DEFAULT_RECLAIM_MS = 5000


class SimError(Exception):
    def __init__(self, status: int, error_type: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.details = details

    def body(self, request_id: str) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.error_type, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"type": "error", "error": error, "request_id": request_id}


@dataclass(frozen=True, slots=True)
class TtlPolicy:
    # ASSUMPTION: the real default and clamp range are undocumented
    # (environments-api.md §4, §8); 60 s default and a 1-600 s clamp here.
    default_seconds: int = 60
    min_seconds: int = 1
    max_seconds: int = 600

    def effective(self, desired: int | None) -> int:
        if desired is None:
            return self.default_seconds
        return max(self.min_seconds, min(self.max_seconds, desired))


@dataclass(slots=True)
class WorkItem:
    id: str
    environment_id: str
    data_type: str
    data_id: str
    created_at: float
    state: str = "queued"
    metadata: dict[str, str] = field(default_factory=dict)
    acknowledged_at: float | None = None
    started_at: float | None = None
    latest_heartbeat_at: float | None = None
    stop_requested_at: float | None = None
    stopped_at: float | None = None
    # The lease: the holder proves itself by echoing last_heartbeat.
    last_heartbeat: str | None = None
    lease_updated_at: str | None = None
    lease_expires: float | None = None
    ttl_seconds: int | None = None
    polled_at: float | None = None
    updated_at: float | None = None
    # Every sessions token issued for this item (one per poll that handed it
    # out). ASSUMPTION: they stay valid for the item's paths, so a stale
    # holder meets the lease protocol's 412, not an auth error.
    sessions_tokens: list[str] = field(default_factory=list)
    # Successful heartbeats and force-stops, for tests and /_sim views.
    beats: int = 0
    force_stops: int = 0

    def current_state(self, default_ttl: int) -> dict[str, Any]:
        """The lease as a 412 body's `error.details.current_state` shows it."""
        return {
            "state": self.state,
            "last_heartbeat": self.last_heartbeat,
            "lease_updated_at": self.lease_updated_at,
            "lease_extended": False,
            "ttl_seconds": self.ttl_seconds if self.ttl_seconds is not None else default_ttl,
        }


def page_offset(page: str | None) -> int:
    """Where an opaque `page` cursor starts (ASSUMPTION: the real cursors are opaque too)."""
    if page is None:
        return 0
    try:
        start = int(base64.urlsafe_b64decode(page.encode()).decode().removeprefix("offset:"))
    except ValueError:
        start = -1
    if start < 0:
        raise SimError(400, "invalid_request_error", "page is not a valid cursor")
    return start


def page_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode()


def rfc3339(t: float) -> str:
    return rfc3339_us(int(t * 1_000_000))


def rfc3339_us(microseconds: int) -> str:
    seconds, micro = divmod(microseconds, 1_000_000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{micro:06d}Z"


class ControlPlane:
    def __init__(self, environment_ids: list[str], *, ttl: TtlPolicy | None = None, issue_secrets: bool = False):
        self.ttl = ttl or TtlPolicy()
        self.issue_secrets = issue_secrets
        self._items: dict[str, dict[str, WorkItem]] = {env: {} for env in environment_ids}
        self._ids = itertools.count(1)
        self._last_stamp_us = 0
        self._pollers: dict[str, dict[str, float]] = {env: {} for env in environment_ids}
        # Every sessions token minted, to the item it was minted for.
        self._token_items: dict[str, WorkItem] = {}

    # -- helpers --------------------------------------------------------------

    def _env(self, environment_id: str) -> dict[str, WorkItem]:
        items = self._items.get(environment_id)
        if items is None:
            raise SimError(404, "not_found_error", f"environment {environment_id} not found")
        return items

    def _item(self, environment_id: str, work_id: str, now: float) -> WorkItem:
        self.expire(now)
        item = self._env(environment_id).get(work_id)
        if item is None:
            raise SimError(404, "not_found_error", f"work item {work_id} not found")
        return item

    def _stamp(self, now: float) -> str:
        """A new last_heartbeat: strictly increasing, microsecond precision.

        Counted in integer microseconds: a float near 1.7e9 cannot hold
        1 µs steps exactly, and two equal stamps would let a replayed echo pass.
        """
        self._last_stamp_us = max(int(now * 1_000_000), self._last_stamp_us + 1)
        return rfc3339_us(self._last_stamp_us)

    def item_for_token(self, token: str) -> WorkItem | None:
        return self._token_items.get(token)

    def work_json(self, item: WorkItem, *, with_secret: bool = False) -> dict[str, Any]:
        def ts(t: float | None) -> str | None:
            return None if t is None else rfc3339(t)

        secret = None
        if with_secret and item.sessions_tokens:
            payload = f'{{"sessions_token": "{item.sessions_tokens[-1]}"}}'.encode()
            secret = base64.urlsafe_b64encode(payload).decode().rstrip("=")
        return {
            "type": "work",
            "id": item.id,
            "environment_id": item.environment_id,
            "state": item.state,
            "data": {"type": item.data_type, "id": item.data_id},
            "metadata": dict(item.metadata),
            "secret": secret,
            "created_at": ts(item.created_at),
            "acknowledged_at": ts(item.acknowledged_at),
            "started_at": ts(item.started_at),
            "latest_heartbeat_at": ts(item.latest_heartbeat_at),
            "stop_requested_at": ts(item.stop_requested_at),
            "stopped_at": ts(item.stopped_at),
        }

    # -- time -----------------------------------------------------------------

    def expire(self, now: float) -> list[WorkItem]:
        """Let lapsed leases go, silently, as the control plane does; return the items that changed."""
        changed = []
        for items in self._items.values():
            for item in items.values():
                if item.lease_expires is None or now < item.lease_expires:
                    continue
                if item.state == "stopping":
                    # ASSUMPTION: a stopping item whose holder stopped beating is finished.
                    item.state, item.stopped_at = "stopped", now
                else:
                    # [SDK] an expired lease re-queues the item: the old holder's next
                    # beat gets a 412 with state queued and last_heartbeat null.
                    item.state = "queued"
                    item.polled_at = item.acknowledged_at = item.started_at = item.latest_heartbeat_at = None
                item.last_heartbeat = item.lease_updated_at = None
                item.lease_expires = item.ttl_seconds = None
                item.updated_at = now
                changed.append(item)
        return changed

    # -- operations -------------------------------------------------------------

    def enqueue(
        self, environment_id: str, now: float, *, data_type: str = "session", data_id: str | None = None
    ) -> WorkItem:
        n = next(self._ids)
        item = WorkItem(
            id=f"work_sim{n:08d}",
            environment_id=environment_id,
            data_type=data_type,
            data_id=data_id or f"session_sim{n:08d}",
            created_at=now,
        )
        self._env(environment_id)[item.id] = item
        return item

    def poll(
        self, environment_id: str, now: float, *, worker_id: str | None, reclaim_older_than_ms: int | None
    ) -> dict[str, Any] | None:
        self.expire(now)
        items = self._env(environment_id)
        if worker_id:
            self._pollers[environment_id][worker_id] = now
        reclaim = (DEFAULT_RECLAIM_MS if reclaim_older_than_ms is None else reclaim_older_than_ms) / 1000
        for item in sorted(items.values(), key=lambda i: i.created_at):
            if item.state == "queued" and (item.polled_at is None or now - item.polled_at >= reclaim):
                item.polled_at = now
                if self.issue_secrets:
                    token = "sk-ant-sim-req-" + secrets.token_urlsafe(24)
                    item.sessions_tokens.append(token)
                    self._token_items[token] = item
                return self.work_json(item, with_secret=True)
        return None

    def ack(self, environment_id: str, work_id: str, now: float) -> dict[str, Any]:
        item = self._item(environment_id, work_id, now)
        if item.state != "queued" or item.polled_at is None:
            # ASSUMPTION: acking an item that was not polled, or is past queued, is a conflict.
            raise SimError(409, "conflict_error", f"work item {work_id} is {item.state} and cannot be acknowledged")
        item.state, item.acknowledged_at, item.updated_at = "starting", now, now
        # ASSUMPTION: an acked item whose worker never beats is re-queued after the default TTL.
        item.ttl_seconds = self.ttl.default_seconds
        item.lease_expires = now + self.ttl.default_seconds
        return self.work_json(item)

    def heartbeat(
        self, environment_id: str, work_id: str, now: float, *, expected: str | None, desired_ttl: int | None
    ) -> dict[str, Any]:
        item = self._item(environment_id, work_id, now)
        if item.state in ("stopping", "stopped"):
            # [SDK] "The server does not compare the value when the work item is stopping or stopped."
            return self._stopping_answer(item, now, desired_ttl)
        holder_matches = (
            expected is None
            or (expected == NO_HEARTBEAT and item.last_heartbeat is None)
            or (expected == item.last_heartbeat and item.last_heartbeat is not None)
        )
        if item.state not in ("starting", "active") or not holder_matches:
            actual = item.last_heartbeat or "NULL"
            raise SimError(
                412,
                "invalid_request_error",
                f"Heartbeat precondition failed: expected {expected}, actual was {actual}",
                {
                    "error_code": "heartbeat_precondition_failed",
                    "error_visibility": "user_facing",
                    "current_state": item.current_state(self.ttl.default_seconds),
                },
            )
        return self._extend(item, now, desired_ttl, "active")

    def _extend(self, item: WorkItem, now: float, desired_ttl: int | None, state: str) -> dict[str, Any]:
        ttl = self.ttl.effective(desired_ttl)
        stamp = self._stamp(now)
        item.state = state
        item.last_heartbeat = item.lease_updated_at = stamp
        item.lease_expires, item.ttl_seconds = now + ttl, ttl
        item.latest_heartbeat_at = item.updated_at = now
        item.beats += 1
        if item.started_at is None:
            item.started_at = now
        return {
            "type": "work_heartbeat",
            "last_heartbeat": stamp,
            "lease_extended": True,
            "state": state,
            "ttl_seconds": ttl,
        }

    def _stopping_answer(self, item: WorkItem, now: float, desired_ttl: int | None) -> dict[str, Any]:
        if item.state == "stopping":
            # ASSUMPTION: the holder keeps its lease while it winds down.
            return self._extend(item, now, desired_ttl, "stopping")
        return {
            "type": "work_heartbeat",
            # The SDK documents an empty string when there was never a heartbeat.
            "last_heartbeat": item.last_heartbeat or "",
            "lease_extended": False,
            "state": "stopped",
            "ttl_seconds": 0,
        }

    def stop(self, environment_id: str, work_id: str, now: float, *, force: bool) -> dict[str, Any]:
        item = self._item(environment_id, work_id, now)
        if item.state == "stopped":
            raise SimError(409, "conflict_error", f"work item {work_id} is already stopped")
        # ASSUMPTION: a graceful stop of an unheld (queued) or already stopping item finishes it.
        item.stop_requested_at = item.stop_requested_at or now
        item.updated_at = now
        item.force_stops += force
        if force or item.state in ("queued", "stopping"):
            item.state, item.stopped_at = "stopped", now
            item.lease_expires = None
        else:
            item.state = "stopping"
        return self.work_json(item)

    def update(self, environment_id: str, work_id: str, now: float, metadata: dict[str, str | None]) -> dict[str, Any]:
        """[DOC §2.2] merge: a string upserts the key, null deletes it, omitted keys are kept."""
        item = self._item(environment_id, work_id, now)
        for key, value in metadata.items():
            if value is None:
                item.metadata.pop(key, None)
            else:
                item.metadata[key] = value
        item.updated_at = now
        return self.work_json(item)

    def retrieve(self, environment_id: str, work_id: str, now: float) -> dict[str, Any]:
        return self.work_json(self._item(environment_id, work_id, now))

    def list_items(self, environment_id: str, now: float, *, limit: int, page: str | None) -> dict[str, Any]:
        self.expire(now)
        items = sorted(self._env(environment_id).values(), key=lambda i: i.created_at)
        start = page_offset(page)
        chunk = items[start : start + limit]
        more = start + limit < len(items)
        return {"data": [self.work_json(i) for i in chunk], "next_page": page_cursor(start + limit) if more else None}

    def stats(self, environment_id: str, now: float) -> dict[str, Any]:
        self.expire(now)
        queued = [i for i in self._env(environment_id).values() if i.state == "queued"]
        # ASSUMPTION: "pending" is every queued item that was polled and not
        # acked, even once it is old enough to be reclaimed by a later poll.
        pending = [i for i in queued if i.polled_at is not None]
        oldest = min((i.created_at for i in queued), default=None)
        polling = sum(1 for t in self._pollers[environment_id].values() if now - t <= WORKERS_POLLING_WINDOW)
        return {
            "type": "work_queue_stats",
            "depth": len(queued) - len(pending),
            "pending": len(pending),
            "oldest_queued_at": None if oldest is None else rfc3339(oldest),
            "workers_polling": polling,
        }

    def items(self, environment_id: str) -> list[WorkItem]:
        return list(self._env(environment_id).values())
