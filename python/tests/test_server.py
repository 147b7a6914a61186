"""The server's request loop and its translation of task events into messages."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import distributed
import pytest
from conftest import Collect
from solidflow_dask_bridge import server, worker


def test_requests_get_replies_with_their_id_and_errors_their_kind(out: Collect) -> None:
    bridge = server.Bridge(out)  # type: ignore[arg-type]
    requests = [
        "not json",
        json.dumps({"op": "nope", "id": 1}),
        json.dumps({"op": "submit", "id": 2, "key": "k", "command": ["true"]}),
        json.dumps({"op": "release", "id": 3, "keys": []}),
        json.dumps({"op": "release", "id": 4, "keys": ["k"]}),
        json.dumps({"op": "shutdown", "id": 5}),
        json.dumps({"op": "release", "id": 6, "keys": []}),
    ]
    assert server.serve(bridge, out, iter(requests)) == 0  # type: ignore[arg-type]
    kinds = [(m["type"], m.get("id"), m.get("kind")) for m in out.messages]
    assert kinds == [
        ("error", None, "bad_request"),
        ("error", 1, "bad_request"),
        ("error", 2, "not_connected"),
        ("released", 3, None),
        ("released", 4, None),
        ("shutdown", 5, None),
    ], "nothing is served after shutdown"


def run_task(monkeypatch: pytest.MonkeyPatch, command: list[str]) -> list[dict[str, Any]]:
    """The events run_command sends for `command`, as the server's topic handler gets them."""
    events: list[dict[str, Any]] = []

    class W:
        address = "tcp://127.0.0.1:40001"

        def log_event(self, topic: str, payload: dict[str, Any]) -> None:
            events.append(json.loads(json.dumps(payload)))

    monkeypatch.setattr(distributed, "get_worker", W)
    worker.run_command({"key": "k", "command": command, "log_topic": "t"})
    return events


def test_task_events_become_started_lines_and_one_done(monkeypatch: pytest.MonkeyPatch, out: Collect) -> None:
    events = run_task(monkeypatch, [sys.executable, "-c", "print('a'); print('b' * %d)" % (worker.CHUNK_CHARS + 1)])
    bridge = server.Bridge(out)  # type: ignore[arg-type]
    for event in events:
        bridge.on_event((0.0, event))
    bridge.on_event((0.0, events[-1]))  # a duplicate after the end is ignored
    types = [m["type"] for m in out.messages]
    assert types == ["started", "line", "line", "done"]
    assert out.messages[2]["line"] == "b" * (worker.CHUNK_CHARS + 1)
    assert out.messages[-1]["exit_code"] == 0 and "lines_missing" not in out.messages[-1]


def test_a_done_whose_lines_were_lost_says_how_many(monkeypatch: pytest.MonkeyPatch, out: Collect) -> None:
    events = run_task(monkeypatch, ["sh", "-c", "echo a; sleep 0.2; echo b"])
    assert len(events) >= 2, events
    bridge = server.Bridge(out)  # type: ignore[arg-type]
    bridge.on_event((0.0, events[-1]))  # only the last event arrives
    assert [m["type"] for m in out.messages if m["type"] == "done"] == []
    bridge._maybe_flush_done(events[-1]["token"], force=True)
    done = out.messages[-1]
    assert done["type"] == "done" and done["lines_missing"] == len(events) - 1


def test_task_code_is_shipped_by_value() -> None:
    """A task graph holding the task function unpickles where this package is not
    importable (a remote scheduler or worker)."""
    from distributed.protocol.pickle import dumps

    server.register_task_code()
    check = "import pickle, sys; f = pickle.loads(sys.stdin.buffer.read())['graph'][0]; print(f.__name__)"

    def load_elsewhere(fn: Any) -> subprocess.CompletedProcess[bytes]:
        data = dumps({"graph": (fn, {"key": "k"})})
        # cwd and environment without this package on the path
        return subprocess.run(
            [sys.executable, "-c", check], input=data, capture_output=True, check=False, cwd="/", env={}
        )

    by_reference = load_elsewhere(worker.run_command)
    assert by_reference.returncode != 0 and b"solidflow_dask_bridge" in by_reference.stderr
    loaded = load_elsewhere(server.by_value(worker.run_command))
    assert loaded.returncode == 0, loaded.stderr.decode()
    assert loaded.stdout.decode().strip() == "run_command"


