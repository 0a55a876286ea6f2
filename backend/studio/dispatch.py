"""How jobs travel from the gateway to GPU workers: the Celery application, its settings, the
one task's name, and the queues by card size. Pure tables and functions, plus `make_celery`.

Celery with a Redis broker does the distribution (docs/SCALE.md); this module only configures
it. One task, `trellis2.run_job`, carries a job id of the shared job store; the store, not
Celery, holds the job's request and outcome, so no result backend is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TASK_NAME = "trellis2.run_job"
QUEUE_PREFIX = "trellis2.gpu"
WORKER_QUEUE_PREFIX = "trellis2.worker."  # one per worker: re-exports go where the cache is

# Card sizes (GB) that jobs and workers are sorted into. A job's need is rounded up to a tier
# and a card down to one, so a queue is only consumed by cards at least that large.
CARD_TIERS_GB = (8, 12, 16, 24, 32, 40, 48, 80, 96, 141)


@dataclass(frozen=True)
class Timing:
    """Time limits of the distributed path, in seconds (docs/SCALE.md, "Worker loss").

    `visibility_timeout`: a job message that a worker took but never acknowledged (the worker
    was killed) goes back on its queue this long after it was taken. A message whose job is
    still running elsewhere is put back with `retry_countdown` (the job's lease says so), so a
    short timeout costs a few cheap redeliveries during long jobs, never a duplicate run.
    `lease_seconds`: a running job's lease in Redis lapses this long after its worker stopped
    renewing it; only then may another worker take the job over.
    """

    visibility_timeout: float = 120.0
    restore_interval: float = 5.0  # how often idle workers look for such messages
    lease_seconds: float = 30.0
    lease_renew: float = 2.0
    retry_countdown: float = 20.0
    registry_ttl: float = 15.0  # a worker that stopped announcing itself is gone after this
    registry_renew: float = 2.0

    def check(self) -> None:
        if not self.retry_countdown < self.visibility_timeout:
            # A worker holds a delayed message unacknowledged; longer than the visibility
            # timeout, and it would be handed out twice.
            raise ValueError("retry_countdown must be shorter than visibility_timeout")
        if not self.lease_renew < self.lease_seconds / 2:
            raise ValueError("lease_renew must be under half of lease_seconds")
        if not self.registry_renew < self.registry_ttl / 2:
            raise ValueError("registry_renew must be under half of registry_ttl")


def card_tier(vram_gb: float) -> int | None:
    """The largest tier a card of `vram_gb` satisfies (None: smaller than every tier)."""
    fitting = [t for t in CARD_TIERS_GB if t <= vram_gb + 1e-9]
    return fitting[-1] if fitting else None


def need_tier(min_vram_gb: float) -> int | None:
    """The smallest tier that satisfies a job's need (None: larger than every tier)."""
    for tier in CARD_TIERS_GB:
        if tier >= min_vram_gb:
            return tier
    return None


def queue_name(tier: int) -> str:
    return f"{QUEUE_PREFIX}{tier}"


def worker_queue(worker: str) -> str:
    return f"{WORKER_QUEUE_PREFIX}{worker}"


def queues_for_card(vram_gb: float, worker: str) -> list[str]:
    """The queues a worker with this card consumes: every tier up to its own, and its own."""
    top = card_tier(vram_gb)
    tiers = [t for t in CARD_TIERS_GB if top is not None and t <= top]
    return [queue_name(t) for t in tiers] + [worker_queue(worker)]


def can_serve(card_vram_gb: float, min_vram_gb: float) -> bool:
    need, have = need_tier(min_vram_gb), card_tier(card_vram_gb)
    return need is not None and have is not None and have >= need


def celery_settings(timing: Timing) -> dict[str, Any]:
    """Celery settings for the gateway (producer) and the workers (consumers)."""
    return {
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,  # the shared job store holds every outcome
        # One job per GPU, taken only when the worker is free, acknowledged only when done,
        # so a lost worker's job goes back on the queue.
        "worker_concurrency": 1,
        "worker_prefetch_multiplier": 1,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "broker_transport_options": {
            "visibility_timeout": timing.visibility_timeout,
            "unacked_restore_interval": timing.restore_interval,
            "unacked_restore_throttle": 1,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
        },
        "broker_connection_retry_on_startup": True,
        # The gateway answers within seconds even with the broker down: a few quick retries.
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0.1,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_default_queue": queue_name(CARD_TIERS_GB[0]),
    }


def make_celery(broker_url: str, timing: Timing | None = None):
    """A Celery application for `broker_url` (imported lazily: the add-on never needs it)."""
    from celery import Celery

    timing = timing or Timing()
    timing.check()
    app = Celery("trellis2", broker=broker_url)
    app.conf.update(celery_settings(timing))
    return app
