"""Warm step servers on the worker side (`warm.py`), against a stand-in step server
that speaks the real protocol (a Unix socket on stdin, SCM_RIGHTS pipes, JSON
lines) and forks `sh -c <script>` per request: real processes, real process
groups. The Rust server itself is tested by the Rust suites."""

from __future__ import annotations

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
    request = json.loads(line)["run"]
    out, err = fds
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
