"""The worker-side task code, run here with a stand-in for the Dask worker: real
subprocesses, real pipes, real process groups."""

from __future__ import annotations

import copy
import sys
import time
from typing import Any

import distributed
import pytest
from solidflow_dask_bridge import worker


class FakeWorker:
    """What run_command uses of a distributed.Worker: its address and log_event."""

    address = "tcp://127.0.0.1:40001"

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def log_event(self, topic: str, payload: dict[str, Any]) -> None:
        assert topic == "solidflow-test"
        self.events.append(copy.deepcopy(payload))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeWorker:
    w = FakeWorker()
    monkeypatch.setattr(distributed, "get_worker", lambda: w)
    return w


def spec(command: list[str], **extra: Any) -> dict[str, Any]:
    return dict({"key": "k", "command": command, "log_topic": "solidflow-test"}, **extra)


def lines(events: list[dict[str, Any]], stream: str) -> list[str]:
    out, parts = [], []
    for event in events:
        for s, text, more in event.get("lines", ()):
            if s == stream:
                parts.append(text)
                if not more:
                    out.append("".join(parts))
                    parts = []
    return out


def test_output_exit_code_and_end_record_travel_in_order(fake: FakeWorker, tmp_path: Any) -> None:
    log = tmp_path / "k.stdout.jsonl"
    result = worker.run_command(
        spec(
            ["sh", "-c", "cat; echo $FOO; echo oops >&2; exit 3"],
            stdin="in1\nin2\n",
            env={"FOO": "bar"},
            log_files={"stdout": str(log)},
        )
    )
    assert result["exit_code"] == 3 and result["signal"] is None
    assert result["stderr_tail"] == "oops"
    assert result["events"] == len(fake.events)
    assert fake.events[0]["start"]["pid"] > 0
    assert fake.events[-1]["end"]["exit_code"] == 3
    assert lines(fake.events, "stdout") == ["in1", "in2", "bar"]
    assert lines(fake.events, "stderr") == ["oops"]
    assert log.read_text() == "in1\nin2\nbar\n"


def test_a_signal_is_reported_as_such(fake: FakeWorker) -> None:
    result = worker.run_command(spec(["sh", "-c", "kill -9 $$"]))
    assert result["exit_code"] is None and result["signal"] == 9


def test_the_task_ends_when_its_process_exits_and_leftovers_die(fake: FakeWorker, tmp_path: Any) -> None:
    pid_file = tmp_path / "orphan.pid"
    started = time.monotonic()
    result = worker.run_command(spec(["sh", "-c", "sleep 60 >/dev/null & echo $! > %s; echo left" % pid_file]))
    assert result["exit_code"] == 0
    assert time.monotonic() - started < 30, "the task waited for the child it left behind"
    orphan = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while running(orphan):
        assert time.monotonic() < deadline, "the leftover child %d is still running" % orphan
        time.sleep(0.05)


def running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_command_that_cannot_start_says_so_without_events(fake: FakeWorker) -> None:
    result = worker.run_command(spec(["/nonexistent/solidflow-binary", "step"]))
    assert "could not start" in result["not_started"] and "/nonexistent" in result["not_started"]
    assert fake.events == []


def test_long_lines_travel_in_chunks(fake: FakeWorker) -> None:
    n = worker.CHUNK_CHARS * 2 + 5
    worker.run_command(spec([sys.executable, "-c", "print('x' * %d)" % n]))
    chunks = [line for event in fake.events for line in event.get("lines", ())]
    assert len(chunks) == 3 and [more for _, _, more in chunks] == [True, True, False]
    assert lines(fake.events, "stdout") == ["x" * n]


def test_a_canceled_key_refuses_to_start(fake: FakeWorker) -> None:
    assert worker.kill_keys(["k"], 1.0, dask_worker=fake) == []
    with pytest.raises(RuntimeError, match="canceled before it started"):
        worker.run_command(spec(["true"]))


def test_a_task_after_an_upstream_that_did_not_succeed_does_not_run(fake: FakeWorker, tmp_path: Any) -> None:
    marker = tmp_path / "ran"
    command = ["sh", "-c", "touch %s" % marker]
    ok = {"key": "up-a1", "exit_code": 0, "signal": None}
    for upstream in (
        {"key": "up-a1", "exit_code": 1, "signal": None},
        {"key": "up-a1", "exit_code": None, "signal": 9},
        {"key": "up-a1", "not_started": "no such file"},
        {"key": "up-a1", "withdrawn": "its own upstream failed"},
    ):
        result = worker.run_command(spec(command), ok, upstream)
        assert result == {"key": "k", "withdrawn": "up-a1 did not succeed, so k did not run"}
        assert not marker.exists() and fake.events == []
    result = worker.run_command(spec(command), ok, ok)
    assert result["exit_code"] == 0 and marker.exists()


def test_a_stream_gets_its_copy_only_when_it_writes(fake: FakeWorker, tmp_path: Any) -> None:
    out, err = tmp_path / "logs" / "k.stdout.jsonl", tmp_path / "logs" / "k.stderr.log"
    files = {"stdout": str(out), "stderr": str(err)}
    quiet = worker.run_command(spec(["sh", "-c", "echo one; echo two"], log_files=files))
    assert out.read_text() == "one\ntwo\n"
    assert not err.exists(), "a step that writes nothing to stderr creates no stderr copy"
    assert quiet["log_files"] == {"stdout": str(out)}
    loud = worker.run_command(spec(["sh", "-c", "echo three; echo bad >&2"], log_files=files))
    assert out.read_text() == "one\ntwo\nthree\n", "a retry appends to the copy"
    assert err.read_text() == "bad\n"
    assert loud["log_files"] == files
