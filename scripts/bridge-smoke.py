"""End-to-end checks of the Dask bridge (the package
crates/solidflow/src/executor/dask/bridge/solidflow_dask_bridge) against real processes: a LocalCluster the bridge creates, and real
`dask scheduler` / `dask worker` processes on free loopback ports.

Run through scripts/bridge-smoke.sh (which makes the venv). Stdlib + psutil (a
dependency of distributed) only. Every process started here is killed at exit.
Prints one "ok ..." line per check; exits non-zero on the first failure. (The probe
that chose submit-when-ready over Dask dependencies is recorded in
docs/dask-bridge.md; the bridge no longer has a dependency mode.)
"""

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BRIDGE_DIR = os.path.join(ROOT, "crates/solidflow/src/executor/dask/bridge")
VENV_BIN = os.path.dirname(sys.executable)
DASK = os.path.join(VENV_BIN, "dask")
STARTED = []  # every Popen we start, for the final cleanup


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args, **kw):
    p = subprocess.Popen(args, start_new_session=True, **kw)
    STARTED.append(p)
    return p


def kill_tree(p, sig=signal.SIGKILL):
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def pid_alive(pid):
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("timed out after %gs waiting for %s" % (timeout, what))


class Bridge:
    def __init__(self):
        self.p = spawn(
            [sys.executable, "-m", "solidflow_dask_bridge"],
            env=dict(os.environ, PYTHONPATH=BRIDGE_DIR),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(os.path.join(LOGDIR, "bridge-%d.log" % len(STARTED)), "w"),
            text=True,
        )
        self.q = queue.Queue()
        self.seen = []
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()
        ready = self.expect(lambda m: m["type"] == "ready", 30)
        assert ready["distributed"], ready

    def _read(self):
        for line in self.p.stdout:
            self.q.put((time.monotonic(), json.loads(line)))
        self.q.put((time.monotonic(), None))

    def send(self, req):
        self.next_id += 1
        req = dict(req, id=self.next_id)
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        return self.next_id

    def expect(self, pred, timeout):
        """Next message matching pred (earlier non-matching ones are kept in .seen)."""
        deadline = time.monotonic() + timeout
        for i, (t, m) in enumerate(self.seen):
            if pred(m):
                del self.seen[i]
                m["_t"] = t
                return m
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("timed out; unmatched messages: %s" % self.seen[-20:])
            try:
                t, m = self.q.get(timeout=left)
            except queue.Empty:
                continue
            if m is None:
                raise AssertionError("bridge exited; messages: %s" % self.seen[-20:])
            if pred(m):
                m["_t"] = t
                return m
            self.seen.append((t, m))

    def request(self, req, timeout=60):
        rid = self.send(req)
        m = self.expect(lambda m: m.get("id") == rid, timeout)
        return m

    def final(self, key, timeout=60):
        return self.expect(
            lambda m: m.get("key") == key and m["type"] in ("done", "failed", "skipped"),
            timeout,
        )

    def messages_for(self, key):
        return [m for _, m in self.seen if m.get("key") == key]

    def shutdown(self):
        descendants = [c.pid for c in psutil.Process(self.p.pid).children(recursive=True)]
        r = self.request({"op": "shutdown"}, 60)
        assert r["type"] == "shutdown", r
        self.p.wait(30)
        assert self.p.returncode == 0, self.p.returncode
        wait_until(
            lambda: not any(pid_alive(p) for p in descendants),
            20,
            "bridge descendants %s to exit" % descendants,
        )
        return descendants


def sh(script):
    return ["sh", "-c", script]


