"""Warm step servers on Dask workers (`isolation: warm`).

Instead of starting `<binary> step` per task, a task hands its invocation to a
`<binary> step-server` on the same worker: a fork server that built the repository
once and forks one process per step (see `execution/step_server` in the Rust crate).
The step keeps its own process, process group and pid, so everything
`worker.run_command` does with a step process (cancel by process group, crash by
signal, output through pipes) works unchanged on the `WarmProcess` this module
returns in place of a `subprocess.Popen`.

Each worker keeps a pool of idle servers per binary; a task takes one (or starts
one), and gives it back when its step is over, so there are as many servers as
steps ran at once. Servers are started from one long-lived thread per worker,
because a server dies with the thread that started it (`PR_SET_PDEATHSIG`), and
task threads may come and go. A server is replaced after `max_steps` steps, or when
its resident memory exceeds `max_rss_mb`.

Protocol, on a Unix socket that is the server's stdin: the request
`{"run": <invocation>}` + newline carries the write ends of the step's stdout and
stderr (SCM_RIGHTS); the replies are `{"started": {"pid": P, ...}}`, then
`{"exited": {"pid": P, "code": C, "signal": S, ...}}`, or `{"not_started":
{"message": M}}`, one JSON line each.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

# After the server said `exited`, how long the step's output pipes may take to drain.
DRAIN_SECONDS = 2.0

# What a server is started with: binary, the variables it gets on top of the worker's
# environment, working directory. Steps only go to a server of the same flavor.
Flavor = tuple[str, "tuple[tuple[str, str], ...] | None", "str | None"]


class ServerLost(Exception):
    """The step server ended (or broke the protocol) before the step was over."""


class StepServer:
    """One `<binary> step-server` process and this side of its socket."""

    def __init__(self, flavor: Flavor) -> None:
        binary, env, cwd = flavor
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [binary, "step-server"],
                stdin=theirs,
                stdout=subprocess.DEVNULL,
                env=dict(os.environ, **dict(env)) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        finally:
            theirs.close()
        self.flavor = flavor
        self.sock = ours
        self.buf = b""
        self.steps = 0
        self.lost = False

    def request(self, invocation: str, stdout_w: int, stderr_w: int) -> None:
        line = b'{"run":' + invocation.encode("utf-8") + b"}\n"
        try:
            socket.send_fds(self.sock, [line[:1]], [stdout_w, stderr_w])
            self.sock.sendall(line[1:])
        except OSError as e:
            self.lost = True
            raise ServerLost("cannot reach step server %d: %s" % (self.proc.pid, e)) from e

    def reply(self) -> dict[str, Any]:
        """The next reply line."""
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                self.lost = True
                code = self.proc.poll()
                raise ServerLost("step server %d ended (%s)" % (self.proc.pid, describe(code)))
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError as e:
            self.lost = True
            raise ServerLost("step server %d sent %r" % (self.proc.pid, line[:200])) from e

    def rss_mb(self) -> int:
        try:
            with open("/proc/%d/statm" % self.proc.pid, encoding="ascii") as f:
                pages = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            return 0
        return pages * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def describe(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return "killed by signal %d" % -code
    return "exit status %d" % code


class Pool:
    """A worker's idle servers per binary, and the thread that starts new ones."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: dict[Flavor, list[StepServer]] = {}
        self.starts: queue.Queue[tuple[Flavor, queue.Queue[Any]]] = queue.Queue()
        self.starter: threading.Thread | None = None

    def _starter(self) -> None:
        while True:
            flavor, reply = self.starts.get()
            try:
                reply.put(StepServer(flavor))
            except BaseException as e:  # noqa: BLE001 - handed to the task that asked
                reply.put(e)

    def take(self, flavor: Flavor) -> StepServer:
        with self.lock:
            idle = self.idle.get(flavor) or []
            while idle:
                server = idle.pop()
                if server.proc.poll() is None:
                    return server
                server.close()
            if self.starter is None:
                self.starter = threading.Thread(target=self._starter, name="solidflow-step-servers", daemon=True)
                self.starter.start()
        reply: queue.Queue[Any] = queue.Queue()
        self.starts.put((flavor, reply))
        got = reply.get()
        if isinstance(got, BaseException):
            raise got
        return got

    def give_back(self, server: StepServer, max_steps: int, max_rss_mb: int) -> None:
        due = server.lost or server.proc.poll() is not None
        due = due or (max_steps > 0 and server.steps >= max_steps)
        due = due or (max_rss_mb > 0 and server.rss_mb() > max_rss_mb)
        if due:
            server.close()
            return
        with self.lock:
            self.idle.setdefault(server.flavor, []).append(server)

    def close(self) -> None:
        with self.lock:
            servers = [s for idle in self.idle.values() for s in idle]
            self.idle.clear()
        for s in servers:
            s.close()


