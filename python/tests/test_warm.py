"""Warm step servers on the worker side (`warm.py`), against a stand-in step server
that speaks the real protocol (a Unix socket on stdin, SCM_RIGHTS pipes, JSON
lines) and forks `sh -c <script>` per request: real processes, real process
groups. The Rust server itself is tested by the Rust suites."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import sys
import threading
import time
from typing import Any

import pytest
from solidflow_dask_bridge import warm

FAKE_SERVER = r"""
import json, os, socket, sys
sock = socket.socket(fileno=os.dup(0))
buf = b""
fds = []
while True:
    while b"\n" not in buf:
        data, got, _, _ = socket.recv_fds(sock, 65536, 4)
        if not data:
            sys.exit(0)
        buf += data
        fds += got
    line, buf = buf.split(b"\n", 1)
    message = json.loads(line)
    if "run" in message:
        request = message["run"]
        out, err = fds
    else:
        # run_on_kept_pipes: new pipes replace the kept ones; the kept ones stay open.
        request = message["run_on_kept_pipes"]
        if fds:
            kept = fds
        out, err = os.dup(kept[0]), os.dup(kept[1])
    fds = []
    if request.get("refuse"):
        os.close(out); os.close(err)
        sock.sendall(json.dumps({"not_started": {"message": "refused"}}).encode() + b"\n")
        continue
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        os.dup2(out, 1); os.dup2(err, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sock.close()
        os.execvp("sh", ["sh", "-c", request["sh"]])
    os.close(out); os.close(err)
    sock.sendall(json.dumps({"started": {"pid": pid, "forked": True}}).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    exited = {"pid": pid, "code": code, "signal": sig, "core_dumped": False}
    sock.sendall(json.dumps({"exited": exited}).encode() + b"\n")
"""


class FakeWorker:
    address = "tcp://127.0.0.1:40002"


@pytest.fixture
def binary(tmp_path: Any) -> str:
    """An executable whose `step-server` is the stand-in server."""
    script = tmp_path / "fake-binary"
    script.write_text("#!%s\n%s" % (sys.executable, FAKE_SERVER))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def run(worker: Any, binary: str, sh: str, **options: int) -> tuple[int, str, str, warm.WarmProcess]:
    proc = warm.start_step(worker, [binary, "step"], None, None, json.dumps({"sh": sh}), options)
    out: list[bytes] = []
    err: list[bytes] = []
    readers = [
        threading.Thread(target=lambda: out.append(proc.stdout.read())),
        threading.Thread(target=lambda: err.append(proc.stderr.read())),
    ]
    for t in readers:
        t.start()
    code = proc.wait()
    for t in readers:
        t.join(10)
    return code, b"".join(out).decode(), b"".join(err).decode(), proc


def test_steps_run_on_one_server_with_their_own_output_and_status(binary: str) -> None:
    worker = FakeWorker()
    code, out, err, first = run(worker, binary, "echo hello; echo oops >&2; exit 3")
    assert (code, out, err) == (3, "hello\n", "oops\n")
    code, out, _, second = run(worker, binary, "echo again")
    assert (code, out) == (0, "again\n")
    assert first.server is second.server, "the idle server is reused"
    assert first.pid != second.pid, "every step has its own process"
    assert second.forked
    warm.pool_of(worker).close()


def test_a_step_killed_by_a_signal_reports_it_and_the_server_serves_on(binary: str) -> None:
    worker = FakeWorker()
    code, _, _, killed = run(worker, binary, "kill -SEGV $$")
    assert code == -signal.SIGSEGV
    code, _, _, after = run(worker, binary, "true")
    assert code == 0 and after.server is killed.server
    warm.pool_of(worker).close()


def test_servers_are_recycled_after_max_steps(binary: str) -> None:
    worker = FakeWorker()
    _, _, _, a = run(worker, binary, "true", max_steps=1)
    _, _, _, b = run(worker, binary, "true", max_steps=1)
    assert a.server is not b.server
    assert a.server.proc.poll() is not None, "a recycled server is stopped"
    warm.pool_of(worker).close()


def test_a_dead_server_kills_its_step_and_the_next_step_gets_a_new_one(binary: str, tmp_path: Any) -> None:
    worker = FakeWorker()
    marker = tmp_path / "running"
    proc = warm.start_step(worker, [binary, "step"], None, None, json.dumps({"sh": "touch %s; sleep 60" % marker}), {})
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline, "the step never started"
        time.sleep(0.01)
    os.kill(proc.server.proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    code, _, _, after = run(worker, binary, "true")
    assert code == 0 and after.server is not proc.server
    warm.pool_of(worker).close()


def test_a_refused_step_is_an_os_error_like_a_failed_popen(binary: str) -> None:
    worker = FakeWorker()
    with pytest.raises(OSError, match="refused"):
        warm.start_step(worker, [binary, "step"], None, None, json.dumps({"refuse": True}), {})
    warm.pool_of(worker).close()


def test_a_missing_binary_is_an_os_error(tmp_path: Any) -> None:
    worker = FakeWorker()
    with pytest.raises(OSError):
        warm.start_step(worker, [str(tmp_path / "missing"), "step"], None, None, "{}", {})


def test_follow_reads_both_pipes_and_the_end_on_one_thread(binary: str) -> None:
    worker = FakeWorker()
    proc = warm.start_step(
        worker, [binary, "step"], None, None, json.dumps({"sh": "echo one; echo two >&2; printf tail; exit 4"}), {}
    )
    lines: list[tuple[str, str]] = []
    polls = []

    def due() -> float | None:
        polls.append(threading.get_ident())
        return 0.005

    assert proc.follow(lambda stream, text: lines.append((stream, text)), due) == 4
    assert sorted(lines) == [("stderr", "two"), ("stdout", "one"), ("stdout", "tail")]
    assert set(polls) == {threading.get_ident()}, "no other thread"
    assert proc.poll() == 4 and proc.wait() == 4
    code, out, _, again = run(worker, binary, "echo next")
    assert (code, out) == (0, "next\n") and again.server is proc.server
    warm.pool_of(worker).close()


def follow_on_loop(worker: Any, binary: str, sh: str, **options: int) -> tuple[int, list[tuple[str, str]], Any]:
    """Runs one step with `start_step_async` + `follow_async` on a fresh event loop, as
    a Dask worker's loop runs a coroutine task; returns its code, its lines and it."""
    lines: list[tuple[str, str]] = []
    threads: set[int] = set()

    async def step() -> tuple[int, Any]:
        proc = await warm.start_step_async(worker, [binary, "step"], None, None, json.dumps({"sh": sh}), options)

        def line(stream: str, text: str) -> None:
            threads.add(threading.get_ident())
            lines.append((stream, text))

        return await proc.follow_async(line, lambda: 0.005), proc

    code, proc = asyncio.run(step())
    assert threads <= {threading.get_ident()}, "every line is handled on the loop's thread"
    return code, lines, proc


def test_follow_async_reads_both_pipes_and_the_end_on_the_event_loop(binary: str) -> None:
    worker = FakeWorker()
    code, lines, proc = follow_on_loop(worker, binary, "echo one; echo two >&2; printf tail; exit 4")
    assert code == 4 and proc.poll() == 4
    assert sorted(lines) == [("stderr", "two"), ("stdout", "one"), ("stdout", "tail")]
    code, lines, again = follow_on_loop(worker, binary, "echo next")
    assert (code, lines) == (0, [("stdout", "next")]) and again.server is proc.server, "the idle server is reused"
    warm.pool_of(worker).close()


def test_on_the_loop_a_signal_a_dead_server_and_a_recycled_server_are_reported(binary: str, tmp_path: Any) -> None:
    worker = FakeWorker()
    code, _, killed = follow_on_loop(worker, binary, "kill -SEGV $$")
    assert code == -signal.SIGSEGV
    # The server dies while its step runs: the step is killed with it.
    code, _, lost = follow_on_loop(worker, binary, "kill -9 $PPID; sleep 60")
    assert code == -signal.SIGKILL and lost.server is killed.server
    code, _, fresh = follow_on_loop(worker, binary, "true", max_steps=1)
    assert code == 0 and fresh.server is not lost.server, "a dead server is replaced"
    deadline = time.monotonic() + 10
    while fresh.server.proc.poll() is None:
        assert time.monotonic() < deadline, "a recycled server is stopped (on a thread)"
        time.sleep(0.01)
    warm.pool_of(worker).close()


def test_on_the_loop_a_refused_step_is_an_os_error(binary: str) -> None:
    worker = FakeWorker()
    with pytest.raises(OSError, match="refused"):
        asyncio.run(warm.start_step_async(worker, [binary, "step"], None, None, json.dumps({"refuse": True}), {}))
    # Both servers tried refused the request that brought their pipes, so neither is
    # sure to have kept them: neither serves again.
    assert not any(warm.pool_of(worker).idle.values())
    code, lines, _ = follow_on_loop(worker, binary, "echo fine")
    assert (code, lines) == (0, [("stdout", "fine")])
    # A server that has its pipes stays after refusing a step.
    with pytest.raises(OSError, match="refused"):
        asyncio.run(warm.start_step_async(worker, [binary, "step"], None, None, json.dumps({"refuse": True}), {}))
    assert sum(map(len, warm.pool_of(worker).idle.values())) == 1
    warm.pool_of(worker).close()


def test_run_command_async_runs_a_warm_step_and_sends_its_events_from_the_loop(
    binary: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    import distributed
    from solidflow_dask_bridge import worker as task_code

    class EventWorker(FakeWorker):
        def __init__(self) -> None:
            self.events: list[tuple[int, dict[str, Any]]] = []

        def log_event(self, topic: str, payload: dict[str, Any]) -> None:
            self.events.append((threading.get_ident(), json.loads(json.dumps(payload))))

    w = EventWorker()
    monkeypatch.setattr(distributed, "get_worker", lambda: w)
    log = tmp_path / "k.stderr.log"
    spec = {
        "key": "k",
        "command": [binary, "step"],
        "stdin": json.dumps({"sh": "echo out; echo err >&2; exit 2"}),
        "log_topic": "t",
        "warm": {},
        "log_files": {"stderr": str(log)},
    }
    result = asyncio.run(task_code.run_command_async(spec))
    assert (result["exit_code"], result["signal"], result["stderr_tail"]) == (2, None, "err")
    assert {t for t, _ in w.events} == {threading.get_ident()}, "events go out from the loop's thread"
    payloads = [p for _, p in w.events]
    assert payloads[0]["start"]["pid"] > 0 and payloads[-1]["end"]["exit_code"] == 2
    assert sorted(tuple(x[:2]) for p in payloads for x in p.get("lines", ())) == [("stderr", "err"), ("stdout", "out")]
    assert log.read_text() == "err\n" and result["log_files"] == {"stderr": str(log)}
    # An upstream that failed withdraws the step before anything starts.
    withdrawn = asyncio.run(task_code.run_command_async(dict(spec, key="k2"), result))
    assert withdrawn == {"key": "k2", "withdrawn": "k did not succeed, so k2 did not run"}
    warm.pool_of(w).close()


def test_on_the_loop_a_line_goes_out_while_its_step_still_runs(
    binary: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The step prints, then waits until the test saw that line as an event: it only
    ends well if events leave while it runs (a descriptor the loop reports readable
    twice must not block the loop)."""
    import distributed
    from solidflow_dask_bridge import worker as task_code

    go = tmp_path / "go"

    class LiveWorker(FakeWorker):
        def log_event(self, topic: str, payload: dict[str, Any]) -> None:
            if any(text == "waiting" for _, text, _ in payload.get("lines", ())):
                go.touch()

    w = LiveWorker()
    monkeypatch.setattr(distributed, "get_worker", lambda: w)
    sh = "echo waiting; i=0; while [ ! -e %s ]; do i=$((i+1)); [ $i -gt 1000 ] && exit 9; sleep 0.01; done" % go
    spec = {"key": "k", "command": [binary, "step"], "stdin": json.dumps({"sh": sh}), "log_topic": "t", "warm": {}}
    result = asyncio.run(task_code.run_command_async(spec))
    assert result["exit_code"] == 0, "the line was not sent while the step ran"
    warm.pool_of(w).close()


def test_on_the_loop_steps_share_the_servers_kept_pipes_and_keep_their_own_output(binary: str) -> None:
    """The first step on the loop hands the server a pair of pipes it keeps; later
    steps send none. Each step's output is read to its end (more than a pipe holds,
    and a last line without a newline) before the next one starts, so none leaks
    into the next step."""
    worker = FakeWorker()
    code, lines, first = follow_on_loop(worker, binary, "head -c 200000 /dev/zero | tr '\\0' x; printf tail")
    assert code == 0 and lines == [("stdout", "x" * 200000 + "tail")]
    kept = first.server.kept
    assert kept is not None and first.stdout is None, "no pipes of its own"
    code, lines, second = follow_on_loop(worker, binary, "echo next >&2")
    assert (code, lines) == (0, [("stderr", "next")])
    assert second.server is first.server and second.server.kept == kept, "the same kept pipes"
    warm.pool_of(worker).close()
    assert first.server.kept is None, "a closed server's kept pipes are closed"