def test_a_submit_after_a_key_the_bridge_does_not_hold_is_withdrawn(out: Collect) -> None:
    bridge = server.Bridge(out)  # type: ignore[arg-type]
    bridge.client = object()  # never used: the upstream is unknown, so nothing is submitted
    bridge.handle({"op": "submit", "id": 1, "key": "b-a1", "command": ["true"], "after": ["a-a1"]})
    assert out.messages == [
        {
            "type": "failed",
            "key": "b-a1",
            "reason": "withdrawn",
            "message": "b-a1 waited for a-a1, which this bridge no longer holds",
        },
        {"type": "submitted", "key": "b-a1", "id": 1},
    ]


class RecordingClient:
    """Records how tasks reach Dask: one entry per `submit` or `map` call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], Any]] = []

    def subscribe_topic(self, topic: str, handler: Any) -> None:
        pass

    def submit(self, fn: Any, spec: dict[str, Any], *after: Any, key: str, **options: Any) -> Any:
        self.calls.append(("submit", [key], options))
        return RecordedFuture(key)

    def map(self, fn: Any, specs: list[dict[str, Any]], key: list[str], **options: Any) -> list[Any]:
        assert [s["key"] for s in specs] == key
        self.calls.append(("map", key, options))
        return [RecordedFuture(k) for k in key]


class RecordedFuture:
    def __init__(self, key: str) -> None:
        self.key = key

    def add_done_callback(self, fn: Any) -> None:
        pass


def test_submits_read_together_reach_dask_in_groups_and_each_gets_one_reply(out: Collect) -> None:
    bridge = server.Bridge(out)  # type: ignore[arg-type]
    client = RecordingClient()
    bridge.client = client

    def submit(i: int, key: str, **extra: Any) -> bytes:
        return json.dumps({"op": "submit", "id": i, "key": key, "command": ["true"], **extra}).encode()

    batch = [
        submit(1, "a"),
        submit(2, "b"),
        submit(3, "c", resources={"GPU": 1}),
        submit(4, "a"),  # a duplicate key: an error, the others go on
        submit(5, "d", after=["a"]),  # waits for a: alone
        submit(6, "e", priority=2),
        submit(7, "f", priority=2),
        json.dumps({"op": "release", "id": 8, "keys": []}).encode(),
        submit(9, "g", priority=2),
        submit(10, "h"),
        submit(11, "i"),
        submit(12, "j", after=["i"]),  # ahead of i, which is in the group being formed
    ]
    assert server.serve_batches(bridge, out, iter([batch])) == 0  # type: ignore[arg-type]
    assert [(how, keys) for how, keys, _ in client.calls] == [
        ("map", ["a", "b"]),
        ("submit", ["c"]),
        ("submit", ["d"]),
        ("map", ["e", "f"]),
        ("submit", ["g"]),
        ("map", ["h", "i"]),
        ("submit", ["j"]),
    ]
    assert client.calls[1][2]["resources"] == {"GPU": 1}
    assert client.calls[3][2]["priority"] == 2
    replies = {m["id"]: (m["type"], m.get("kind")) for m in out.messages}
    assert len(out.messages) == 12, out.messages
    assert replies == {
        1: ("submitted", None),
        2: ("submitted", None),
        3: ("submitted", None),
        4: ("error", "bad_request"),
        5: ("submitted", None),
        6: ("submitted", None),
        7: ("submitted", None),
        8: ("released", None),
        9: ("submitted", None),
        10: ("submitted", None),
        11: ("submitted", None),
        12: ("submitted", None),
    }
    assert sorted(bridge.futures) == ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
    assert [f.key for f in bridge.after["j"]] == ["i"]


def test_read_batches_yields_the_complete_lines_of_each_read() -> None:
    import os

    r, w = os.pipe()
    os.write(w, b'{"a": 1}\n{"b": 2}\n{"c"')
    os.write(w, b": 3}\n")
    os.close(w)
    batches = list(server.read_batches(r))
    os.close(r)
    assert [line for batch in batches for line in batch] == [b'{"a": 1}', b'{"b": 2}', b'{"c": 3}']
    assert len(batches[0]) >= 2
