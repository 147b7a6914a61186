"""The bridge server: serves requests from stdin and turns task events into messages.

Each submitted command becomes one Dask future whose task (`worker.run_command`)
starts the command on a worker and streams its output back through the run's Dask
event topic (Worker.log_event -> Client.subscribe_topic). A task's "done" is sent
once its last event arrived; the future's result repeats the end record and is
fetched only as a fallback.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
import traceback
import types
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import cluster, cluster_events, connection, shipping, topics, warm, worker
from .protocol import OPS, PROTOCOL_VERSION, BridgeError, Done, causes_of, error, failed

# How long a finished task's "done" waits for its last lines to arrive.
LINE_GRACE_SECONDS = 5.0
# Batching window of the bridge's client for messages to the scheduler (distributed
# uses 10 ms); see Bridge._tune_client.
CLIENT_SEND_INTERVAL = 0.002
# The modules whose code runs on the scheduler and the workers: they travel by value.
REMOTE_MODULES = (worker, warm, shipping, topics)
# The suffix of the worker attribute holding the coroutine task code.
ASYNC = "_async"


class Output:
    """Serialized JSON-lines writer on a private copy of the original stdout.

    fd 1 itself is pointed at stderr, so a stray print() in any library (or in a
    LocalCluster worker process, which inherits fd 1) cannot corrupt the protocol.
    """

    def __init__(self, fd: int | None = None) -> None:
        """Writes to a copy of stdout (`fd`: to that descriptor instead, and stdout is
        left alone)."""
        if fd is None:
            fd = os.dup(1)
            os.dup2(2, 1)
        self._fd = fd
        self._file = os.fdopen(self._fd, "w", encoding="utf-8")
        self._lock = threading.RLock()
        # Lines of the `batch` being written, else None.
        self._held: list[str] | None = None

    def emit(self, obj: Any) -> None:
        line = json.dumps(obj, separators=(",", ":"), default=str) + "\n"
        with self._lock:
            if self._held is not None:
                self._held.append(line)
                return
            self._write(line)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Messages emitted on this thread inside the block go out in one write at its
        end (a task's "started", lines and "done" come from one Dask event). Other
        threads' messages wait for the block."""
        with self._lock:
            if self._held is not None:
                yield  # nested: the outer block writes
                return
            self._held = []
            try:
                yield
            finally:
                held, self._held = self._held, None
                if held:
                    self._write("".join(held))

    def _write(self, text: str) -> None:
        try:
            self._file.write(text)
            self._file.flush()
        except (ValueError, OSError):
            pass  # parent is gone; stdin EOF will end us


def log(msg: str) -> None:
    sys.stderr.write("solidflow-dask-bridge: %s\n" % msg)
    sys.stderr.flush()


def done_message(key: str, result: dict[str, Any]) -> Done:
    """The "done" message for a task's end record."""
    return {
        "type": "done",
        "key": key,
        "exit_code": result["exit_code"],
        "signal": result["signal"],
        "worker": result["worker"],
        "stderr_tail": result["stderr_tail"],
        "duration": result["duration"],
        "log_files": result.get("log_files") or {},
    }


def task_code_digest() -> str:
    """A hash of the worker code, naming its plugin: bridges of other solidflow
    versions on a shared cluster keep their own."""
    h = hashlib.sha256()
    for module in REMOTE_MODULES:
        with open(module.__file__, "rb") as f:  # type: ignore[arg-type]
            h.update(f.read())
    return h.hexdigest()[:16]


