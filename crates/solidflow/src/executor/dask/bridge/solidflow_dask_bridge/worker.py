"""Code that runs on the Dask workers.

The server registers this module with cloudpickle's `register_pickle_by_value`, so
its functions and classes travel by value: workers need `distributed` and nothing
solidflow-specific. At connect the server installs `run_command` on every worker
once, as a worker plugin; each task then ships only the small `task` trampoline.
A shipped build is fetched from the scheduler when a task first needs it (shipping.py).
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any

from .shipping import ensure_build, verified_build
from .warm import start_step, start_step_async

# A stdout/stderr line longer than this is sent as several events (the last one
# without "more": true) and reassembled by the server, so that every Dask event stays
# small: the scheduler keeps the last ~1000 events of each topic in memory.
CHUNK_CHARS = 32 * 1024
# How many trailing stderr lines / characters a finished task reports.
STDERR_TAIL_LINES = 40
STDERR_TAIL_CHARS = 8 * 1024
# A step's output lines are sent in batches: at most this long after the first line
# of a batch (so a line reaches the parent within moments), or when the batch holds
# CHUNK_CHARS characters, and the last batch together with the step's end.
FLUSH_SECONDS = 0.02
# Stdin up to this size is written without a feeder thread (a pipe holds at least
# one page).
SMALL_STDIN = 4096
# After the step process exited, how long its output pipes may take to drain.
DRAIN_SECONDS = 2.0


def worker_state(worker: Any) -> dict[str, Any]:
    """Per-worker registry of running step processes, shared by tasks and cancel."""
    state = worker.__dict__.get("_solidflow_state")
    if state is None:
        state = worker.__dict__.setdefault(
            "_solidflow_state",
            {"lock": threading.Lock(), "procs": {}, "cancelled": set()},
        )
    return state


def kill_group(proc: Any, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def kill_keys(keys: list[str], grace: float, dask_worker: Any = None) -> list[str]:
    """Run on every worker by `cancel`: SIGTERM the process groups of these keys,
    SIGKILL them after `grace` seconds, and make tasks that have not started yet
    refuse to start. Returns the keys whose process was signaled."""
    from distributed import get_worker

    worker = dask_worker if dask_worker is not None else get_worker()
    state = worker_state(worker)
    killed = []
    with state["lock"]:
        for key in keys:
            state["cancelled"].add(key)
            proc = state["procs"].get(key)
            if proc is not None and proc.poll() is None:
                kill_group(proc, signal.SIGTERM)
                killed.append(key)
                timer = threading.Timer(grace, kill_group, args=(proc, signal.SIGKILL))
                timer.daemon = True
                timer.start()
    return killed


def set_allowed_failures(n: int, dask_scheduler: Any = None) -> int:
    """Run on the scheduler: how many worker deaths a task survives."""
    dask_scheduler.allowed_failures = n
    return n


class _Batch:
    """A task's outgoing events: its "start", output lines and "end", in order.

    An event goes out FLUSH_SECONDS after the first line it holds (or when it is
    full), and the last batch goes out with the "end" record. So a short step costs
    one Dask event, and the server reports it done as soon as that event arrives.
    """

    def __init__(self, worker: Any, topic: str, key: str, token: str, flusher: bool = True) -> None:
        self.worker, self.topic, self.key, self.token = worker, topic, key, token
        self.cond = threading.Condition()
        self.start: dict[str, Any] | None = None
        self.lines: list[list[Any]] = []
        self.chars = 0
        self.since: float | None = None
        self.closed = False
        self.events = 0
        # Without a flusher thread, whoever reads the output calls `due()` instead.
        self.flusher: threading.Thread | None = None
        if flusher:
            self.flusher = threading.Thread(target=self._flush_loop, daemon=True)
            self.flusher.start()

    def _send_locked(self, extra: dict[str, Any] | None = None) -> None:
        payload: dict[str, Any] = {"key": self.key, "token": self.token, "worker": self.worker.address}
        if self.start is not None:
            payload["start"] = self.start
        if self.lines:
            payload["lines"] = self.lines
        if extra:
            payload.update(extra)
        self.start, self.lines, self.chars, self.since = None, [], 0, None
        self.events += 1
        if "end" in payload:
            payload["end"]["events"] = self.events
        self.worker.log_event(self.topic, payload)

    def _add_locked(self, start: dict[str, Any] | None = None, line: list[Any] | None = None) -> None:
        if self.since is None:
            self.since = time.monotonic()
            self.cond.notify()
        if start is not None:
            self.start = start
        if line is not None:
            self.lines.append(line)
            self.chars += len(line[1])
            if self.chars >= CHUNK_CHARS:
                self._send_locked()

    def started(self, pid: int) -> None:
        with self.cond:
            self._add_locked(start={"pid": pid, "host": self.worker.address})

    def line(self, stream: str, text: str) -> None:
        with self.cond:
            if len(text) <= CHUNK_CHARS:
                self._add_locked(line=[stream, text, False])
                return
            for at in range(0, len(text), CHUNK_CHARS):
                more = at + CHUNK_CHARS < len(text)
                self._add_locked(line=[stream, text[at : at + CHUNK_CHARS], more])

    def _flush_loop(self) -> None:
        with self.cond:
            while not self.closed:
                if self.since is None:
                    self.cond.wait()
                    continue
                left = self.since + FLUSH_SECONDS - time.monotonic()
                if left > 0:
                    self.cond.wait(left)
                    continue
                self._send_locked()

    def due(self) -> float | None:
        """Sends the batch if it is due; returns the seconds until the next one is due
        (None: nothing is waiting). For a batch without a flusher thread."""
        with self.cond:
            if self.since is None:
                return None
            left = self.since + FLUSH_SECONDS - time.monotonic()
            if left > 0:
                return left
            self._send_locked()
            return None

    def end(self, result: dict[str, Any]) -> int:
        """Sends the last batch with the end record; returns how many events went out."""
        with self.cond:
            self.closed = True
            self.cond.notify()
        if self.flusher is not None:
            self.flusher.join()
        with self.cond:
            self._send_locked({"end": dict(result)})
            return self.events


def _resolve_command(command: list[str], worker: Any) -> list[str]:
    command = list(command)
    if command and command[0].startswith("{uploaded:") and command[0].endswith("}"):
        command[0] = ensure_build(worker, command[0][len("{uploaded:") : -1])
    return command


class Tees:
    """Best-effort complete copies of the output on the worker's disk, appended to, so
    a retry adds to the record. The live stream is capped by the scheduler; these
    copies are not.

    A stream's file is opened when its first line comes (most steps write nothing to
    stderr, and creating a file is the costliest part of a copy), written through a
    buffer, and flushed when the step ends. Lines come from one thread (the task's
    reader) or from the two reader threads of a process, one per stream."""

    def __init__(self, log_files: dict[str, str]) -> None:
        self.paths = {s: p for s, p in (log_files or {}).items() if s in ("stdout", "stderr") and p}
        self.files: dict[str, Any] = {}
        self.locks = {"stdout": threading.Lock(), "stderr": threading.Lock()}

    def line(self, stream: str, text: str) -> None:
        path = self.paths.get(stream)
        if path is None:
            return
        with self.locks[stream], contextlib.suppress(OSError, ValueError):
            f = self.files.get(stream)
            if f is None:
                try:
                    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                    f = self.files[stream] = open(path, "a", encoding="utf-8")  # noqa: SIM115
                except OSError:
                    self.paths.pop(stream, None)  # not writable: no copy of this stream
                    return
            f.write(text + "\n")

    def close(self) -> dict[str, str]:
        """Flushes and closes the copies; returns the files written, by stream."""
        for stream, f in self.files.items():
            with self.locks[stream], contextlib.suppress(OSError):
                f.close()
        return {stream: f.name for stream, f in self.files.items()}


def not_succeeded(after: tuple[Any, ...]) -> str | None:
    """The key of the first upstream result in `after` (the results of the tasks a task
    submitted with `after` waited for) whose command did not run to exit status 0, or
    None when they all did."""
    for result in after:
        ok = (
            isinstance(result, dict)
            and "not_started" not in result
            and "withdrawn" not in result
            and result.get("exit_code") == 0
            and result.get("signal") is None
        )
        if not ok:
            return str(result.get("key")) if isinstance(result, dict) else repr(result)
    return None


class _Run:
    """One task's run of its step, up to the process: what `run_command` and
    `run_command_async` share."""

    def __init__(self, spec: dict[str, Any], worker: Any, command: list[str]) -> None:
        import uuid

        self.spec, self.worker, self.command = spec, worker, command
        self.key = spec["key"]
        self.state = worker_state(worker)
        self.token = uuid.uuid4().hex
        self.warm = spec.get("warm")
        # What the command gets on top of the worker's environment.
        self.extra_env: dict[str, str] | None = None
        parent_pid_env = spec.get("parent_pid_env")
        if spec.get("env") or parent_pid_env:
            self.extra_env = {str(k): str(v) for k, v in (spec.get("env") or {}).items()}
            if parent_pid_env:
                self.extra_env[str(parent_pid_env)] = str(os.getpid())
        self.tees = Tees(spec.get("log_files") or {})
        self.started = time.time()
        self.tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.batch: _Batch | None = None
        with self.state["lock"]:
            if self.key in self.state["cancelled"]:
                self.tees.close()
                raise RuntimeError("step %s was canceled before it started" % self.key)

    def not_started(self, e: OSError) -> dict[str, Any]:
        self.tees.close()
        return {
            "key": self.key,
            "token": self.token,
            "not_started": "could not start %r on worker %s: %s" % (self.command, self.worker.address, e),
        }

    def running(self, proc: Any) -> None:
        """Registers the started process (for cancel) and sends its "start"."""
        with self.state["lock"]:
            self.state["procs"][self.key] = proc
            if self.key in self.state["cancelled"]:
                # Canceled while it was starting: it has not done anything worth a grace.
                kill_group(proc, signal.SIGKILL)
        # Without a flusher thread, the warm follow loop calls `due()`.
        self.batch = _Batch(self.worker, self.spec["log_topic"], self.key, self.token, flusher=self.warm is None)
        self.batch.started(proc.pid)

    def on_line(self, stream: str, text: str) -> None:
        if stream == "stderr":
            self.tail.append(text)
        self.tees.line(stream, text)
        self.batch.line(stream, text)  # type: ignore[union-attr]

    def warm_over(self, proc: Any) -> None:
        # The server killed what the step left; a step that ran in the server shares
        # its group, which must live on.
        if not proc.in_server:
            kill_group(proc, signal.SIGKILL)
        with self.state["lock"]:
            self.state["procs"].pop(self.key, None)

    def result(self, returncode: int) -> dict[str, Any]:
        log_files = self.tees.close()
        result = {
            "key": self.key,
            "token": self.token,
            "exit_code": returncode if returncode >= 0 else None,
            "signal": -returncode if returncode < 0 else None,
            "worker": self.worker.address,
            "stderr_tail": "\n".join(self.tail)[-STDERR_TAIL_CHARS:],
            "duration": time.time() - self.started,
            "log_files": log_files,
        }
        result["events"] = self.batch.end(result)  # type: ignore[union-attr]
        return result


def withdrawn(spec: dict[str, Any], after: tuple[Any, ...]) -> dict[str, Any] | None:
    failed_upstream = not_succeeded(after)
    if failed_upstream is None:
        return None
    key = spec["key"]
    return {"key": key, "withdrawn": "%s did not succeed, so %s did not run" % (failed_upstream, key)}


def run_command(spec: dict[str, Any], *after: Any) -> dict[str, Any]:
    """The Dask task: run one step's command on this worker.

    `after` holds the results of the tasks it was submitted after (Dask passes them
    when they ended): if one did not succeed, the command does not run and the result
    is {"withdrawn": message}.

    Everything the server needs travels in the task's event topic, in order: the
    "start" (pid), the output lines, and the "end" record (exit code, stderr tail, ...).
    The task is done when its process exits: leftovers in its process group are killed
    then, so a child that still holds the output pipes cannot hold the task. A command
    that cannot start returns {"not_started": message} and sends no events.
    """
    import subprocess

    from distributed import get_worker

    early = withdrawn(spec, after)
    if early is not None:
        return early
    worker = get_worker()
    run = _Run(spec, worker, _resolve_command(spec["command"], worker))
    command, extra_env = run.command, run.extra_env

    # If the worker process dies (kill -9, OOM), take the step down with it instead
    # of leaving an orphan that keeps writing while Dask retries it elsewhere. A
    # command that does this itself when it finds its parent's pid in
    # `parent_pid_env` (solidflow's step mode does) is started without a
    # preexec_fn: that lets Python use vfork, which costs ~0.1 ms in a big worker
    # process instead of ~10 ms for a fork.
    libc = None
    if sys.platform.startswith("linux") and not spec.get("parent_pid_env"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            libc = None
    parent_pid = os.getpid()

    def preexec() -> None:
        if libc is not None:
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            if os.getppid() != parent_pid:
                os._exit(137)

    try:
        if run.warm is not None:
            # The invocation goes to a warm step server, which forks the step. Not
            # under the state lock: a cancel meanwhile is caught by `running`.
            proc: Any = start_step(worker, command, extra_env, spec.get("cwd"), spec.get("stdin") or "", run.warm)
        else:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=spec.get("cwd") or None,
                env=dict(os.environ, **extra_env) if extra_env is not None else None,
                start_new_session=True,
                preexec_fn=preexec if libc is not None else None,
            )
    except OSError as e:
        return run.not_started(e)
    run.running(proc)
    if run.warm is not None:
        # One thread (this one) for the step's pipes, the server's replies and the
        # batches: no threads to start per step.
        try:
            returncode = proc.follow(run.on_line, run.batch.due)  # type: ignore[union-attr]
        finally:
            run.warm_over(proc)
    else:
        returncode, readers = _follow_popen(proc, spec, run.on_line, run.state, run.key)
        deadline = time.monotonic() + DRAIN_SECONDS
        for t in readers:
            t.join(max(0.0, deadline - time.monotonic()))
    return run.result(returncode)


async def run_command_async(spec: dict[str, Any], *after: Any) -> dict[str, Any]:
    """`run_command` for a step on a warm step server, run on the worker's event loop
    (distributed awaits a coroutine task there instead of handing it to its thread
    pool): the step's pipes and the server's socket are watched by the loop, and its
    events are sent from the loop. That saves the thread hand-off and a cross-thread
    wake-up per event, about half of the worker's CPU per step. Anything that could
    block (starting a server, fetching a build) runs on a thread."""
    import asyncio

    from distributed import get_worker

    early = withdrawn(spec, after)
    if early is not None:
        return early
    worker = get_worker()
    command = list(spec["command"])
    if command and command[0].startswith("{uploaded:") and command[0].endswith("}"):
        sha = command[0][len("{uploaded:") : -1]
        command[0] = verified_build(worker, sha) or await asyncio.to_thread(ensure_build, worker, sha)
    run = _Run(spec, worker, command)
    try:
        proc = await start_step_async(
            worker, command, run.extra_env, spec.get("cwd"), spec.get("stdin") or "", run.warm or {}
        )
    except OSError as e:
        return run.not_started(e)
    run.running(proc)
    try:
        returncode = await proc.follow_async(run.on_line, run.batch.due)  # type: ignore[union-attr]
    finally:
        run.warm_over(proc)
    return run.result(returncode)


def _follow_popen(
    proc: Any, spec: dict[str, Any], on_line: Any, state: dict[str, Any], key: str
) -> tuple[int, list[threading.Thread]]:
    """Feeds a started `<binary> step` its stdin, reads its pipes on two threads and
    waits for it; returns its exit code and the reader threads (still draining)."""
    stdin_data = (spec.get("stdin") or "").encode("utf-8") if proc.stdin is not None else b""

    def feed() -> None:
        if proc.stdin is None:
            return
        try:
            if stdin_data:
                proc.stdin.write(stdin_data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    def drain(stream: str, pipe: Any) -> None:
        for raw in pipe:
            on_line(stream, raw.decode("utf-8", "replace").rstrip("\n"))

    readers = [
        threading.Thread(target=drain, args=("stdout", proc.stdout), daemon=True),
        threading.Thread(target=drain, args=("stderr", proc.stderr), daemon=True),
    ]
    for t in readers:
        t.start()
    if len(stdin_data) <= SMALL_STDIN:
        feed()  # fits in the empty pipe's buffer: cannot block
    else:
        threading.Thread(target=feed, daemon=True).start()
    try:
        returncode = proc.wait()
    finally:
        # The step is over: what is left of its process group dies with it, which
        # also closes the pipes those processes inherited.
        kill_group(proc, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait()
        with state["lock"]:
            state["procs"].pop(key, None)
    return returncode, readers


def task(spec: dict[str, Any], *after: Any) -> Any:
    """The function each Dask task calls: a trampoline into `run_command` as installed
    on the worker by the plugin from `make_task_plugin`.

    Submitting `run_command` itself would ship its code (and that of the helpers it
    calls) with every task, serialized again each time (~0.4 ms) and loaded again on
    the worker. This function references no globals, so it pickles small."""
    from distributed import get_worker

    worker = get_worker()
    run = worker.__dict__.get(spec["impl"]) if spec.get("impl") else None
    if run is None:
        raise RuntimeError(
            "solidflow's task code %r is not installed on worker %s" % (spec.get("impl"), worker.address)
        )
    return run(spec, *after)


async def task_async(spec: dict[str, Any], *after: Any) -> Any:
    """`task` for a coroutine (`run_command_async`): Dask awaits it on the worker's
    event loop."""
    from distributed import get_worker

    worker = get_worker()
    run = worker.__dict__.get(spec["impl"]) if spec.get("impl") else None
    if run is None:
        raise RuntimeError(
            "solidflow's task code %r is not installed on worker %s" % (spec.get("impl"), worker.address)
        )
    return await run(spec, *after)


def make_task_plugin(fns: dict[str, Any]) -> Any:
    """A worker plugin that installs `fns` (attribute name -> task code) on every
    current and future worker."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class SolidflowTasks(WorkerPlugin):
        idempotent = True

        def __init__(self, fns: dict[str, Any]) -> None:
            self.fns = fns

        def setup(self, worker: Any) -> None:
            worker.__dict__.update(self.fns)

        def teardown(self, worker: Any) -> None:
            kill_running(worker)

    return SolidflowTasks(fns)


def kill_running(worker: Any, grace: float = 2.0) -> None:
    """A closing worker (its scheduler is gone, or it is shut down) can no longer report
    its steps, and distributed waits for running tasks before the worker exits: end
    their processes now (SIGTERM, SIGKILL after `grace`)."""
    state = worker_state(worker)
    with state["lock"]:
        running = [k for k, p in state["procs"].items() if p.poll() is None]
    if running:
        kill_keys(running, grace, dask_worker=worker)
