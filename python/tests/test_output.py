"""How the bridge writes its messages and follows its futures: one write per Dask
event, and only the outcomes that need it handed to a thread."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from typing import Any

from conftest import Collect
from solidflow_dask_bridge import server


def read_available(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return b""


def test_messages_of_a_batch_go_out_in_one_write_and_other_threads_wait_for_it() -> None:
    r, w = os.pipe()
    out = server.Output(w)
    from_other_thread = threading.Thread(target=out.emit, args=({"type": "other"},))
    with out.batch():
        out.emit({"type": "started", "key": "a"})
        with out.batch():  # nested: still the outer block's write
            out.emit({"type": "line", "key": "a"})
        from_other_thread.start()
        time.sleep(0.05)
        out.emit({"type": "done", "key": "a"})
        assert read_available(r) == b"", "nothing is written before the block ends"
    from_other_thread.join(5)
    first = read_available(r).decode()
    assert [json.loads(line)["type"] for line in first.splitlines()] == ["started", "line", "done", "other"]
    out.emit({"type": "alone"})
    assert json.loads(read_available(r)) == {"type": "alone"}
    os.close(r)


class State:
    """A future's state as distributed keeps it: something to await."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def wait(self) -> None:
        await self.event.wait()


class PendingFuture:
    def __init__(self, key: str) -> None:
        self.key, self.status, self._state = key, "pending", State()

    def end(self, status: str) -> None:
        self.status = status
        self._state.event.set()


def test_futures_are_awaited_on_the_loop_and_only_unreported_ends_reach_a_thread(out: Collect) -> None:
    bridge = server.Bridge(out)  # type: ignore[arg-type]
    handed: list[tuple[str, str]] = []
    bridge.on_future_done = lambda fut: handed.append((fut.key, threading.current_thread().name))  # type: ignore[method-assign]
    reported, failed, unreported = PendingFuture("a"), PendingFuture("b"), PendingFuture("c")
    bridge.reported.add("a")  # its "done" came with its end event

    async def go() -> None:
        await bridge._watch_on_loop([reported, failed, unreported])
        assert len(bridge.watchers) == 3
        reported.end("finished")
        failed.end("error")
        unreported.end("finished")
        deadline = time.monotonic() + 5
        while bridge.watchers and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    asyncio.run(go())
    bridge.outcomes.shutdown(wait=True)
    assert sorted(key for key, _ in handed) == ["b", "c"]
    assert all(name.startswith("solidflow-outcomes") for _, name in handed)
    assert not bridge.watchers


def test_without_a_client_loop_futures_get_done_callbacks(out: Collect) -> None:
    bridge = server.Bridge(out)  # type: ignore[arg-type]
    got: list[Any] = []

    class Plain:
        def add_done_callback(self, fn: Any) -> None:
            got.append(fn)

    bridge._watch([Plain(), Plain()])
    assert got == [bridge.on_future_done, bridge.on_future_done]


def test_events_and_outcomes_reported_at_once_from_two_threads_do_not_deadlock() -> None:
    """The loop's event handler writes under the bridge's lock and the output's batch;
    the outcomes thread reports under the bridge's lock too. Both take them in the same
    order, so neither waits for the other forever."""
    import sys

    r, w = os.pipe()
    bridge = server.Bridge(server.Output(w))
    drained = threading.Event()

    def drain() -> None:
        while os.read(r, 1 << 16):
            pass
        drained.set()

    def events() -> None:
        for i in range(3000):
            bridge.on_event((0.0, {"key": "e%d" % i, "token": "t%d" % i, "worker": "w", "start": {"pid": 1}}))

    def outcomes() -> None:
        for i in range(3000):
            bridge._final({"type": "failed", "key": "f%d" % i, "reason": "error", "message": "x"})

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threading.Thread(target=drain, daemon=True).start()
        workers = [threading.Thread(target=events, daemon=True), threading.Thread(target=outcomes, daemon=True)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(30)
        assert not any(t.is_alive() for t in workers), "the two threads deadlocked"
    finally:
        sys.setswitchinterval(old)
        os.close(w)
    drained.wait(5)
