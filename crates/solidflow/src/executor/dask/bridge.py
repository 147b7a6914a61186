"""solidflow's Dask bridge.

Dask's client protocol is pickled Python, so solidflow's Rust Dask executor drives
this small program over JSON lines: requests on stdin, messages on stdout, one JSON
object per line. Human-readable logs go to stderr. The protocol is documented in
docs/dask-bridge.md; the Rust side is crates/solidflow/src/executor/dask/bridge.rs.

Each submitted step becomes one Dask future whose task starts the step's command
as a subprocess on a worker (in its own process group), feeds it stdin, and
streams its stdout/stderr lines back live through Dask's event topics
(Worker.log_event -> Client.subscribe_topic). The future's result is only small
metadata (exit code, signal, stderr tail, duration).

Self-contained: stdlib + `distributed` only. Everything that runs on workers is
defined in this file's `__main__`, so cloudpickle ships it by value and workers
need nothing solidflow-specific installed. The `if __name__ == "__main__":` guard
matters: worker processes started with multiprocessing's "spawn" re-import the
main module.
"""

import collections
import hashlib
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback

PROTOCOL_VERSION = 1

# A stdout/stderr line longer than this is sent as several events (the last one
# without "more": true) and reassembled here, so that every Dask event stays small:
# the scheduler keeps the last ~1000 events of each topic in memory.
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
# How long a finished task's "done" waits for its last lines to arrive.
LINE_GRACE_SECONDS = 5.0
# Batching window of the bridge's client for messages to the scheduler (distributed
# uses 10 ms); see Bridge._tune_client.
CLIENT_SEND_INTERVAL = 0.002
# Cached scheduler_info() used for the resource check before each submit.
WORKER_INFO_TTL = 1.0

CLUSTER_MANAGERS = {
    # kind: (module, class, pip package)
    "slurm": ("dask_jobqueue", "SLURMCluster", "dask-jobqueue"),
    "pbs": ("dask_jobqueue", "PBSCluster", "dask-jobqueue"),
    "sge": ("dask_jobqueue", "SGECluster", "dask-jobqueue"),
    "lsf": ("dask_jobqueue", "LSFCluster", "dask-jobqueue"),
    "kube": ("dask_kubernetes.operator", "KubeCluster", "dask-kubernetes"),
    "ssh": ("distributed", "SSHCluster", "asyncssh"),
    "yarn": ("dask_yarn", "YarnCluster", "dask-yarn"),
}


# --------------------------------------------------------------------------------------
# Code that runs on the workers. Pickled by value (defined in __main__).
# --------------------------------------------------------------------------------------


def _solidflow_worker_state(worker):
    """Per-worker registry of running step processes, shared by tasks and cancel."""
    state = worker.__dict__.get("_solidflow_state")
    if state is None:
        state = worker.__dict__.setdefault(
            "_solidflow_state",
            {"lock": threading.Lock(), "procs": {}, "cancelled": set()},
        )
    return state


def _solidflow_bin_dir():
    import tempfile

    return os.environ.get("SOLIDFLOW_BIN_CACHE") or os.path.join(
        tempfile.gettempdir(), "solidflow-bin"
    )


def _solidflow_kill_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _solidflow_kill_keys(keys, grace, dask_worker=None):
    """Run on every worker by `cancel`: SIGTERM the process groups of these keys,
    SIGKILL them after `grace` seconds, and make tasks that have not started yet
    refuse to start."""
    from distributed import get_worker

    worker = dask_worker if dask_worker is not None else get_worker()
    state = _solidflow_worker_state(worker)
    killed = []
    with state["lock"]:
        for key in keys:
            state["cancelled"].add(key)
            proc = state["procs"].get(key)
            if proc is not None and proc.poll() is None:
                _solidflow_kill_group(proc, signal.SIGTERM)
                killed.append(key)
                timer = threading.Timer(
                    grace, _solidflow_kill_group, args=(proc, signal.SIGKILL)
                )
                timer.daemon = True
                timer.start()
    return killed


