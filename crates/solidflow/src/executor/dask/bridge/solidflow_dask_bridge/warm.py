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

import asyncio
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
        # The read ends of the pipes the server keeps for `run_on_kept_pipes` requests
        # (non-blocking; stdout, stderr), once a request handed them over.
        self.kept: tuple[int, int] | None = None

    def request(self, invocation: str, stdout_w: int, stderr_w: int) -> None:
        """A `run` request with the step's own pipes (closed by the server after it)."""
        line = b'{"run":' + invocation.encode("utf-8") + b"}\n"
        try:
            socket.send_fds(self.sock, [line[:1]], [stdout_w, stderr_w])
            self.sock.sendall(line[1:])
        except OSError as e:
            self.lost = True
            raise ServerLost("cannot reach step server %d: %s" % (self.proc.pid, e)) from e

    def request_on_kept_pipes(self, invocation: str) -> tuple[int, int]:
        """A `run_on_kept_pipes` request: the first one hands the server a pair of
        pipes it keeps, later ones send no descriptors. Returns the pipes' read ends."""
        line = b'{"run_on_kept_pipes":' + invocation.encode("utf-8") + b"}\n"
        try:
            if self.kept is not None:
                self.sock.sendall(line)
                return self.kept
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            try:
                socket.send_fds(self.sock, [line[:1]], [out_w, err_w])
            except OSError:
                os.close(out_r)
                os.close(err_r)
                raise
            finally:
                os.close(out_w)
                os.close(err_w)
            os.set_blocking(out_r, False)
            os.set_blocking(err_r, False)
            self.kept = (out_r, err_r)
            self.sock.sendall(line[1:])
            return self.kept
        except OSError as e:
            self.lost = True
            raise ServerLost("cannot reach step server %d: %s" % (self.proc.pid, e)) from e

    def read_some(self, block: bool = True) -> None:
        """Reads what the socket holds into `buf` (`block`: waits until something
        comes; else returns at once when nothing is there); at the end of the stream
        the server is `lost`."""
        try:
            chunk = self.sock.recv(65536, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.lost = True
        self.buf += chunk

    def reply(self) -> dict[str, Any]:
        """The next reply line."""
        while b"\n" not in self.buf:
            self.read_some()
            if self.lost and b"\n" not in self.buf:
                code = self.proc.poll()
                raise ServerLost("step server %d ended (%s)" % (self.proc.pid, describe(code)))
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
        kept, self.kept = self.kept, None
        for fd in kept or ():
            with contextlib.suppress(OSError):
                os.close(fd)
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

    def take_idle(self, flavor: Flavor) -> StepServer | None:
        """An idle server of `flavor`, if one is alive; never blocks."""
        with self.lock:
            idle = self.idle.get(flavor) or []
            while idle:
                server = idle.pop()
                if server.proc.poll() is None:
                    return server
                server.close()
        return None

    def take(self, flavor: Flavor) -> StepServer:
        """An idle server of `flavor`, or a new one (blocks while it starts)."""
        server = self.take_idle(flavor)
        if server is not None:
            return server
        with self.lock:
            if self.starter is None:
                self.starter = threading.Thread(target=self._starter, name="solidflow-step-servers", daemon=True)
                self.starter.start()
        reply: queue.Queue[Any] = queue.Queue()
        self.starts.put((flavor, reply))
        got = reply.get()
        if isinstance(got, BaseException):
            raise got
        return got

    def give_back(self, server: StepServer, max_steps: int, max_rss_mb: int, wait: bool = True) -> None:
        """Keeps `server` for the next step, or stops it when it is lost or due to be
        recycled; `wait=False` (on an event loop) waits for its exit on a thread."""
        due = server.lost or server.proc.poll() is not None
        due = due or (max_steps > 0 and server.steps >= max_steps)
        due = due or (max_rss_mb > 0 and server.rss_mb() > max_rss_mb)
        if due:
            if wait:
                server.close()
            else:
                threading.Thread(target=server.close, name="solidflow-step-server-close", daemon=True).start()
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

    def __init__(
        self, pool: Pool, server: StepServer, invocation: str, options: dict[str, Any], on_loop: bool = False
    ) -> None:
        """Sends the step's request to `server`; `started` (or `started_async`) then
        waits for the server's answer. `on_loop`: used from an asyncio event loop, so
        nothing may block for long (a server that is stopped is waited for on a thread)."""
        self.pool, self.server, self.options, self.on_loop = pool, server, options, on_loop
        self.returncode: int | None = None
        self.forked = False
        self.in_server = False
        self.pid = server.proc.pid
        self._lock = threading.Lock()
        # Called when the step's end is known, before the server goes back to the pool
        # (set by a follower that reads kept pipes: what the step wrote is read first).
        self.on_end: Callable[[], None] | None = None
        self.stdout: Any = None
        self.stderr: Any = None
        # On a loop the step writes to the server's kept pipes (see `ServerRequest` in
        # the Rust crate): no pipes to make and pass per step.
        self.kept: tuple[int, int] | None = None
        # This request hands the server the pipes it is to keep.
        self.hands_pipes = on_loop and server.kept is None
        if on_loop:
            try:
                self.kept = server.request_on_kept_pipes(invocation)
            except ServerLost:
                self._give_back()
                raise
            return
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            server.request(invocation, out_w, err_w)
        except ServerLost:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            self._give_back()
            raise
        os.close(out_w)
        os.close(err_w)
        self.stdout = os.fdopen(out_r, "rb")
        self.stderr = os.fdopen(err_r, "rb")

    def started(self) -> None:
        """Reads the server's answer to the request: the step's pid, or ServerLost."""
        server = self.server
        try:
            msg = server.reply()
        except ServerLost:
            self._close_pipes()
            self._give_back()
            raise
        if "started" not in msg:
            if self.hands_pipes:
                # It may not have kept the pipes (a request it could not read): the
                # next step goes to a new server, which gets new ones.
                server.lost = True
            self._close_pipes()
            self._give_back()
            message = (msg.get("not_started") or {}).get("message") or repr(msg)
            raise ServerLost(message)
        self.pid = int(msg["started"]["pid"])
        self.forked = bool(msg["started"].get("forked"))
        # The step runs in the server process itself: its pid and group are the server's.
        self.in_server = bool(msg["started"].get("in_server"))

    def _give_back(self) -> None:
        self.pool.give_back(
            self.server,
            int(self.options.get("max_steps") or 0),
            int(self.options.get("max_rss_mb") or 0),
            wait=not self.on_loop,
        )

    def _close_pipes(self) -> None:
        for f in (self.stdout, self.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self) -> int:
        """Waits for the server's `exited` (the step and what it left are gone)."""
        with self._lock:
            if self.returncode is None:
                try:
                    self._ended(self.server.reply())
                except ServerLost:
                    self._ended(None)
            return self.returncode  # type: ignore[return-value]

    def _take_replies(self) -> None:
        """Handles the replies `buf` holds, and a lost server."""
        server = self.server
        while self.returncode is None and b"\n" in server.buf:
            try:
                self._ended(server.reply())
            except ServerLost:
                self._ended(None)
        if self.returncode is None and server.lost:
            self._ended(None)

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
            follower = _Follower(self, line)
            poller = select.poll()
            polled: set[int] = set()
            while True:
                wait = follower.timeout(due)
                if follower.done:
                    break
                watched = follower.watched()
                for fd in polled - watched:
                    poller.unregister(fd)
                for fd in watched - polled:
                    poller.register(fd, select.POLLIN)
                polled = watched
                timeout = None if wait is None else max(0, int(wait * 1000) + 1)
                for fd, _ in poller.poll(timeout):
                    follower.ready(fd)
            return follower.finish()

    async def follow_async(self, line: Callable[[str, str], None], due: Callable[[], float | None]) -> int:
        """`follow` on the running asyncio loop (a Dask worker's event loop) instead of
        a thread of its own: the same reads and calls, driven by `add_reader`."""
        loop = asyncio.get_running_loop()
        follower = _Follower(self, line)
        ready: dict[int, None] = {}
        waiter: asyncio.Future[None] | None = None

        def on_ready(fd: int) -> None:
            ready[fd] = None
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        watched_now: set[int] = set()
        if self.kept is not None:

            def on_end() -> None:
                # Before the server goes back: the kept pipes are read to the end and
                # no longer watched (a lost server's pipes are closed on a thread).
                follower.drain()
                for fd in watched_now:
                    loop.remove_reader(fd)
                watched_now.clear()

            self.on_end = on_end
        try:
            while True:
                wait = follower.timeout(due)
                if follower.done:
                    break
                watched = follower.watched()
                for fd in watched_now - watched:
                    loop.remove_reader(fd)
                    ready.pop(fd, None)
                for fd in watched - watched_now:
                    loop.add_reader(fd, on_ready, fd)
                watched_now = watched
                if not ready:
                    waiter = loop.create_future()
                    timer = loop.call_later(wait, _wake, waiter) if wait is not None else None
                    try:
                        await waiter
                    finally:
                        if timer is not None:
                            timer.cancel()
                        waiter = None
                fds = list(ready)
                ready.clear()
                for fd in fds:
                    if fd in follower.watched():
                        follower.ready(fd)
        finally:
            for fd in watched_now:
                loop.remove_reader(fd)
        return follower.finish()

    async def started_async(self) -> None:
        """Waits on the running asyncio loop for the server's reply to the request
        (see `started`)."""
        loop = asyncio.get_running_loop()
        server = self.server
        while b"\n" not in server.buf and not server.lost:
            await _readable(loop, server.sock.fileno())
            server.read_some(block=False)
        self.started()

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
            # What is left in the server's group is the step's (the server was its own
            # group): it dies with the step, as the server would have killed it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(server.proc.pid, signal.SIGKILL)
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
        if self.on_end is not None:
            self.on_end()
        self._give_back()


class _Follower:
    """What `follow` and `follow_async` share: which descriptors to wait on, how long,
    and what to do with each one that is readable. The step is over (`done`) once the
    server said how it ended and both pipes are drained, or DRAIN_SECONDS after it
    ended."""

    def __init__(self, proc: WarmProcess, line: Callable[[str, str], None]) -> None:
        self.proc, self.line = proc, line
        if proc.kept is not None:
            # The server's kept pipes: they stay open, so the step's output ends with
            # its `exited` reply; it is read to the end before the server is given back.
            self.streams = {proc.kept[0]: "stdout", proc.kept[1]: "stderr"}
            proc.on_end = self.drain
        else:
            self.streams = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
        # Reads never block: an event loop may report a descriptor readable again
        # after its data was read (the report came before the read).
        for fd in self.streams:
            os.set_blocking(fd, False)
        self.partial = dict.fromkeys(self.streams, b"")
        self.sock = proc.server.sock.fileno()
        self.drain_until: float | None = None
        self.done = False

    def watched(self) -> set[int]:
        fds = set(self.streams)
        if self.proc.returncode is None:
            fds.add(self.sock)
        return fds

    def timeout(self, due: Callable[[], float | None]) -> float | None:
        """Calls `due()`; returns how long to wait for a descriptor (None: no limit).
        Sets `done` when there is nothing more to wait for."""
        proc = self.proc
        proc._take_replies()
        wait = due()
        if proc.returncode is not None:
            if not self.streams or proc.kept is not None:
                self.done = True
                return None
            if self.drain_until is None:
                self.drain_until = time.monotonic() + DRAIN_SECONDS
            left = self.drain_until - time.monotonic()
            if left <= 0:
                self.done = True
                return None
            wait = left if wait is None else min(wait, left)
        return wait

    def ready(self, fd: int) -> None:
        if fd == self.sock:
            if self.proc.returncode is None:
                self.proc.server.read_some(block=False)
            return
        self._read(fd)

    def _read(self, fd: int) -> bool:
        """One read of a step's pipe; False when there was nothing (more) to read."""
        stream = self.streams.get(fd)
        if stream is None:
            return False
        try:
            data = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        if not data:
            del self.streams[fd]
            if self.partial[fd]:
                self.line(stream, self.partial[fd].decode("utf-8", "replace"))
            return False
        *lines, self.partial[fd] = (self.partial[fd] + data).split(b"\n")
        for raw in lines:
            self.line(stream, raw.decode("utf-8", "replace"))
        return True

    def drain(self) -> None:
        """Reads the kept pipes until they are empty, and ends the step's last lines."""
        for fd in list(self.streams):
            while fd in self.streams and self._read(fd):
                pass
        for fd, stream in self.streams.items():
            if self.partial[fd]:
                self.line(stream, self.partial[fd].decode("utf-8", "replace"))
                self.partial[fd] = b""
        self.streams = {}

    def finish(self) -> int:
        self.proc._close_pipes()
        return self.proc.returncode  # type: ignore[return-value]


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Waits until `fd` is readable, on the running loop."""
    waiter: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _wake, waiter)
    try:
        await waiter
    finally:
        loop.remove_reader(fd)


def flavor_of(command: list[str], env: dict[str, str] | None, cwd: str | None) -> Flavor:
    return (command[0], tuple(sorted(env.items())) if env is not None else None, cwd or None)


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
    flavor = flavor_of(command, env, cwd)
    last: Exception | None = None
    for _ in range(2):  # an idle server may have died since: one more, fresh
        server = pool.take(flavor)
        try:
            proc = WarmProcess(pool, server, invocation, options)
            proc.started()
            return proc
        except ServerLost as e:
            last = e
    raise OSError("no warm step server could start the step: %s" % last)


async def start_step_async(
    worker: Any,
    command: list[str],
    env: dict[str, str] | None,
    cwd: str | None,
    invocation: str,
    options: dict[str, Any],
) -> WarmProcess:
    """`start_step` on the worker's event loop: takes an idle server without blocking
    (a new one starts on a thread) and awaits the server's answer."""
    pool = pool_of(worker)
    flavor = flavor_of(command, env, cwd)
    last: Exception | None = None
    for _ in range(2):
        server = pool.take_idle(flavor) or await asyncio.to_thread(pool.take, flavor)
        try:
            proc = WarmProcess(pool, server, invocation, options, on_loop=True)
            await proc.started_async()
            return proc
        except ServerLost as e:
            last = e
    raise OSError("no warm step server could start the step: %s" % last)
