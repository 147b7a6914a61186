"""A lost scheduler connection: wait for distributed's reconnect, then re-run or fail.

When distributed's Client loses its scheduler it sets its status to "connecting",
cancels every future it holds ("Client lost the connection to the scheduler. Please
check your connection and re-run your work.") and tries to reconnect for its connect
timeout, after which it closes itself. The tasks those futures stood for were not
canceled by anyone: `ConnectionWatch` collects them and waits up to the same `timeout`.
If the client is connected again by then, the tasks are submitted again (Dask re-runs
them, as after a lost worker); if not, each fails with "lost the connection to the
Dask scheduler at ADDR for N s".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

# How often the watch looks at the client's status.
POLL_SECONDS = 0.1


def is_connection_lost(client: Any) -> bool:
    """Whether `client` is not (or no longer) connected to its scheduler."""
    return client is None or getattr(client, "status", None) != "running"


def lost_message(address: str, seconds: float) -> str:
    """The error of a task whose scheduler connection did not come back."""
    return (
        "lost the connection to the Dask scheduler at %s for %.0f s: distributed did not reconnect within the "
        "executor's `timeout`; check that the scheduler is running and reachable from this machine, or raise "
        "`timeout` to ride out longer outages" % (address, seconds)
    )


class ConnectionWatch:
    """Collects the tasks a lost connection canceled and decides their fate.

    `client` returns the bridge's current client; `resubmit(keys, lost_for)` submits
    tasks again once it is connected; `fail(key, message)` reports a task as lost.
    """

    def __init__(
        self,
        address: str,
        timeout: float,
        client: Callable[[], Any],
        resubmit: Callable[[list[str], float], None],
        fail: Callable[[str, str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._client = client
        self._resubmit = resubmit
        self._fail = fail
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: list[str] = []
        self._since: float | None = None
        self._thread: threading.Thread | None = None

    def lost(self, key: str) -> None:
        """`key`'s future was canceled because the connection was lost."""
        with self._lock:
            if key not in self._keys:
                self._keys.append(key)
            if self._since is None:
                self._since = self._clock()
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="solidflow-reconnect", daemon=True)
                self._thread.start()

    def step(self) -> bool:
        """Looks once; returns True when the lost keys were handed on (or none wait)."""
        with self._lock:
            if not self._keys or self._since is None:
                return True
            lost_for = self._clock() - self._since
            client = self._client()
            back = not is_connection_lost(client)
            gone = client is None or getattr(client, "status", None) in ("closing", "closed")
            if not back and not gone and lost_for < self.timeout:
                return False
            keys, self._keys, self._since = self._keys, [], None
        if back:
            self._resubmit(keys, lost_for)
        else:
            message = lost_message(self.address, lost_for)
            for key in keys:
                self._fail(key, message)
        return True

    def _watch(self) -> None:
        try:
            while not self.step():
                time.sleep(POLL_SECONDS)
        finally:
            with self._lock:
                self._thread = None
                pending = list(self._keys)
            for key in pending:  # lost while this thread was ending
                self.lost(key)