def by_value(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of `fn` that distributed ships by value inside a task graph.

    `register_pickle_by_value` covers what distributed pickles on its own (plugins,
    `client.run` functions), but a task graph is pickled as a whole with plain pickle,
    which refers to `fn` by module name, and the scheduler and remote workers cannot
    import this package. A function of `__main__` cannot be pickled by reference, so
    distributed falls back to cloudpickle, which ships it (and what it calls from
    `worker`) by value."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__module__ = "__main__"
    copy.__qualname__ = fn.__qualname__
    copy.__doc__ = fn.__doc__
    return copy


def register_task_code() -> None:
    """Workers need nothing solidflow-specific: the modules whose code runs on them
    and on the scheduler (`REMOTE_MODULES`) travel by value."""
    import cloudpickle

    for module in REMOTE_MODULES:
        cloudpickle.register_pickle_by_value(module)


class Prepared:
    """A checked submit request: its task spec, the futures it waits for, and the
    options that must match for tasks to be submitted together."""

    def __init__(
        self, req: dict[str, Any], spec: dict[str, Any], after: list[Any], options: tuple[Any, int, bool]
    ) -> None:
        self.req, self.spec, self.after, self.options = req, spec, after, options
        # Tasks with `after` go alone: a map passes every task the same arguments.
        self.batchable = not after
        # The reply, sent once the task is handed to Dask.
        self.reply: dict[str, Any] | None = None


class Bridge:
    def __init__(self, out: Output) -> None:
        self.out = out
        self.client: Any = None
        self.cluster: Any = None
        self.created_cluster = False
        self.lock = threading.RLock()
        self.futures: dict[str, Any] = {}
        self.canceled: set[str] = set()
        self.topics: set[str] = set()
        self.tokens: dict[str, list[str]] = {}  # key -> tokens seen, in order
        self.event_counts: collections.Counter[str] = collections.Counter()  # token -> events seen
        self.partial: dict[tuple[str, str], list[str]] = {}  # (token, stream) -> chunks
        self.pending_done: dict[str, tuple[Done, int]] = {}  # token -> (done, events expected)
        self.reported: set[str] = set()  # keys whose final message was emitted
        self.task_impl: str | None = None  # worker attribute holding the task code
        self.requests: dict[str, dict[str, Any]] = {}  # key -> its submit, to re-run it
        self.after: dict[str, list[Any]] = {}  # key -> the futures it was submitted after
        self.watch: connection.ConnectionWatch | None = None
        self.allowed_failures: int | None = None
        self.released_since_truncate = 0
        self.task_fn = by_value(worker.task)
        self.task_async_fn = by_value(worker.task_async)
        self.run_command_fn = by_value(worker.run_command)
        self.run_command_async_fn = by_value(worker.run_command_async)
        # The tasks awaiting futures on the client's loop, and the thread that reports
        # the outcomes that need more than the end event (`_watch`).
        self.watchers: set[Any] = set()
        self.outcomes: ThreadPoolExecutor | None = None

    # ---- plumbing ----

    def emit(self, obj: Any) -> None:
        self.out.emit(obj)

    def require_client(self) -> Any:
        if self.client is None:
            raise BridgeError("not_connected", "send a connect request first")
        return self.client

    def workers(self) -> list[dict[str, Any]]:
        info = self.require_client().scheduler_info(n_workers=-1)
        return [
            {
                "address": addr,
                "resources": w.get("resources") or {},
                "nthreads": w.get("nthreads"),
                "name": str(w.get("name")),
            }
            for addr, w in sorted(info.get("workers", {}).items())
        ]

    # ---- requests ----

    def handle(self, req: dict[str, Any]) -> None:
        op = req.get("op")
        handler = getattr(self, "op_" + str(op), None) if op in OPS else None
        if handler is None:
            raise BridgeError("bad_request", "unknown op %r (expected %s)" % (op, ", ".join(OPS)))
        reply = handler(req)
        if reply is not None:
            if "id" in req:
                reply["id"] = req["id"]
            self.emit(reply)

    def op_connect(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.client is not None:
            raise BridgeError("already_connected", "the bridge is already connected")
        self.client, self.cluster, self.created_cluster = cluster.connect(req)
        self._tune_client()
        self._install_task_code()
        self._watch_connection(req)
        try:
            dashboard = self.client.dashboard_link
        except Exception:
            dashboard = None
        return {
            "type": "connected",
            "scheduler": self.client.scheduler.address,
            "dashboard": dashboard,
            "created_cluster": self.created_cluster,
            "workers": self.workers(),
        }

    def _watch_connection(self, req: dict[str, Any]) -> None:
        """Follows worker losses (item: events name the lost worker) and a lost
        scheduler connection (see connection.py)."""
        if req.get("allowed_failures") is not None:
            self.allowed_failures = int(req["allowed_failures"])
        self.watch = connection.ConnectionWatch(
            str(self.client.scheduler.address),
            float(req.get("timeout") or 30),
            lambda: self.client,
            self._resubmit,
            lambda key, message: self._final(failed(key, "scheduler_lost", message)),
        )
        self.client.subscribe_topic(cluster_events.TOPIC, self.on_cluster_event)

    def on_cluster_event(self, event: Any) -> None:
        """Handler of the scheduler's "all" topic: a removed worker that was running
        tasks of ours."""

        def ours(key: str) -> bool:
            return key in self.futures and key not in self.reported

        with self.lock:
            for msg in cluster_events.worker_lost_messages(event, ours):
                self.emit(msg)

    def _resubmit(self, keys: list[str], lost_for: float) -> None:
        """After distributed reconnected: subscribe again, reinstall the task code and
        submit the tasks the lost connection canceled."""
        client = self.require_client()
        for topic in [*self.topics, cluster_events.TOPIC]:
            client.subscribe_topic(topic, self.on_cluster_event if topic == cluster_events.TOPIC else self.on_event)
        self._install_task_code()
        if self.allowed_failures is not None and not self.created_cluster:
            try:
                client.run_on_scheduler(worker.set_allowed_failures, self.allowed_failures)
            except Exception as e:
                log("setting allowed_failures on the scheduler again failed: %r" % (e,))
        for key in keys:
            with self.lock:
                req = self.requests.get(key)
                self.futures.pop(key, None)
            if req is None or key in self.reported:
                continue
            address = self.watch.address if self.watch else "?"
            self.emit({"type": "resubmitted", "key": key, "scheduler": address, "lost_for": lost_for})
            try:
                self.op_submit(req)
            except Exception as e:
                self._final(
                    failed(key, "scheduler_lost", "could not submit %s again after reconnecting: %s" % (key, e))
                )

    def _install_task_code(self) -> None:
        """Installs worker.run_command on the workers once (a worker plugin, so workers
        that join later get it too). Tasks then submit the small worker.task. If
        installing fails, tasks carry the function itself."""
        digest = task_code_digest()
        name = "_solidflow_run_command_" + digest
        try:
            self.client.register_plugin(
                worker.make_task_plugin({name: worker.run_command, name + ASYNC: worker.run_command_async}),
                name="solidflow-tasks-" + digest,
            )
        except Exception as e:
            log("installing the task code on the workers failed, sending it with every task: %r" % (e,))
            self.task_impl = None
            return
        self.task_impl = name

    def _tune_client(self) -> None:
        """Shortens our client's batching window for messages to the scheduler.

        distributed's Client batches them with a 10 ms window: a submit that follows
        any other message within 10 ms waits for the window to close. One task
        submitted after another finished is the executor's common case, so this
        costs a chain of steps up to 10 ms per step (measured: submit -> task start
        5.9 ms median with 10 ms, 3.0 ms with 2 ms). Only this client's own
        messages are affected; nothing changes on the scheduler."""
        comm = getattr(self.client, "scheduler_comm", None)
        interval = getattr(comm, "interval", None)
        if isinstance(interval, (int, float)) and interval > CLIENT_SEND_INTERVAL:
            comm.interval = CLIENT_SEND_INTERVAL

    def op_submit(self, req: dict[str, Any]) -> dict[str, Any] | None:
        """One task (a request read on its own, or one submitted again after a
        reconnect). Requests that arrive together go through `submit_many`."""
        prepared = self._prepare_submit(req)
        if prepared is not None:
            self._submit_group([prepared])
        return {"type": "submitted", "key": req["key"]}

    def submit_many(self, reqs: list[dict[str, Any]]) -> None:
        """Submits requests that arrived together, replying to each (`submitted`, or
        its error) as `handle` would. Consecutive tasks with the same resources and
        priority and no `after` go to Dask in one `Client.map`: one graph update on
        the scheduler instead of one per task, which halves the scheduler's and this
        client's work per task (a 4,000-leaf fan-out of no-op tasks: scheduler 0.72 ->
        0.36 ms, client 0.34 -> 0.09 ms CPU per task)."""
        group: list[Prepared] = []
        for req in reqs:
            waits_for = set(map(str, req.get("after") or ()))
            if waits_for and any(p.spec["key"] in waits_for for p in group):
                # Launched ahead of a task of this group: that one must exist first.
                self._submit_or_reply(group)
                group = []
            try:
                prepared = self._prepare_submit(req)
            except Exception as e:
                self._submit_or_reply(group)
                group = []
                self.emit(error_reply(e, req, "submit %r" % req.get("key")))
                continue
            if prepared is not None:
                if group and not (prepared.batchable and group[-1].batchable and prepared.options == group[-1].options):
                    self._submit_or_reply(group)
                    group = []
                group.append(prepared)
            submitted: dict[str, Any] = {"type": "submitted", "key": req["key"]}
            if "id" in req:
                submitted["id"] = req["id"]
            if prepared is None:
                self.emit(submitted)
            else:
                prepared.reply = submitted
        self._submit_or_reply(group)

    def _submit_or_reply(self, group: list[Prepared]) -> None:
        """`_submit_group`, or an error reply to each of its requests when Dask
        refused them (each request gets exactly one reply)."""
        try:
            self._submit_group(group)
        except Exception as e:
            log("submitting %d task(s) failed:\n%s" % (len(group), traceback.format_exc()))
            for prepared in group:
                if prepared.reply is not None:
                    self.emit(error_reply(e, prepared.req))

    def _prepare_submit(self, req: dict[str, Any]) -> Prepared | None:
        """Checks a submit and builds its task spec; None when it was answered already
        (withdrawn: what it waits for is gone)."""
        client = self.require_client()
        key = req.get("key")
        if not key or not isinstance(key, str):
            raise BridgeError("bad_request", "submit needs a string 'key'")
        if not req.get("command"):
            raise BridgeError("bad_request", "submit %s needs a non-empty 'command'" % key)
        with self.lock:
            if key in self.futures:
                raise BridgeError(
                    "bad_request",
                    "key %s was already submitted; keys must be unique (include run id and attempt)" % key,
                )
        after_keys = [str(k) for k in (req.get("after") or [])]
        with self.lock:
            after = [self.futures.get(k) for k in after_keys]
        missing = [k for k, f in zip(after_keys, after, strict=True) if f is None]
        if missing:
            # Released (it ended) or never submitted: whether it succeeded is unknown here.
            message = "%s waited for %s, which this bridge no longer holds" % (key, missing[0])
            self._final(failed(key, "withdrawn", message))
            return None
        topic = req.get("log_topic") or ("solidflow-" + key)
        if topic not in self.topics:
            client.subscribe_topic(topic, self.on_event)
            self.topics.add(topic)
        spec = {
            "key": key,
            "command": [str(c) for c in req["command"]],
            "stdin": req.get("stdin") or "",
            "env": req.get("env") or {},
            "cwd": req.get("cwd"),
            "log_files": req.get("log_files") or {},
            "parent_pid_env": req.get("parent_pid_env"),
            "warm": req.get("warm"),
            "log_topic": topic,
        }
        # A step on a warm server runs on the worker's event loop (worker.run_command_async).
        on_loop = spec["warm"] is not None
        if self.task_impl:
            spec["impl"] = self.task_impl + (ASYNC if on_loop else "")
        resources = {str(k): v for k, v in (req.get("resources") or {}).items()}
        options = (tuple(sorted(resources.items())), int(req.get("priority") or 0), on_loop)
        return Prepared(req, spec, after, options)

    def _submit_group(self, group: list[Prepared]) -> None:
        """Hands prepared tasks to Dask (one `map` for several) and replies to each."""
        if not group:
            return
        client = self.require_client()
        resources, priority, on_loop = dict(group[0].options[0]) or None, group[0].options[1], group[0].options[2]
        if on_loop:
            fn = self.task_async_fn if self.task_impl else self.run_command_async_fn
        else:
            fn = self.task_fn if self.task_impl else self.run_command_fn
        if len(group) == 1:
            one = group[0]
            futures = [
                client.submit(
                    fn, one.spec, *one.after, key=one.spec["key"], pure=False, resources=resources, priority=priority
                )
            ]
        else:
            futures = client.map(
                fn,
                [p.spec for p in group],
                key=[p.spec["key"] for p in group],
                pure=False,
                resources=resources,
                priority=priority,
            )
        for prepared, fut in zip(group, futures, strict=True):
            key = prepared.spec["key"]
            with self.lock:
                self.futures[key] = fut
                self.requests[key] = prepared.req
                if prepared.after:
                    self.after[key] = prepared.after
        self._watch(futures)
        for prepared in group:
            if prepared.reply is not None:
                self.emit(prepared.reply)
                prepared.reply = None

    def _watch(self, futures: list[Any]) -> None:
        """Follows how each future ends (`on_future_done`).

        `Future.add_done_callback` hands every finished future to a thread, which is a
        quarter of this process's work per task, although a finished task whose "done"
        came with its end event needs nothing more. So the futures are awaited on the
        client's event loop, and only the others (failures, a result to fetch) go to a
        thread. Falls back to `add_done_callback` where the futures lack the state this
        relies on."""
        loop = getattr(self.client, "loop", None)
        if loop is None or not all(getattr(f, "_state", None) is not None for f in futures):
            for fut in futures:
                fut.add_done_callback(self.on_future_done)
            return
        loop.add_callback(self._watch_on_loop, futures)

    async def _watch_on_loop(self, futures: list[Any]) -> None:
        for fut in futures:
            task = asyncio.ensure_future(self._await_end(fut))
            self.watchers.add(task)  # a task nobody references may be collected
            task.add_done_callback(self.watchers.discard)

    async def _await_end(self, fut: Any) -> None:
        while fut.status == "pending":
            await fut._state.wait()
        if fut.status == "finished":
            with self.lock:
                if fut.key in self.reported:
                    return
        if self.outcomes is None:
            self.outcomes = ThreadPoolExecutor(1, thread_name_prefix="solidflow-outcomes")
        self.outcomes.submit(self.on_future_done, fut)

    def op_cancel(self, req: dict[str, Any]) -> dict[str, Any]:
        client = self.require_client()
        keys = [str(k) for k in (req.get("keys") or [])]
        grace = float(req.get("grace", 5.0))
        killed = self._cancel(client, keys, grace)
        return {"type": "canceled", "keys": keys, "killed": killed}

    def _cancel(self, client: Any, keys: list[str], grace: float) -> dict[str, str]:
        with self.lock:
            self.canceled.update(keys)
            futures = [self.futures[k] for k in keys if k in self.futures]
        if futures:
            client.cancel(futures, force=True)
        killed: dict[str, str] = {}
        if keys:
            results = client.run(worker.kill_keys, keys, grace, on_error="return")
            for address, result in (results or {}).items():
                if isinstance(result, list):
                    for k in result:
                        killed[k] = address
                else:
                    log("kill on %s failed: %r" % (address, result))
        return killed

    def op_release(self, req: dict[str, Any]) -> dict[str, Any]:
        keys = [str(k) for k in (req.get("keys") or [])]
        with self.lock:
            for k in keys:
                self.futures.pop(k, None)
                self.requests.pop(k, None)
                self.after.pop(k, None)
                for token in self.tokens.pop(k, ()):
                    self.event_counts.pop(token, None)
            self.released_since_truncate += len(keys)
            truncate = self.client is not None and self.released_since_truncate >= topics.TRUNCATE_EVERY
            if truncate:
                self.released_since_truncate = 0
        if truncate:
            # The scheduler's copies of delivered events (topics.py).
            self.client.run_on_scheduler(topics.truncate, sorted(self.topics))
        return {"type": "released", "keys": keys}

    def op_upload_binary(self, req: dict[str, Any]) -> dict[str, Any]:
        """Ships a build once: the scheduler is asked first and keeps the last few
        (shipping.py); workers fetch it when a task first needs it."""
        client = self.require_client()
        path = req.get("path")
        if not isinstance(path, str) or not os.path.isfile(path):
            raise BridgeError("bad_request", "cannot read binary %r: not a file" % (path,))
        try:
            shipped = shipping.ship(client, path, req.get("sha256"), int(req.get("keep") or shipping.DEFAULT_KEEP))
        except (OSError, ValueError) as e:
            raise BridgeError("bad_request", "cannot ship binary %r: %s" % (path, e)) from e
        sha = shipped["sha256"]
        paths = client.run(shipping.worker_bin_path, sha, on_error="return")
        paths = {w: p for w, p in (paths or {}).items() if isinstance(p, str)}
        distinct = sorted(set(paths.values()))
        return {
            "type": "uploaded",
            "sha256": sha,
            "remote_path": distinct[0] if len(distinct) == 1 else None,
            "worker_paths": paths,
            "command0": "{uploaded:%s}" % sha,
            "cached": shipped["cached"],
            "bytes_sent": shipped["bytes_sent"],
            "kept": shipped["kept"],
            "evicted": shipped["evicted"],
        }

    def op_shutdown(self, req: dict[str, Any]) -> None:
        self.close()
        reply: dict[str, Any] = {"type": "shutdown"}
        if "id" in req:
            reply["id"] = req["id"]
        self.emit(reply)
        raise SystemExit(0)

    def close(self) -> None:
        """Kill our running steps, close the client, and close the cluster if we
        created it. Never raises."""
        client, self.client = self.client, None
        if client is not None:
            with self.lock:
                running = [k for k, f in self.futures.items() if not f.done()]
            try:
                if running:
                    self._cancel(client, running, 2.0)
            except Exception as e:
                log("killing running steps at shutdown failed: %r" % (e,))
            try:
                if self.topics:
                    client.run_on_scheduler(topics.drop, sorted(self.topics), client.id)
            except Exception as e:
                log("removing this run's event topics from the scheduler failed: %r" % (e,))
            try:
                client.close(timeout=10)
            except Exception as e:
                log("closing the client failed: %r" % (e,))
        created, self.cluster = self.cluster, None
        if created is not None and self.created_cluster:
            try:
                created.close(timeout=20)
            except Exception as e:
                log("closing the cluster failed: %r" % (e,))

    # ---- events from the cluster ----

    def on_event(self, event: Any) -> None:
        """Topic handler (runs on the client's event loop): one worker-side batch of a
        task's "start", output lines and "end", in that order, each part optional."""
        try:
            _, msg = event
            if not isinstance(msg, dict):
                return
            key, token = msg.get("key"), msg.get("token")
            # The bridge's lock first, then the output's (one write for the event's
            # messages), as everywhere a message is written under the bridge's lock.
            with self.lock, self.out.batch():
                if key in self.reported:
                    return
                self.event_counts[token] += 1
                address = msg.get("worker")
                start = msg.get("start")
                if start:
                    tokens = self.tokens.setdefault(key, [])
                    if token not in tokens:
                        tokens.append(token)
                    self.emit(
                        {
                            "type": "started",
                            "key": key,
                            "worker": address,
                            "pid": start.get("pid"),
                            "attempt": len(tokens),
                        }
                    )
                for stream, text, more in msg.get("lines") or ():
                    parts = self.partial.setdefault((token, stream), [])
                    parts.append(text)
                    if more:
                        continue
                    del self.partial[(token, stream)]
                    self.emit({"type": "line", "key": key, "worker": address, "stream": stream, "line": "".join(parts)})
                end = msg.get("end")
                if end and token not in self.pending_done:
                    self.pending_done[token] = (done_message(key, end), end["events"])
                    self._maybe_flush_done(token)
                    if token in self.pending_done:
                        self._flush_done_later(token)
                else:
                    self._maybe_flush_done(token)
        except Exception:
            log("bad event %r:\n%s" % (event, traceback.format_exc()))

    def _maybe_flush_done(self, token: str, force: bool = False) -> None:
        with self.lock:
            pending = self.pending_done.get(token)
            if pending is None:
                return
            done, expected = pending
            seen = self.event_counts[token]
            if seen < expected and not force:
                return
            del self.pending_done[token]
            if seen < expected:
                done["lines_missing"] = expected - seen
            self._final(done)

    def _flush_done_later(self, token: str) -> None:
        """Sends the held "done" of `token` after LINE_GRACE_SECONDS even if some of
        its lines never arrived (it then says how many are missing)."""
        timer = threading.Timer(LINE_GRACE_SECONDS, self._maybe_flush_done, args=(token, True))
        timer.daemon = True
        timer.start()

    def _final(self, msg: Any) -> None:
        with self.lock:
            if msg["key"] in self.reported:
                return
            self.reported.add(msg["key"])
            self.emit(msg)

    def on_future_done(self, fut: Any) -> None:
        """Runs on distributed's callback thread when a future finishes."""
        try:
            self._on_future_done(fut)
        except Exception as e:
            log("failed to report %s:\n%s" % (fut.key, traceback.format_exc()))
            self._final(
                failed(fut.key, "error", "the bridge could not read the task outcome: %s: %s" % (type(e).__name__, e))
            )

    def _on_future_done(self, fut: Any) -> None:
        key = fut.key
        status = fut.status
        if status == "finished":
            with self.lock:
                if key in self.reported:
                    # Its "end" event came first (the usual case): nothing to fetch.
                    return
            result = fut.result()
            if "withdrawn" in result:
                self._final(failed(key, "withdrawn", result["withdrawn"]))
                return
            if "not_started" in result:
                self._final(failed(key, "not_started", result["not_started"]))
                return
            token = result["token"]
            with self.lock:
                if key in self.reported or token in self.pending_done:
                    return  # the "end" event is being handled
                self.pending_done[token] = (done_message(key, result), result["events"])
            self._maybe_flush_done(token)
            with self.lock:
                waiting = token in self.pending_done
            if waiting:
                self._flush_done_later(token)
            return

        with self.lock:
            canceled_by_us = key in self.canceled
            after = self.after.get(key) or ()
        lost = [f.key for f in after if f.status != "finished"]
        if lost and not canceled_by_us:
            # Dask ends a task whose dependency erred or was canceled without running it.
            self._final(failed(key, "withdrawn", "%s did not succeed, so %s did not run" % (lost[0], key)))
            return
        if status == "cancelled" or canceled_by_us:
            if canceled_by_us:
                self._final(failed(key, "canceled", "canceled on request"))
                return
            client = self.client
            if client is not None and self.watch is not None and connection.is_connection_lost(client):
                self.watch.lost(key)  # re-run if distributed reconnects within `timeout`, else fail
            elif client is None:
                self._final(failed(key, "scheduler_lost", "the connection to the Dask scheduler was lost"))
            else:
                self._final(failed(key, "canceled", "canceled by Dask (not requested by solidflow)"))
            return
        try:
            exc = fut.exception(timeout=10)
        except Exception as e:  # e.g. CancelledError raised while fetching
            exc = e
        name = type(exc).__name__
        if name == "KilledWorker":
            reason = "worker_lost"
        elif name in ("CancelledError", "FutureCancelledError"):
            reason = "canceled"
        else:
            reason = "error"
        self._final(failed(key, reason, "%s: %s" % (name, exc), causes_of(exc)))


def error_reply(e: Exception, req: Any, what: str | None = None) -> Any:
    """The error reply to request `req` that failed with `e`: its kind for a
    `BridgeError`, else `internal` (logged with its traceback as `what` failing, when
    given), with the request's id."""
    if isinstance(e, BridgeError):
        reply = error(e.kind, e.message, causes_of(e))
    else:
        if what is not None:
            log("%s failed:\n%s" % (what, traceback.format_exc()))
        reply = error("internal", "%s: %s" % (type(e).__name__, e), causes_of(e))
    if isinstance(req, dict) and "id" in req:
        reply["id"] = req["id"]  # type: ignore[typeddict-unknown-key]
    return reply


def serve(bridge: Bridge, out: Output, lines: Any) -> int:
    """Serves requests, one JSON object per line, until shutdown or end of input;
    returns the exit code."""
    return serve_batches(bridge, out, ([line] for line in lines))


def read_batches(fd: int) -> Iterator[list[bytes]]:
    """The lines on `fd`, in batches: the complete lines that one read returned, so
    the requests the parent wrote together are served together."""
    buf = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except InterruptedError:
            continue
        if not chunk:
            if buf.strip():
                yield [buf]
            return
        *lines, buf = (buf + chunk).split(b"\n")
        if lines:
            yield lines


def serve_batches(bridge: Bridge, out: Output, batches: Iterable[list[Any]]) -> int:
    """`serve` over batches of lines: the submits of a batch that follow each other
    go to `Bridge.submit_many` together; everything else is served in order."""
    try:
        for batch in batches:
            submits: list[dict[str, Any]] = []
            for raw in batch:
                raw = raw.strip()
                if not raw:
                    continue
                req = None
                try:
                    req = json.loads(raw)
                    if not isinstance(req, dict):
                        raise BridgeError("bad_request", "a request must be a JSON object")
                    if req.get("op") == "submit" and bridge.client is not None:
                        submits.append(req)
                        continue
                    if submits:
                        bridge.submit_many(submits)
                        submits = []
                    bridge.handle(req)
                except SystemExit:
                    raise
                except json.JSONDecodeError as e:
                    out.emit(error("bad_request", "invalid JSON: %s" % e))
                except Exception as e:
                    out.emit(error_reply(e, req, "request %r" % (raw[:200],)))
            if submits:
                bridge.submit_many(submits)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        return 130
    return 0


def main() -> None:
    out = Output()
    try:
        import dask
        import distributed
    except ImportError as e:
        out.emit(
            error(
                "distributed_missing",
                "the Python package 'distributed' is not importable by %s "
                "(%s); install it with `%s -m pip install dask distributed`, or the "
                "pinned versions with `%s -m pip install -r python/requirements.txt` "
                "(scripts/python-env.sh does this into .venv)" % (sys.executable, e, sys.executable, sys.executable),
            )
        )
        sys.exit(3)

    register_task_code()
    bridge = Bridge(out)

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    out.emit(
        {
            "type": "ready",
            "protocol": PROTOCOL_VERSION,
            "python": sys.version.split()[0],
            "executable": sys.executable,
            "dask": dask.__version__,
            "distributed": distributed.__version__,
            "pid": os.getpid(),
        }
    )
    code = 0
    try:
        code = serve_batches(bridge, out, read_batches(sys.stdin.fileno()))
    finally:
        bridge.close()
        sys.stderr.flush()
        # distributed may leave non-daemon threads behind; do not wait for them.
        os._exit(code)
