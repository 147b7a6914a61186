"""The scheduler's cluster-wide events (the "all" topic) that concern our tasks.

When the scheduler removes a worker (it died, or missed its heartbeats) it logs a
"remove-worker" event naming the worker and the tasks it was processing. The bridge
turns that into one "worker_lost" message per task of ours, naming the worker that was
lost, as soon as the scheduler knows, before Dask re-runs the task elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

TOPIC = "all"


def worker_lost_messages(event: Any, ours: Callable[[str], bool]) -> list[dict[str, Any]]:
    """The "worker_lost" messages for a topic event `(timestamp, msg)`: one per task
    `ours` claims that was processing on the removed worker."""
    try:
        _, msg = event
    except (TypeError, ValueError):
        return []
    if not isinstance(msg, dict) or msg.get("action") != "remove-worker":
        return []
    worker = msg.get("worker")
    keys = msg.get("processing-tasks") or ()
    return [
        {"type": "worker_lost", "key": key, "worker": str(worker)}
        for key in sorted(k for k in keys if isinstance(k, str) and ours(k))
    ]
