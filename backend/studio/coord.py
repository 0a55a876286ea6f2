"""What the gateway and the GPU workers share in Redis besides Celery's queues: the job leases,
the per-job state lock, cancel requests, the count of waiting jobs, the worker registry and
the event channel. Every Redis key name lives here (docs/SCALE.md lists them).

Leases and locks are redis-py's `Lock` (a token with an expiry, renewed and released only by
its owner); nothing here is a scheduler.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.exceptions import LockError, LockNotOwnedError

from ..errors import BackendError, ErrorCode
from ..store.jobs import JobRecord, JobStore
from .dispatch import Timing

PREFIX = "trellis2:"
EVENTS_CHANNEL = PREFIX + "events"
PENDING = PREFIX + "pending"  # sorted set: job id -> time queued (not yet started)
CANCEL_TTL = 7 * 24 * 3600
STATE_LOCK_SECONDS = 30.0


def _key(*parts: str) -> str:
    return PREFIX + ":".join(parts)


class Coordinator:
    """One Redis connection pool and the operations on the shared keys (thread-safe)."""

    def __init__(self, url: str, timing: Timing | None = None):
        self.url = url
        self.timing = timing or Timing()
        self.redis = redis.Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30
        )

    def close(self) -> None:
        self.redis.close()

    def ping(self) -> bool:
        return bool(self.redis.ping())

    # -- jobs waiting for a worker ---------------------------------------------------------

    def add_pending(self, job_id: str) -> None:
        self.redis.zadd(PENDING, {job_id: time.time()})

    def remove_pending(self, job_id: str) -> None:
        self.redis.zrem(PENDING, job_id)

    def pending(self) -> list[str]:
        return [m.decode() for m in self.redis.zrange(PENDING, 0, -1)]

    def pending_count(self) -> int:
        return int(self.redis.zcard(PENDING))

    # -- cancel ------------------------------------------------------------------------------

    def request_cancel(self, job_id: str) -> None:
        self.redis.set(_key("cancel", job_id), b"1", ex=CANCEL_TTL)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(_key("cancel", job_id)))

    # -- leases and the state lock --------------------------------------------------------------

    def lease(self, job_id: str) -> Lease:
        """The right to run a job: whoever holds it runs it; it lapses when not renewed."""
        lock = self.redis.lock(
            _key("lease", job_id),
            timeout=self.timing.lease_seconds,
            blocking=False,
            thread_local=False,
        )
        return Lease(lock, self.timing.lease_renew)

    def lease_holder(self, job_id: str) -> bytes | None:
        return self.redis.get(_key("lease", job_id))

    @contextmanager
    def state_lock(self, job_id: str) -> Iterator[None]:
        """Serializes changes of one job's record across processes and machines."""
        lock = self.redis.lock(
            _key("state", job_id), timeout=STATE_LOCK_SECONDS, blocking_timeout=STATE_LOCK_SECONDS
        )
        if not lock.acquire():
            raise BackendError(ErrorCode.BUSY, f"job {job_id} is locked by another process")
        try:
            yield
        finally:
            try:
                lock.release()
            except (LockError, LockNotOwnedError):  # expired meanwhile: nothing to release
                pass

    def transition(self, store: JobStore, job_id: str, event: str, **fields: Any) -> JobRecord:
        with self.state_lock(job_id):
            return store.transition(job_id, event, **fields)

    # -- worker registry ---------------------------------------------------------------------

    def announce_worker(self, name: str, info: dict[str, Any]) -> None:
        data = json.dumps({**info, "name": name, "seen": time.time()})
        self.redis.set(_key("worker", name), data, px=int(self.timing.registry_ttl * 1000))

    def withdraw_worker(self, name: str) -> None:
        self.redis.delete(_key("worker", name))

    def workers(self) -> list[dict[str, Any]]:
        """Live workers (those that announced themselves within the registry's TTL)."""
        out = []
        for key in self.redis.scan_iter(match=_key("worker", "*"), count=100):
            raw = self.redis.get(key)
            if raw is None:
                continue  # expired between the scan and the read
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
        return sorted(out, key=lambda w: w.get("name", ""))

    # -- events --------------------------------------------------------------------------------

    def publish_event(self, msg_type: str, content: dict[str, Any]) -> None:
        self.redis.publish(EVENTS_CHANNEL, json.dumps({"type": msg_type, "content": content}))

    def subscribe_events(self) -> redis.client.PubSub:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(EVENTS_CHANNEL)
        return pubsub


class Lease:
    """A job's lease: taken once, renewed every `renew` seconds, released at the end."""

    def __init__(self, lock: redis.lock.Lock, renew: float):
        self.lock = lock
        self.renew = renew
        self._due = 0.0

    def acquire(self) -> bool:
        taken = bool(self.lock.acquire())
        self._due = time.monotonic() + self.renew
        return taken

    def renew_if_due(self) -> None:
        """Raises LockNotOwnedError when another worker holds it now (it lapsed)."""
        now = time.monotonic()
        if now >= self._due:
            self.lock.reacquire()
            self._due = now + self.renew

    def owned(self) -> bool:
        return bool(self.lock.owned())

    def release(self) -> None:
        try:
            self.lock.release()
        except (LockError, LockNotOwnedError):  # lapsed or taken over: nothing to release
            pass


def decode_event(raw: bytes | str) -> tuple[str, dict[str, Any]] | None:
    try:
        data = json.loads(raw)
        kind, content = data["type"], data["content"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(kind, str) or not isinstance(content, dict):
        return None
    return kind, content