def check_common(b, gpu_worker, label):
    # 1. live lines: "a" arrives a second before "b" and both before "done".
    key = label + "-live"
    b.request({"op": "submit", "key": key, "command": sh("echo a; sleep 1; echo b"), "log_topic": label})
    a = b.expect(lambda m: m.get("key") == key and m.get("line") == "a", 30)
    bl = b.expect(lambda m: m.get("key") == key and m.get("line") == "b", 30)
    done = b.final(key)
    assert done["type"] == "done" and done["exit_code"] == 0, done
    assert a["_t"] < bl["_t"] <= done["_t"], (a, bl, done)
    assert bl["_t"] - a["_t"] > 0.7, "lines not live: a->b %.3fs" % (bl["_t"] - a["_t"])
    print("ok %s: live lines (a->b %.2fs, b->done %.3fs)" % (label, bl["_t"] - a["_t"], done["_t"] - bl["_t"]))

    # 2. GPU task lands on the GPU worker only.
    workers = set()
    for i in range(4):
        k = "%s-gpu-%d" % (label, i)
        b.request({"op": "submit", "key": k, "command": sh("echo gpu"), "resources": {"GPU": 1}, "log_topic": label})
    for i in range(4):
        d = b.final("%s-gpu-%d" % (label, i))
        assert d["type"] == "done", d
        workers.add(d["worker"])
    assert workers == {gpu_worker}, (workers, gpu_worker)
    print("ok %s: 4 GPU tasks all ran on %s" % (label, gpu_worker))

    # 4. exit codes, signals, stdin, env, stderr tail, long lines.
    k = label + "-exit"
    b.request({"op": "submit", "key": k, "command": sh("cat; echo $FOO; echo oops >&2; exit 3"),
               "stdin": "in1\nin2\n", "env": {"FOO": "bar"}, "log_topic": label})
    d = b.final(k)
    lines = [m["line"] for m in b.messages_for(k) if m["type"] == "line" and m["stream"] == "stdout"]
    assert d["exit_code"] == 3 and d["stderr_tail"] == "oops" and lines == ["in1", "in2", "bar"], (d, lines)
    k = label + "-long"
    b.request({"op": "submit", "key": k, "command": [sys.executable, "-c", "print('x'*100000)"], "log_topic": label})
    d = b.final(k)
    lines = [m["line"] for m in b.messages_for(k) if m["type"] == "line"]
    assert d["exit_code"] == 0 and lines == ["x" * 100000], [len(l) for l in lines]
    k = label + "-sig"
    b.request({"op": "submit", "key": k, "command": sh("kill -9 $$"), "log_topic": label})
    d = b.final(k)
    assert d["exit_code"] is None and d["signal"] == 9, d
    print("ok %s: exit code 3 + stdin + env + stderr tail; 100000-char line reassembled; signal 9" % label)

    # 6. cancel kills the running subprocess (and its process group).
    k = label + "-cancel"
    b.request({"op": "submit", "key": k, "command": sh("sleep 300 & echo child $!; wait"), "log_topic": label})
    st = b.expect(lambda m: m.get("key") == k and m["type"] == "started", 30)
    child = b.expect(lambda m: m.get("key") == k and m.get("line", "").startswith("child "), 30)
    grandchild = int(child["line"].split()[1])
    assert pid_alive(st["pid"]) and pid_alive(grandchild)
    t0 = time.monotonic()
    r = b.request({"op": "cancel", "keys": [k]})
    assert r["type"] == "canceled" and k in r["killed"], r
    f = b.final(k)
    assert f["type"] == "failed" and f["reason"] == "canceled", f
    wait_until(lambda: not pid_alive(st["pid"]) and not pid_alive(grandchild), 10, "canceled step to die")
    print("ok %s: cancel killed pid %d and its group child %d in %.2fs" % (label, st["pid"], grandchild, time.monotonic() - t0))

    # 7. upload_binary: content-addressed, used via {uploaded:<sha>}.
    tool = os.path.join(LOGDIR, "tool.sh")
    with open(tool, "w") as f:
        f.write("#!/bin/sh\necho uploaded-tool \"$@\"\n")
    import hashlib

    sha = hashlib.sha256(open(tool, "rb").read()).hexdigest()
    r = b.request({"op": "upload_binary", "path": tool, "sha256": sha})
    assert r["type"] == "uploaded" and r["remote_path"].endswith(sha), r
    assert os.access(r["remote_path"], os.X_OK)
    k = label + "-bin"
    b.request({"op": "submit", "key": k, "command": ["{uploaded:%s}" % sha, "hi"], "log_topic": label})
    d = b.final(k)
    lines = [m["line"] for m in b.messages_for(k) if m["type"] == "line"]
    assert d["exit_code"] == 0 and lines == ["uploaded-tool hi"], (d, lines)
    r = b.request({"op": "upload_binary", "path": tool, "sha256": "0" * 64})
    assert r["type"] == "error" and r["kind"] == "bad_request", r
    print("ok %s: upload_binary -> {uploaded:%s...} ran; wrong sha256 rejected" % (label, sha[:12]))


def local_cluster_checks():
    b = Bridge()
    r = b.request({"op": "connect", "n_workers": 2, "threads_per_worker": 1,
                   "worker_resources": [{"GPU": 1}, {}], "timeout": 60}, 120)
    assert r["type"] == "connected" and r["created_cluster"], r
    assert r["scheduler"].startswith("tcp://127.0.0.1:"), r
    gpu = [w["address"] for w in r["workers"] if w["resources"].get("GPU")]
    assert len(r["workers"]) == 2 and len(gpu) == 1, r
    print("ok local: created cluster %s, dashboard %s" % (r["scheduler"], r["dashboard"]))
    check_common(b, gpu[0], "local")
    gone = b.shutdown()
    print("ok local: shutdown closed the cluster; all %d descendant processes exited" % len(gone))

    # stdin EOF (parent died) also closes a created cluster.
    b = Bridge()
    r = b.request({"op": "connect", "n_workers": 1, "threads_per_worker": 1}, 120)
    assert r["type"] == "connected", r
    descendants = [c.pid for c in psutil.Process(b.p.pid).children(recursive=True)]
    b.p.stdin.close()
    b.p.wait(60)
    wait_until(lambda: not any(pid_alive(p) for p in descendants), 20, "cluster to exit after EOF")
    print("ok local: stdin EOF -> bridge exit %d, %d cluster processes gone" % (b.p.returncode, len(descendants)))