def _solidflow_run_command(spec, *upstream):
    """The Dask task: run one step's command on this worker.

    `upstream` are the results of the futures named in the submit's "deps"; Dask
    only starts this task once they have all finished successfully.

    Everything the bridge needs travels in the task's event topic, in order: the
    "start" (pid), the output lines, and the "end" record (exit code, stderr tail,
    ...). Lines are batched: an event goes out FLUSH_SECONDS after the first line it
    holds (or when it is full), and the last batch goes out with the "end" record. So
    a short step costs one Dask event, and the bridge can report it done as soon as
    that event arrives, without fetching the task's result from the worker.
    """
    import subprocess
    import uuid

    from distributed import get_worker

    key = spec["key"]
    if spec.get("skip_on_upstream_failure", True):
        bad = [
            u.get("key")
            for u in upstream
            if isinstance(u, dict)
            and (u.get("skipped") or u.get("exit_code") != 0 or u.get("signal"))
        ]
        if bad:
            return {"key": key, "skipped": True, "upstream": bad}

    worker = get_worker()
    state = _solidflow_worker_state(worker)
    topic = spec["log_topic"]
    token = uuid.uuid4().hex

    # The batch being collected: {"start": {...}?, "lines": [[stream, text, more]]}.
    cond = threading.Condition()
    batch = {"start": None, "lines": [], "chars": 0, "since": None, "closed": False}
    counter = {"events": 0}

    def send_locked(extra=None):
        """Sends the collected batch (plus `extra`) as one event; holds `cond`."""
        payload = {"key": key, "token": token, "worker": worker.address}
        if batch["start"] is not None:
            payload["start"] = batch["start"]
        if batch["lines"]:
            payload["lines"] = batch["lines"]
        if extra:
            payload.update(extra)
        batch.update(start=None, lines=[], chars=0, since=None)
        counter["events"] += 1
        if "end" in payload:
            payload["end"]["events"] = counter["events"]
        worker.log_event(topic, payload)

    def add_locked(start=None, line=None):
        if batch["since"] is None:
            batch["since"] = time.monotonic()
            cond.notify()
        if start is not None:
            batch["start"] = start
        if line is not None:
            batch["lines"].append(line)
            batch["chars"] += len(line[1])
            if batch["chars"] >= CHUNK_CHARS:
                send_locked()

    def add_line(stream, text):
        with cond:
            if len(text) <= CHUNK_CHARS:
                add_locked(line=[stream, text, False])
                return
            for at in range(0, len(text), CHUNK_CHARS):
                more = at + CHUNK_CHARS < len(text)
                add_locked(line=[stream, text[at : at + CHUNK_CHARS], more])

    def flusher():
        with cond:
            while not batch["closed"]:
                since = batch["since"]
                if since is None:
                    cond.wait()
                    continue
                left = since + FLUSH_SECONDS - time.monotonic()
                if left > 0:
                    cond.wait(left)
                    continue
                send_locked()

    command = list(spec["command"])
    if command and command[0].startswith("{uploaded:") and command[0].endswith("}"):
        sha = command[0][len("{uploaded:") : -1]
        path = os.path.join(_solidflow_bin_dir(), sha)
        if not os.path.exists(path):
            raise RuntimeError(
                "binary %s was not uploaded to worker %s (expected at %s); send "
                "upload_binary before submitting" % (sha, worker.address, path)
            )
        command[0] = path

    env = None
    parent_pid_env = spec.get("parent_pid_env")
    if spec.get("env") or parent_pid_env:
        env = dict(os.environ)
        env.update({str(k): str(v) for k, v in (spec.get("env") or {}).items()})
        if parent_pid_env:
            env[str(parent_pid_env)] = str(os.getpid())

    # If the worker process dies (kill -9, OOM), take the step down with it instead
    # of leaving an orphan that keeps writing while Dask retries it elsewhere. A
    # command that does this itself when it finds its parent's pid in
    # `parent_pid_env` (solidflow's step mode does) is started without a
    # preexec_fn: that lets Python use vfork, which costs ~0.1 ms in a big worker
    # process instead of ~10 ms for a fork.
    libc = None
    if sys.platform.startswith("linux") and not parent_pid_env:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            libc = None
    parent_pid = os.getpid()

    def preexec():
        if libc is not None:
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            if os.getppid() != parent_pid:
                os._exit(137)

    # Best-effort complete copy of the output on the worker's disk ("log_files":
    # {"stdout": path, "stderr": path}), appended to, so a retry adds to the record.
    # The live stream is capped by the scheduler; this copy is not.
    tee = {}
    tee_locks = {"stdout": threading.Lock(), "stderr": threading.Lock()}
    for stream, path in (spec.get("log_files") or {}).items():
        if stream not in tee_locks or not path:
            continue
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tee[stream] = open(path, "a", encoding="utf-8", buffering=1)
        except OSError:
            pass

    def tee_line(stream, text):
        f = tee.get(stream)
        if f is not None:
            with tee_locks[stream]:
                try:
                    f.write(text + "\n")
                except (OSError, ValueError):
                    pass

    started = time.time()
    with state["lock"]:
        if key in state["cancelled"]:
            raise RuntimeError("step %s was canceled before it started" % key)
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=spec.get("cwd") or None,
                env=env,
                start_new_session=True,
                preexec_fn=preexec if libc is not None else None,
            )
        except OSError as e:
            for f in tee.values():
                f.close()
            raise RuntimeError(
                "could not start %r on worker %s: %s" % (command, worker.address, e)
            ) from None
        state["procs"][key] = proc
    with cond:
        add_locked(start={"pid": proc.pid, "host": worker.address})

    stdin_data = (spec.get("stdin") or "").encode("utf-8")

    def feed():
        try:
            if stdin_data:
                proc.stdin.write(stdin_data)
        except (BrokenPipeError, OSError):
            pass
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass

    tail = collections.deque(maxlen=STDERR_TAIL_LINES)

    def drain_stderr():
        for raw in proc.stderr:
            text = raw.decode("utf-8", "replace").rstrip("\n")
            tail.append(text)
            tee_line("stderr", text)
            add_line("stderr", text)

    threads = [threading.Thread(target=drain_stderr, daemon=True)]
    if len(stdin_data) <= SMALL_STDIN:
        feed()  # fits in the empty pipe's buffer: cannot block
    else:
        threads.append(threading.Thread(target=feed, daemon=True))
    for t in threads:
        t.start()
    flush_thread = threading.Thread(target=flusher, daemon=True)
    flush_thread.start()
    try:
        for raw in proc.stdout:
            text = raw.decode("utf-8", "replace").rstrip("\n")
            tee_line("stdout", text)
            add_line("stdout", text)
        returncode = proc.wait()
        for t in threads:
            t.join()
    finally:
        with cond:
            batch["closed"] = True
            cond.notify()
        if proc.poll() is None:
            _solidflow_kill_group(proc, signal.SIGKILL)
            proc.wait()
        with state["lock"]:
            state["procs"].pop(key, None)

    for f in tee.values():
        try:
            f.close()
        except OSError:
            pass
    result = {
        "key": key,
        "token": token,
        "exit_code": returncode if returncode >= 0 else None,
        "signal": -returncode if returncode < 0 else None,
        "worker": worker.address,
        "stderr_tail": "\n".join(tail)[-STDERR_TAIL_CHARS:],
        "duration": time.time() - started,
        "log_files": {stream: f.name for stream, f in tee.items()},
    }
    flush_thread.join()
    with cond:
        send_locked({"end": dict(result)})
        result["events"] = counter["events"]
    return result


