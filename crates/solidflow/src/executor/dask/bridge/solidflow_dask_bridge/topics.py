"""Keeping the scheduler's memory flat however many steps and runs it serves.

A run streams its steps' output through one Dask event topic (`worker.log_event`). The
scheduler keeps the last `distributed.admin.low-level-log-length` (1000) events of every
topic for later readers, and every topic it ever saw: a long-lived scheduler would hold
up to 1000 events of every run ever run. Dask hands an event to the topic's subscribers
when it is published, and the bridge subscribes before it submits, so the kept copies
serve nobody: the bridge truncates its topics as it releases finished keys
(`truncate`) and removes them when it closes (`drop`).

Both run on the scheduler (`run_on_scheduler`) and use its broker, which distributed
keeps private: without one they do nothing.
"""

from __future__ import annotations

from typing import Any

# Topics are truncated after at least this many keys were released since the last time.
TRUNCATE_EVERY = 256


def truncate(topics: list[str], dask_scheduler: Any = None) -> int:
    """Forgets the events the scheduler kept of these topics; returns how many."""
    broker = getattr(dask_scheduler, "_broker", None)
    kept = getattr(broker, "_topics", None)
    if kept is None:
        return 0
    count = 0
    for name in topics:
        topic = kept.get(name)
        if topic is not None:
            count += len(topic.events)
            topic.events.clear()
    return count


def drop(topics: list[str], client: str, dask_scheduler: Any = None) -> list[str]:
    """Unsubscribes `client` from these topics and removes those nobody else reads;
    returns the removed ones."""
    broker = getattr(dask_scheduler, "_broker", None)
    kept = getattr(broker, "_topics", None)
    if kept is None:
        return []
    dropped = []
    for name in topics:
        topic = kept.get(name)
        if topic is None:
            continue
        topic.subscribers.discard(client)
        if not topic.subscribers:
            del kept[name]
            dropped.append(name)
    return dropped