class RealCluster:
    def __init__(self):
        self.port = free_port()
        self.address = "tcp://127.0.0.1:%d" % self.port
        self.sched = spawn([DASK, "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                            "--dashboard-address", ":0"],
                           stdout=subprocess.DEVNULL, stderr=open(os.path.join(LOGDIR, "scheduler.log"), "w"))
        self.workers = {}
        self.start_worker("cpu")
        self.start_worker("gpu", ["--resources", "GPU=1"])

    def start_worker(self, name, extra=()):
        self.workers[name] = spawn(
            [DASK, "worker", self.address, "--nthreads", "1", "--host", "127.0.0.1",
             "--name", name, "--dashboard-address", ":0", *extra],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(LOGDIR, "worker-%s.log" % name), "a"),
        )

    def kill_worker(self, name):
        kill_tree(self.workers[name])
        self.workers[name].wait()


def wait_workers(b, n):
    def enough():
        r = b.request({"op": "workers"})
        return len(r["workers"]) == n

    wait_until(enough, 60, "%d workers" % n)
    return {w["name"]: w["address"] for w in b.request({"op": "workers"})["workers"]}


def real_cluster_checks():
    c = RealCluster()
    b = Bridge()
    # unreachable scheduler: a closed port, short timeout.
    dead = "tcp://127.0.0.1:%d" % free_port()
    t0 = time.monotonic()
    r = b.request({"op": "connect", "address": dead, "timeout": 2}, 60)
    assert r["type"] == "error" and r["kind"] == "scheduler_unreachable" and dead in r["message"], r
    print("ok real: unreachable scheduler reported after %.1fs: %s" % (time.monotonic() - t0, r["message"][:100]))

    r = b.request({"op": "connect", "address": c.address, "timeout": 30, "wait_for_workers": 2}, 90)
    assert r["type"] == "connected" and not r["created_cluster"] and r["scheduler"] == c.address, r
    names = wait_workers(b, 2)
    print("ok real: connected to %s with workers %s" % (c.address, names))
    check_common(b, names["gpu"], "real")

    # worker loss with the default allowed-failures (3): Dask retries on the other worker.
    k = "real-kill-retry"
    b.request({"op": "submit", "key": k, "command": sh("echo begin; sleep 3; echo end"), "log_topic": "real"})
    st = b.expect(lambda m: m.get("key") == k and m["type"] == "started", 30)
    b.expect(lambda m: m.get("key") == k and m.get("line") == "begin", 30)
    victim = [n for n, a in names.items() if a == st["worker"]][0]
    c.kill_worker(victim)
    wait_until(lambda: not pid_alive(st["pid"]), 10, "orphaned step to die with its worker")
    st2 = b.expect(lambda m: m.get("key") == k and m["type"] == "started", 60)
    d = b.final(k)
    assert st2["attempt"] == 2 and st2["worker"] != st["worker"], (st, st2)
    assert d["type"] == "done" and d["exit_code"] == 0 and d["worker"] == st2["worker"], d
    print("ok real: kill -9 of worker %s mid-task: step pid died with it; Dask re-ran the task on %s "
          "(started attempt=2), then done" % (victim, d["worker"]))
    c.start_worker(victim, ["--resources", "GPU=1"] if victim == "gpu" else [])
    names = wait_workers(b, 2)
    b.shutdown()

    # worker loss with allowed_failures=0: reported as failed/worker_lost.
    b = Bridge()
    r = b.request({"op": "connect", "address": c.address, "timeout": 30, "allowed_failures": 0}, 90)
    assert r["type"] == "connected", r
    k = "real-kill-lost"
    b.request({"op": "submit", "key": k, "command": sh("echo begin; sleep 30"), "resources": {"GPU": 1}})
    st = b.expect(lambda m: m.get("key") == k and m["type"] == "started", 30)
    c.kill_worker("gpu")
    f = b.final(k, 60)
    assert f["type"] == "failed" and f["reason"] == "worker_lost", f
    wait_until(lambda: not pid_alive(st["pid"]), 10, "orphaned step to die with its worker")
    print("ok real: allowed_failures=0 + kill -9 -> failed/worker_lost: %s" % f["message"][:120])
    c.start_worker("gpu", ["--resources", "GPU=1"])
    names = wait_workers(b, 2)
    b.request({"op": "connect", "address": c.address})  # already connected -> error, keeps serving
    b.shutdown()
    alive = [n for n, p in c.workers.items() if p.poll() is None]
    assert c.sched.poll() is None and len(alive) == 2, "shutdown must not close an existing cluster"
    print("ok real: shutdown left the existing scheduler and workers running")
    return c


LOGDIR = None


def main():
    global LOGDIR
    import tempfile

    LOGDIR = tempfile.mkdtemp(prefix="solidflow-bridge-smoke-")
    print("logs in", LOGDIR)
    try:
        what = sys.argv[1:] or ["local", "real"]
        if "local" in what:
            local_cluster_checks()
        if "real" in what:
            real_cluster_checks()
    finally:
        for p in STARTED:
            kill_tree(p, signal.SIGTERM)
        time.sleep(0.5)
        for p in STARTED:
            kill_tree(p)
            try:
                p.wait(10)
            except Exception:
                pass
    print("bridge smoke: all checks passed")


if __name__ == "__main__":
    main()