def _solidflow_task(spec, *upstream):
    """The function each Dask task calls: a trampoline into _solidflow_run_command as
    installed on the worker by the plugin from _make_task_plugin.

    Everything in __main__ is pickled by value, so submitting _solidflow_run_command
    itself would ship its ~20 KB of code (and that of the helpers it calls) with
    every task, serialized again in the bridge each time (~0.4 ms) and loaded again
    on the worker. This function references no globals, so it pickles small."""
    from distributed import get_worker

    worker = get_worker()
    run = worker.__dict__.get(spec["impl"]) if spec.get("impl") else None
    if run is None:
        raise RuntimeError(
            "solidflow's task code %r is not installed on worker %s"
            % (spec.get("impl"), worker.address)
        )
    return run(spec, *upstream)


def _make_task_plugin(name, fn):
    from distributed.diagnostics.plugin import WorkerPlugin

    class SolidflowTasks(WorkerPlugin):
        """Installs the task code on every current and future worker."""

        idempotent = True

        def __init__(self, name, fn):
            self.name = name
            self.fn = fn

        def setup(self, worker):
            worker.__dict__[self.name] = self.fn

    return SolidflowTasks(name, fn)


def _solidflow_scheduler_set_allowed_failures(n, dask_scheduler=None):
    dask_scheduler.allowed_failures = n
    return n


def _solidflow_worker_bin_path(sha):
    return os.path.join(_solidflow_bin_dir(), sha)


def _make_binary_plugin(data, sha):
    from distributed.diagnostics.plugin import WorkerPlugin

    class SolidflowBinary(WorkerPlugin):
        """Writes one executable into the worker's content-addressed cache."""

        idempotent = True

        def __init__(self, data, sha):
            self.data = data
            self.sha = sha

        def setup(self, worker):
            import tempfile

            directory = _solidflow_bin_dir()
            os.makedirs(directory, exist_ok=True)
            target = os.path.join(directory, self.sha)
            if os.path.exists(target):
                with open(target, "rb") as f:
                    if hashlib.sha256(f.read()).hexdigest() == self.sha:
                        return
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + self.sha[:12])
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(self.data)
                os.chmod(tmp, 0o755)
                os.replace(tmp, target)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise

    return SolidflowBinary(data, sha)


# --------------------------------------------------------------------------------------
# The bridge process.
# --------------------------------------------------------------------------------------