def pool_of(worker: Any) -> Pool:
    """The worker's pool, created on first use (`setdefault` is atomic, and a Pool
    starts no thread until it is used)."""
    pool = worker.__dict__.get("_solidflow_step_servers")
    if pool is None:
        pool = worker.__dict__.setdefault("_solidflow_step_servers", Pool())
    return pool


class WarmProcess:
    """A step forked by a step server (or run in it), with what `run_command` uses of
    a Popen: `pid` (also its process group), `stdin` (None: the invocation went with
    the request), `stdout`/`stderr` (pipes), `poll()` and `wait()`; and `follow()`, which
    runs it to its end on one thread."""

    stdin = None

    def __init__(self, pool: Pool, server: StepServer, invocation: str, options: dict[str, Any]) -> None:
        self.pool, self.server, self.options = pool, server, options
        self.returncode: int | None = None
        self.forked = False
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            server.request(invocation, out_w, err_w)
        except ServerLost:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            pool.give_back(server, 0, 0)
            raise
        os.close(out_w)
        os.close(err_w)
        self.stdout = os.fdopen(out_r, "rb")
        self.stderr = os.fdopen(err_r, "rb")
        try:
            msg = server.reply()
        except ServerLost:
            self._close_pipes()
            pool.give_back(server, 0, 0)
            raise
        if "started" not in msg:
            self._close_pipes()
            pool.give_back(server, 0, 0)
            message = (msg.get("not_started") or {}).get("message") or repr(msg)
            raise ServerLost(message)
        self.pid = int(msg["started"]["pid"])
        self.forked = bool(msg["started"].get("forked"))
        # The step runs in the server process itself: its pid and group are the server's.
        self.in_server = bool(msg["started"].get("in_server"))
        self._lock = threading.Lock()

    def _close_pipes(self) -> None:
        for f in (self.stdout, self.stderr):
            with contextlib.suppress(OSError):
                f.close()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self) -> int:
        """Waits for the server's `exited` (the step and what it left are gone)."""
        with self._lock:
            if self.returncode is not None:
                return self.returncode
            try:
                self._ended(self.server.reply())
            except ServerLost:
                self._ended(None)
            return self.returncode  # type: ignore[return-value]

    def follow(self, line: Callable[[str, str], None], due: Callable[[], float | None]) -> int:
        """Runs the step to its end on the calling thread: reads both output pipes and
        the server's socket with one `poll`, hands every output line (without its line
        end) to `line(stream, text)`, and calls `due()` whenever poll wakes up; `due`
        returns how many seconds poll may sleep (None: until something comes). Returns
        the exit code like `wait` once the server said `exited` and the pipes are
        drained (or DRAIN_SECONDS after that)."""
        with self._lock:
            if self.returncode is not None:
                return self.returncode
            streams = {self.stdout.fileno(): "stdout", self.stderr.fileno(): "stderr"}
            partial = dict.fromkeys(streams, b"")
            sock = self.server.sock.fileno()
            poller = select.poll()
            for fd in (*streams, sock):
                poller.register(fd, select.POLLIN)
            drain_until: float | None = None
            while streams:
                if self.returncode is None and b"\n" in self.server.buf:
                    self._reply_or_lost(poller, sock)
                    continue
                wait = due()
                if self.returncode is not None:
                    if drain_until is None:
                        drain_until = time.monotonic() + DRAIN_SECONDS
                    left = drain_until - time.monotonic()
                    if left <= 0:
                        break
                    wait = left if wait is None else min(wait, left)
                timeout = None if wait is None else max(0, int(wait * 1000) + 1)
                for fd, _ in poller.poll(timeout):
                    if fd == sock:
                        if self.returncode is None:
                            self._read_socket(poller, sock)
                        continue
                    stream = streams.get(fd)
                    if stream is None:
                        continue
                    try:
                        data = os.read(fd, 65536)
                    except InterruptedError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        poller.unregister(fd)
                        del streams[fd]
                        if partial[fd]:
                            line(stream, partial[fd].decode("utf-8", "replace"))
                        continue
                    *lines, partial[fd] = (partial[fd] + data).split(b"\n")
                    for raw in lines:
                        line(stream, raw.decode("utf-8", "replace"))
            if self.returncode is None:  # pipes closed first (cannot happen before exit)
                try:
                    self._ended(self.server.reply())
                except ServerLost:
                    self._ended(None)
            self._close_pipes()
            return self.returncode  # type: ignore[return-value]

    def _read_socket(self, poller: Any, sock: int) -> None:
        try:
            chunk = self.server.sock.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:
            self.server.lost = True
            poller.unregister(sock)
            self._ended(None)
            return
        self.server.buf += chunk
        if b"\n" in self.server.buf:
            self._reply_or_lost(poller, sock)

    def _reply_or_lost(self, poller: Any, sock: int) -> None:
        poller.unregister(sock)
        try:
            self._ended(self.server.reply())
        except ServerLost:
            self._ended(None)

    def _ended(self, msg: dict[str, Any] | None) -> None:
        """Records how the step ended (`msg`: the server's `exited`; None: the server
        was lost) and gives the server back."""
        server = self.server
        if msg is None and self.in_server:
            # The step ran in the server: the server's end is the step's (a crash
            # keeps its signal, as for a process of its own).
            try:
                self.returncode = server.proc.wait(timeout=DRAIN_SECONDS)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                self.returncode = server.proc.wait()
        elif msg is None:
            # The step's process died with its server (PR_SET_PDEATHSIG).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            self.returncode = -signal.SIGKILL
        else:
            exited = msg.get("exited") or {}
            if exited.get("retire"):
                server.lost = True  # it ends after this step (the step left threads)
            if exited.get("signal") is not None:
                self.returncode = -int(exited["signal"])
            else:
                self.returncode = int(exited.get("code") or 0)
        server.steps += 1
        self.pool.give_back(
            server,
            int(self.options.get("max_steps") or 0),
            int(self.options.get("max_rss_mb") or 0),
        )


def start_step(
    worker: Any,
    command: list[str],
    env: dict[str, str] | None,
    cwd: str | None,
    invocation: str,
    options: dict[str, Any],
) -> WarmProcess:
    """Starts one step on a warm server of `command[0]` on this worker (`command` is
    `[binary, "step"]`; the server is `binary step-server`, with `env` on top of the
    worker's environment). Raises OSError (like Popen) when no server can be started
    or reached."""
    pool = pool_of(worker)
    flavor: Flavor = (command[0], tuple(sorted(env.items())) if env is not None else None, cwd or None)
    last: Exception | None = None
    for _ in range(2):  # an idle server may have died since: one more, fresh
        server = pool.take(flavor)
        try:
            return WarmProcess(pool, server, invocation, options)
        except ServerLost as e:
            last = e
    raise OSError("no warm step server could start the step: %s" % last)