class BridgeError(Exception):
    """An error reported to the caller as {"type":"error","kind":...}."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind
        self.message = message


class Output:
    """Serialized JSON-lines writer on a private copy of the original stdout.

    fd 1 itself is pointed at stderr, so a stray print() in any library (or in a
    LocalCluster worker process, which inherits fd 1) cannot corrupt the protocol.
    """

    def __init__(self):
        self._fd = os.dup(1)
        os.dup2(2, 1)
        self._file = os.fdopen(self._fd, "w", encoding="utf-8", buffering=1)
        self._lock = threading.Lock()

    def emit(self, obj):
        line = json.dumps(obj, separators=(",", ":"), default=str)
        with self._lock:
            try:
                self._file.write(line + "\n")
                self._file.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass  # parent is gone; stdin EOF will end us


def log(msg):
    sys.stderr.write("solidflow-dask-bridge: %s\n" % msg)
    sys.stderr.flush()


class Bridge:
    def __init__(self, out):
        self.out = out
        self.client = None
        self.cluster = None
        self.created_cluster = False
        self.lock = threading.RLock()
        self.futures = {}  # key -> Future
        self.deps = {}  # key -> [dep keys]
        self.canceled = set()
        self.topics = set()
        self.tokens = {}  # key -> [tokens seen, in order]
        self.event_counts = collections.Counter()  # token -> events seen
        self.partial = {}  # (token, stream) -> [chunks]
        self.pending_done = {}  # token -> done message
        self.reported = set()  # keys whose final message was emitted
        self.outcomes = {}  # key -> True (exit 0) / False, for held dependents
        self.held = {}  # key -> task waiting in the bridge for its deps (dep_mode bridge)
        self.release_queue = queue.Queue()
        threading.Thread(target=self._release_loop, daemon=True).start()
        self._workers_cache = (0.0, None)
        self.task_impl = None  # worker attribute holding the task code, once installed

    # ---- plumbing ----

    def emit(self, obj):
        self.out.emit(obj)

    def require_client(self):
        if self.client is None:
            raise BridgeError("not_connected", "send a connect request first")
        return self.client

    def workers(self, fresh=False):
        now = time.monotonic()
        at, cached = self._workers_cache
        if fresh or cached is None or now - at > WORKER_INFO_TTL:
            info = self.require_client().scheduler_info(n_workers=-1)
            cached = [
                {
                    "address": addr,
                    "resources": w.get("resources") or {},
                    "nthreads": w.get("nthreads"),
                    "name": str(w.get("name")),
                }
                for addr, w in sorted(info.get("workers", {}).items())
            ]
            self._workers_cache = (now, cached)
        return cached

    # ---- requests ----

    def handle(self, req):
        op = req.get("op")
        handler = getattr(self, "op_" + str(op), None)
        if handler is None:
            raise BridgeError(
                "bad_request",
                "unknown op %r (expected connect, submit, cancel, release, "
                "upload_binary, workers, ping or shutdown)" % (op,),
            )
        reply = handler(req)
        if reply is not None:
            if "id" in req:
                reply["id"] = req["id"]
            self.emit(reply)

    def op_ping(self, req):
        return {"type": "pong"}

    def op_connect(self, req):
        import dask
        from distributed import Client

        if self.client is not None:
            raise BridgeError("already_connected", "the bridge is already connected")
        address = req.get("address")
        timeout = float(req.get("timeout") or 30)
        cluster_spec = req.get("cluster") or {}
        kind = cluster_spec.get("kind") or ("existing" if address else "local")
        options = dict(cluster_spec.get("options") or {})
        allowed_failures = req.get("allowed_failures")
        security = self._security(req.get("tls"))

        if kind == "existing":
            if not address:
                raise BridgeError(
                    "bad_request", "cluster kind 'existing' needs an address"
                )
            try:
                self.client = Client(
                    address,
                    timeout="%ss" % timeout,
                    security=security,
                    set_as_default=False,
                )
            except (OSError, TimeoutError) as e:
                raise BridgeError(
                    "scheduler_unreachable",
                    "could not reach the Dask scheduler at %s within %g s: %s"
                    % (address, timeout, e),
                )
            except TypeError as e:
                # distributed's words for "tls:// without certificates" are a
                # TypeError about a missing ssl_context.
                if security is None and str(address).startswith("tls://"):
                    raise BridgeError(
                        "tls_config",
                        "the scheduler address %s uses TLS, but no TLS certificate files "
                        "were given: add `tls: {ca_file, cert, key}` to the dask executor "
                        "config (distributed said: %s)" % (address, e),
                    )
                raise
            if allowed_failures is not None:
                # Shared scheduler: this changes the setting for every client of it.
                self.client.run_on_scheduler(
                    _solidflow_scheduler_set_allowed_failures, int(allowed_failures)
                )
        elif address:
            raise BridgeError(
                "bad_request",
                "both address %r and cluster kind %r given: use kind 'existing' "
                "(or omit cluster) to connect to a running scheduler" % (address, kind),
            )
        elif kind == "local":
            self.cluster = self._local_cluster(req, options, allowed_failures)
            self.created_cluster = True
        elif kind in CLUSTER_MANAGERS:
            if allowed_failures is not None:
                dask.config.set(
                    {"distributed.scheduler.allowed-failures": int(allowed_failures)}
                )
            self.cluster = self._managed_cluster(kind, options)
            self.created_cluster = True
            if cluster_spec.get("adapt"):
                self.cluster.adapt(**cluster_spec["adapt"])
            elif req.get("n_workers"):
                self.cluster.scale(int(req["n_workers"]))
        else:
            raise BridgeError(
                "bad_request",
                "unknown cluster kind %r (expected local, existing, %s)"
                % (kind, ", ".join(sorted(CLUSTER_MANAGERS))),
            )

        if self.client is None:
            self.client = Client(self.cluster, set_as_default=False)
            wait_for = req.get("wait_for_workers")
            if wait_for is None and kind == "local":
                wait_for = len(self.cluster.workers)
            if wait_for:
                try:
                    self.client.wait_for_workers(int(wait_for), timeout=timeout)
                except (TimeoutError, OSError) as e:
                    raise BridgeError(
                        "workers_timeout",
                        "%d worker(s) did not join within %g s: %s"
                        % (int(wait_for), timeout, e),
                    )
        elif req.get("wait_for_workers"):
            try:
                self.client.wait_for_workers(
                    int(req["wait_for_workers"]), timeout=timeout
                )
            except (TimeoutError, OSError) as e:
                raise BridgeError(
                    "workers_timeout",
                    "%d worker(s) did not join %s within %g s: %s"
                    % (int(req["wait_for_workers"]), address, timeout, e),
                )

        self._tune_client()
        self._install_task_code()
        try:
            dashboard = self.client.dashboard_link
        except Exception:
            dashboard = None
        return {
            "type": "connected",
            "scheduler": self.client.scheduler.address,
            "dashboard": dashboard,
            "created_cluster": self.created_cluster,
            "workers": self.workers(fresh=True),
        }

    def _install_task_code(self):
        """Installs _solidflow_run_command on the workers once (a worker plugin, so
        workers that join later get it too), under a name that includes a hash of
        this program: bridges of other solidflow versions on a shared cluster keep
        their own. Tasks then submit the small _solidflow_task. If installing fails,
        tasks carry the function itself, as before."""
        try:
            with open(os.path.abspath(__file__), "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()[:16]
        except (OSError, NameError):
            digest = "%x" % (hash(_solidflow_run_command.__code__.co_code) & 0xFFFFFFFF)
        name = "_solidflow_run_command_" + digest
        try:
            self.client.register_plugin(
                _make_task_plugin(name, _solidflow_run_command),
                name="solidflow-tasks-" + digest,
            )
        except Exception as e:
            log("installing the task code on the workers failed, sending it with every task: %r" % (e,))
            self.task_impl = None
            return
        self.task_impl = name

    def _tune_client(self):
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

    def _security(self, tls):
        if not tls:
            return None
        from distributed.security import Security

        return Security(
            tls_ca_file=tls.get("ca_file"),
            tls_client_cert=tls.get("cert"),
            tls_client_key=tls.get("key"),
            require_encryption=True,
        )

    def _local_cluster(self, req, options, allowed_failures):
        from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

        scheduler_kwargs = dict(options.pop("scheduler_kwargs", None) or {})
        if allowed_failures is not None:
            scheduler_kwargs["allowed_failures"] = int(allowed_failures)
        resources = req.get("worker_resources")
        threads = req.get("threads_per_worker")
        memory_limit = req.get("memory_limit")
        if isinstance(resources, list):
            # Workers differ: LocalCluster's resources= would apply to all of them.
            worker_options = {"host": "127.0.0.1"}
            if threads:
                worker_options["nthreads"] = int(threads)
            if memory_limit is not None:
                worker_options["memory_limit"] = memory_limit
            worker_options.update(options.pop("worker_options", None) or {})
            workers = {
                "solidflow-%d" % i: {
                    "cls": Nanny,
                    "options": dict(worker_options, resources=dict(r or {})),
                }
                for i, r in enumerate(resources)
            }
            scheduler_options = {"host": "127.0.0.1", "dashboard_address": ":0"}
            scheduler_options.update(scheduler_kwargs)
            return SpecCluster(
                workers=workers,
                scheduler={"cls": Scheduler, "options": scheduler_options},
                **options,
            )
        kwargs = {
            "host": "127.0.0.1",
            "dashboard_address": ":0",
            "scheduler_kwargs": scheduler_kwargs,
        }
        if req.get("n_workers") is not None:
            kwargs["n_workers"] = int(req["n_workers"])
        if threads:
            kwargs["threads_per_worker"] = int(threads)
        if memory_limit is not None:
            kwargs["memory_limit"] = memory_limit
        if resources:
            kwargs["resources"] = dict(resources)
        kwargs.update(options)
        return LocalCluster(**kwargs)

    def _managed_cluster(self, kind, options):
        import importlib
        import importlib.util

        module_name, class_name, package = CLUSTER_MANAGERS[kind]
        fix = "%s -m pip install %s" % (sys.executable, package)
        if kind == "ssh" and importlib.util.find_spec("asyncssh") is None:
            raise BridgeError(
                "missing_package",
                "cluster kind 'ssh' needs the Python package asyncssh, which is not "
                "installed for %s; run `%s`" % (sys.executable, fix),
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise BridgeError(
                "missing_package",
                "cluster kind %r needs the Python package %s (%s); run `%s`"
                % (kind, package, e, fix),
            )
        cls = getattr(module, class_name)
        return cls(**options)

    def _check_resources(self, key, resources):
        if not resources:
            return None
        for fresh in (False, True):
            workers = self.workers(fresh=fresh)
            if not workers:
                return None  # nobody to judge by (e.g. an adaptive cluster at 0)
            for w in workers:
                have = w["resources"]
                if all(float(have.get(r, 0)) >= float(n) for r, n in resources.items()):
                    return None
        offers = "; ".join(
            "%s: %s"
            % (
                w["address"],
                ", ".join("%s=%g" % kv for kv in sorted(w["resources"].items()))
                or "no resources",
            )
            for w in workers
        )
        missing = sorted(
            r
            for r, n in resources.items()
            if not any(float(w["resources"].get(r, 0)) >= float(n) for w in workers)
        )
        what = (
            ", ".join("%s=%g" % (r, float(resources[r])) for r in missing)
            if missing
            else "all of " + ", ".join("%s=%g" % kv for kv in sorted(resources.items()))
        )
        return "no worker has resource %s (workers offer: %s)" % (what, offers)

    def op_submit(self, req):
        client = self.require_client()
        key = req.get("key")
        if not key or not isinstance(key, str):
            raise BridgeError("bad_request", "submit needs a string 'key'")
        base = {"type": "failed", "key": key}
        if "id" in req:
            base["id"] = req["id"]
        if not req.get("command"):
            raise BridgeError("bad_request", "submit %s needs a non-empty 'command'" % key)
        with self.lock:
            if key in self.futures or key in self.held:
                self.emit(
                    dict(
                        base,
                        reason="error",
                        message="key %s was already submitted; keys must be unique "
                        "(include run id and attempt)" % key,
                    )
                )
                return None
        resources = {str(k): v for k, v in (req.get("resources") or {}).items()}
        problem = self._check_resources(key, resources)
        if problem:
            self.emit(dict(base, reason="unsatisfiable_resources", message=problem))
            return None
        dep_keys = [str(d) for d in (req.get("deps") or [])]
        dep_mode = req.get("dep_mode") or "bridge"
        if dep_mode not in ("bridge", "dask"):
            raise BridgeError("bad_request", "dep_mode must be 'bridge' or 'dask'")
        with self.lock:
            unknown = [
                d
                for d in dep_keys
                if d not in self.futures and d not in self.held and d not in self.outcomes
            ]
            if dep_mode == "dask":
                unknown += [d for d in dep_keys if d not in self.futures and d not in unknown]
        if unknown:
            self.emit(
                dict(
                    base,
                    reason="error",
                    message="dependency %s of %s is unknown or was released "
                    "(submit it first)" % (", ".join(unknown), key),
                )
            )
            return None
        topic = req.get("log_topic") or ("solidflow-" + key)
        if topic not in self.topics:
            client.subscribe_topic(topic, self.on_event)
            self.topics.add(topic)
        task = {
            "spec": {
                "key": key,
                "command": [str(c) for c in req["command"]],
                "stdin": req.get("stdin") or "",
                "env": req.get("env") or {},
                "cwd": req.get("cwd"),
                "log_files": req.get("log_files") or {},
                "parent_pid_env": req.get("parent_pid_env"),
                "log_topic": topic,
                "skip_on_upstream_failure": req.get("skip_on_upstream_failure", True),
            },
            "resources": resources or None,
            "priority": int(req.get("priority") or 0),
            "retries": int(req.get("retries") or 0),
            "deps": dep_keys,
        }
        if dep_mode == "dask":
            self._launch(task, dask_deps=True)
            return {"type": "submitted", "key": key, "held": False}
        with self.lock:
            self.held[key] = task
        held = self._release_held([key])
        return {"type": "submitted", "key": key, "held": held}

    def _launch(self, task, dask_deps=False):
        key = task["spec"]["key"]
        with self.lock:
            dep_futures = [self.futures[d] for d in task["deps"]] if dask_deps else []
        spec = task["spec"]
        if self.task_impl:
            spec = dict(spec, impl=self.task_impl)
        fut = self.require_client().submit(
            _solidflow_task if self.task_impl else _solidflow_run_command,
            spec,
            *dep_futures,
            key=key,
            pure=False,
            resources=task["resources"],
            priority=task["priority"],
            retries=task["retries"],
        )
        with self.lock:
            self.futures[key] = fut
            self.deps[key] = task["deps"] if dask_deps else []
        fut.add_done_callback(self.on_future_done)

    def _release_held(self, keys):
        """Launch (or skip) held tasks among `keys` whose upstreams have all finished.
        Returns True if any of them is still held."""
        still_held = False
        to_launch, to_skip = [], []
        with self.lock:
            for key in keys:
                task = self.held.get(key)
                if task is None:
                    continue
                outcomes = [self.outcomes.get(d) for d in task["deps"]]
                if None in outcomes:
                    still_held = True
                    continue
                del self.held[key]
                bad = [d for d, ok in zip(task["deps"], outcomes) if not ok]
                if bad and task["spec"]["skip_on_upstream_failure"]:
                    to_skip.append((key, bad))
                else:
                    to_launch.append(task)
        for task in to_launch:
            try:
                self._launch(task)
            except Exception as e:
                self._final(
                    {
                        "type": "failed",
                        "key": task["spec"]["key"],
                        "reason": "error",
                        "message": "could not submit: %s: %s" % (type(e).__name__, e),
                    }
                )
        for key, bad in to_skip:
            self._final({"type": "skipped", "key": key, "upstream": bad})
        return still_held

    def _release_loop(self):
        """Launches held tasks whose upstreams finished, off the Dask threads."""
        while True:
            finished = self.release_queue.get()
            if finished is None:
                return
            with self.lock:
                waiting = [k for k, t in self.held.items() if finished in t["deps"]]
            if waiting:
                try:
                    self._release_held(waiting)
                except Exception:
                    log("releasing dependents of %s failed:\n%s" % (finished, traceback.format_exc()))

    def op_cancel(self, req):
        client = self.require_client()
        keys = [str(k) for k in (req.get("keys") or [])]
        grace = float(req.get("grace", 5.0))
        killed = self._cancel(client, keys, grace)
        return {"type": "canceled", "keys": keys, "killed": killed}

    def _cancel(self, client, keys, grace):
        with self.lock:
            self.canceled.update(keys)
            futures = [self.futures[k] for k in keys if k in self.futures]
            held = [k for k in keys if self.held.pop(k, None) is not None]
        for k in held:
            self._final(
                {"type": "failed", "key": k, "reason": "canceled", "message": "canceled on request (before it started)"}
            )
        if futures:
            client.cancel(futures, force=True)
        killed = {}
        if keys:
            results = client.run(
                _solidflow_kill_keys, keys, grace, on_error="return"
            )
            for worker, result in (results or {}).items():
                if isinstance(result, list):
                    for k in result:
                        killed[k] = worker
                else:
                    log("kill on %s failed: %r" % (worker, result))
        return killed

    def op_release(self, req):
        keys = [str(k) for k in (req.get("keys") or [])]
        with self.lock:
            for k in keys:
                self.futures.pop(k, None)
                self.deps.pop(k, None)
                self.outcomes.pop(k, None)
        return {"type": "released", "keys": keys}

    def op_workers(self, req):
        return {"type": "workers", "workers": self.workers(fresh=True)}

    def op_upload_binary(self, req):
        client = self.require_client()
        path = req.get("path")
        want = (req.get("sha256") or "").lower()
        try:
            with open(path, "rb") as f:
                data = f.read()
        except (OSError, TypeError) as e:
            raise BridgeError("bad_request", "cannot read binary %r: %s" % (path, e))
        sha = hashlib.sha256(data).hexdigest()
        if want and want != sha:
            raise BridgeError(
                "bad_request",
                "sha256 of %s is %s, not %s as requested" % (path, sha, want),
            )
        client.register_plugin(
            _make_binary_plugin(data, sha), name="solidflow-binary-" + sha[:16]
        )
        paths = client.run(_solidflow_worker_bin_path, sha, on_error="return")
        paths = {w: p for w, p in (paths or {}).items() if isinstance(p, str)}
        distinct = sorted(set(paths.values()))
        return {
            "type": "uploaded",
            "sha256": sha,
            "remote_path": distinct[0] if len(distinct) == 1 else None,
            "worker_paths": paths,
            "command0": "{uploaded:%s}" % sha,
        }

    def op_shutdown(self, req):
        self.close()
        reply = {"type": "shutdown"}
        if "id" in req:
            reply["id"] = req["id"]
        self.emit(reply)
        raise SystemExit(0)

    def close(self):
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
                client.close(timeout=10)
            except Exception as e:
                log("closing the client failed: %r" % (e,))
        cluster, self.cluster = self.cluster, None
        if cluster is not None and self.created_cluster:
            try:
                cluster.close(timeout=20)
            except Exception as e:
                log("closing the cluster failed: %r" % (e,))

    # ---- events from the cluster ----

    def on_event(self, event):
        """Topic handler (runs on the client's event loop): one worker-side batch of a
        task's "start", output lines and "end", in that order, each part optional."""
        try:
            _, msg = event
            if not isinstance(msg, dict):
                return
            key, token = msg.get("key"), msg.get("token")
            with self.lock:
                if key in self.reported:
                    return
                self.event_counts[token] += 1
                worker = msg.get("worker")
                start = msg.get("start")
                if start:
                    tokens = self.tokens.setdefault(key, [])
                    if token not in tokens:
                        tokens.append(token)
                    self.emit(
                        {
                            "type": "started",
                            "key": key,
                            "worker": worker,
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
                    self.emit(
                        {
                            "type": "line",
                            "key": key,
                            "worker": worker,
                            "stream": stream,
                            "line": "".join(parts),
                        }
                    )
                end = msg.get("end")
                if end and token not in self.pending_done:
                    self.pending_done[token] = self._done_message(key, end)
                    self._maybe_flush_done(token)
                    if token in self.pending_done:
                        self._flush_done_later(token)
                else:
                    self._maybe_flush_done(token)
        except Exception:
            log("bad event %r:\n%s" % (event, traceback.format_exc()))

    @staticmethod
    def _done_message(key, result):
        return {
            "type": "done",
            "key": key,
            "exit_code": result["exit_code"],
            "signal": result["signal"],
            "worker": result["worker"],
            "stderr_tail": result["stderr_tail"],
            "duration": result["duration"],
            "log_files": result.get("log_files") or {},
            "_events": result["events"],
        }

    def _maybe_flush_done(self, token, force=False):
        with self.lock:
            done = self.pending_done.get(token)
            if done is None:
                return
            expected = done.pop("_events")
            seen = self.event_counts[token]
            if seen < expected and not force:
                done["_events"] = expected
                return
            del self.pending_done[token]
            if seen < expected:
                done["lines_missing"] = expected - seen
            self._final(done)

    def _flush_done_later(self, token):
        """Sends the held "done" of `token` after LINE_GRACE_SECONDS even if some of
        its lines never arrived (it then says how many are missing)."""
        timer = threading.Timer(LINE_GRACE_SECONDS, self._maybe_flush_done, args=(token, True))
        timer.daemon = True
        timer.start()

    def _final(self, msg):
        with self.lock:
            if msg["key"] in self.reported:
                return
            self.reported.add(msg["key"])
            self.outcomes[msg["key"]] = (
                msg["type"] == "done" and msg["exit_code"] == 0 and not msg["signal"]
            )
            self.emit(msg)
        self.release_queue.put(msg["key"])

    def on_future_done(self, fut):
        """Runs on distributed's callback thread when a future finishes."""
        try:
            self._on_future_done(fut)
        except Exception:
            log("failed to report %s:\n%s" % (fut.key, traceback.format_exc()))
            self._final(
                {
                    "type": "failed",
                    "key": fut.key,
                    "reason": "error",
                    "message": "bridge could not read the task outcome: %s"
                    % traceback.format_exc(limit=3),
                }
            )

    def _on_future_done(self, fut):
        key = fut.key
        status = fut.status
        if status == "finished":
            with self.lock:
                if key in self.reported:
                    # Its "end" event came first (the usual case): nothing to fetch.
                    return
            result = fut.result()
            if result.get("skipped"):
                self._final(
                    {"type": "skipped", "key": key, "upstream": result["upstream"]}
                )
                return
            token = result["token"]
            done = self._done_message(key, result)
            with self.lock:
                if key in self.reported or token in self.pending_done:
                    return  # the "end" event is being handled
                self.pending_done[token] = done
            self._maybe_flush_done(token)
            with self.lock:
                waiting = token in self.pending_done
            if waiting:
                self._flush_done_later(token)
            return

        with self.lock:
            canceled_by_us = key in self.canceled
            failed_deps = [
                d
                for d in self.deps.get(key, [])
                if d in self.futures and self.futures[d].status in ("error", "cancelled")
            ]
        if status == "cancelled" or canceled_by_us:
            if canceled_by_us:
                reason, message = "canceled", "canceled on request"
            elif failed_deps:
                reason = "upstream_failed"
                message = "upstream %s failed or was canceled" % ", ".join(failed_deps)
            else:
                client = self.client
                lost = client is None or client.status not in ("running", "connecting")
                reason = "scheduler_lost" if lost else "canceled"
                message = (
                    "the connection to the Dask scheduler was lost"
                    if lost
                    else "canceled by Dask (not requested by solidflow)"
                )
            self._final({"type": "failed", "key": key, "reason": reason, "message": message})
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
        elif failed_deps:
            reason = "upstream_failed"
        else:
            reason = "error"
        message = "%s: %s" % (name, exc)
        if reason == "upstream_failed":
            message = "upstream %s failed: %s" % (", ".join(failed_deps), message)
        self._final({"type": "failed", "key": key, "reason": reason, "message": message})


def main():
    out = Output()
    try:
        import dask
        import distributed
    except ImportError as e:
        out.emit(
            {
                "type": "error",
                "kind": "distributed_missing",
                "message": "the Python package 'distributed' is not importable by %s "
                "(%s); install it with `%s -m pip install dask distributed`, or the "
                "pinned versions with `%s -m pip install -r python/requirements.txt` "
                "(scripts/python-env.sh does this into .venv)"
                % (sys.executable, e, sys.executable, sys.executable),
            }
        )
        sys.exit(3)

    bridge = Bridge(out)

    def on_term(signum, frame):
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
        for raw in sys.stdin:
            raw = raw.strip()
            if not raw:
                continue
            req = None
            try:
                req = json.loads(raw)
                if not isinstance(req, dict):
                    raise BridgeError("bad_request", "a request must be a JSON object")
                bridge.handle(req)
            except SystemExit:
                raise
            except BridgeError as e:
                reply = {"type": "error", "kind": e.kind, "message": e.message}
                if isinstance(req, dict) and "id" in req:
                    reply["id"] = req["id"]
                out.emit(reply)
            except json.JSONDecodeError as e:
                out.emit(
                    {"type": "error", "kind": "bad_request", "message": "invalid JSON: %s" % e}
                )
            except Exception as e:
                log("request %r failed:\n%s" % (raw[:200], traceback.format_exc()))
                reply = {
                    "type": "error",
                    "kind": "internal",
                    "message": "%s: %s" % (type(e).__name__, e),
                }
                if isinstance(req, dict) and "id" in req:
                    reply["id"] = req["id"]
                out.emit(reply)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        code = 130
    finally:
        bridge.close()
        sys.stderr.flush()
        # distributed may leave non-daemon threads behind; do not wait for them.
        os._exit(code)


if __name__ == "__main__":
    main()
