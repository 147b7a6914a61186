"""Shipping a build (the pipeline's binary) to the workers once.

- The parent's bridge asks the scheduler whether it holds the build (by sha256) and
  uploads it, in chunks, only when it does not (`ship`).
- The scheduler keeps builds on its own disk, not in its memory (`BuildStore`): the
  `keep` most recently used ones, evicting older builds that no connected client uses.
- A worker fetches a build from the scheduler when a task first needs it
  (`ensure_build`) into its content-addressed cache; a worker that joins later fetches
  nothing until one of its tasks runs that build.

The scheduler side is installed by `install_store` (run on the scheduler with
`run_on_scheduler`), which adds the handlers named in `HANDLERS` to the scheduler. Like
`worker`, this module travels by value (cloudpickle), so neither scheduler nor workers
need solidflow installed.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import tempfile
import threading
from typing import Any

# Versioned names of the scheduler handlers: a bridge of another protocol version on a
# shared scheduler installs its own.
HANDLER_PREFIX = "solidflow_builds_v1_"
HANDLERS = ("has", "put", "commit", "read")
# The scheduler extension holding the store.
EXTENSION = "solidflow-builds"
# Builds the scheduler keeps unless the request says otherwise.
DEFAULT_KEEP = 3
# Upload and download chunk size: bounds what one message holds in memory.
CHUNK_BYTES = 4 * 1024 * 1024
# Where the scheduler keeps builds (default: <tmp>/solidflow-builds/<scheduler id>).
STORE_ENV = "SOLIDFLOW_BUILD_STORE"
# Where a worker caches builds (default: <tmp>/solidflow-bin).
CACHE_ENV = "SOLIDFLOW_BIN_CACHE"


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _valid_sha(sha: Any) -> bool:
    return isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)


class BuildStore:
    """The scheduler's builds: files named by sha256 in `directory`, in order of use.

    Not thread-safe by itself; the scheduler calls its handlers on its event loop."""

    def __init__(self, directory: str, keep: int) -> None:
        self.directory = directory
        self.keep = max(1, int(keep))
        os.makedirs(directory, exist_ok=True)
        self.order: collections.OrderedDict[str, None] = collections.OrderedDict()  # oldest use first
        self.users: dict[str, set[str]] = {}  # sha -> client ids that asked for it
        self.partial: dict[str, int] = {}  # sha -> bytes received so far
        for name in sorted(os.listdir(directory), key=lambda n: os.path.getmtime(os.path.join(directory, n))):
            if _valid_sha(name):
                self.order[name] = None
            else:  # a partial upload of a scheduler that died
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))

    def path(self, sha: str) -> str:
        return os.path.join(self.directory, sha)

    def _touch(self, sha: str, client: str | None) -> None:
        self.order[sha] = None
        self.order.move_to_end(sha)
        if client:
            self.users.setdefault(sha, set()).add(client)

    def has(self, sha: str, client: str | None = None) -> bool:
        """Whether the build is here; if so it becomes the most recently used."""
        if sha in self.order and os.path.exists(self.path(sha)):
            self._touch(sha, client)
            return True
        self.order.pop(sha, None)
        return False

    def put(self, sha: str, offset: int, data: bytes) -> int:
        """Appends one chunk of an upload; returns the bytes received so far."""
        if not _valid_sha(sha):
            raise ValueError("not a sha256: %r" % (sha,))
        have = self.partial.get(sha, 0)
        if offset == 0:
            have = 0
        elif offset != have:
            raise ValueError("chunk of %s at offset %d, expected %d" % (sha[:12], offset, have))
        with open(self.path(sha) + ".partial", "wb" if offset == 0 else "ab") as f:
            f.write(data)
        self.partial[sha] = have + len(data)
        return self.partial[sha]

    def commit(self, sha: str, client: str | None, active: set[str]) -> list[str]:
        """Checks the uploaded build's hash, makes it the most recent, and evicts;
        returns the evicted hashes."""
        self.partial.pop(sha, None)
        tmp = self.path(sha) + ".partial"
        got = sha256_of(tmp)
        if got != sha:
            os.unlink(tmp)
            raise ValueError("the upload of %s arrived with sha256 %s" % (sha[:12], got[:12]))
        os.replace(tmp, self.path(sha))
        self._touch(sha, client)
        return self.evict(active)

    def evict(self, active: set[str]) -> list[str]:
        """Deletes the least recently used builds beyond `keep`, skipping those that a
        connected client (one of `active`) uses."""
        evicted = []
        for sha in list(self.order):
            if len(self.order) <= self.keep:
                break
            users = self.users.get(sha, set()) & active
            self.users[sha] = users
            if users:
                continue
            del self.order[sha]
            self.users.pop(sha, None)
            with contextlib.suppress(OSError):
                os.unlink(self.path(sha))
            evicted.append(sha)
        return evicted

    def read(self, sha: str, offset: int, size: int) -> bytes | None:
        """One chunk of a build, or None when it is not here."""
        if sha not in self.order:
            return None
        try:
            with open(self.path(sha), "rb") as f:
                f.seek(offset)
                return f.read(min(size, CHUNK_BYTES))
        except OSError:
            return None

    def builds(self) -> list[str]:
        """The builds held, most recently used first."""
        return list(reversed(self.order))

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.directory, ignore_errors=True)


def store_directory(scheduler_id: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in scheduler_id)
    root = os.environ.get(STORE_ENV) or os.path.join(tempfile.gettempdir(), "solidflow-builds")
    return os.path.join(root, safe)


def install_store(keep: int, dask_scheduler: Any = None) -> list[str]:
    """Run on the scheduler: creates the build store (once), sets how many builds it
    keeps and adds its handlers. Returns the builds it holds, most recent first."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    scheduler = dask_scheduler
    store = scheduler.extensions.get(EXTENSION)
    if store is None:
        store = BuildStore(store_directory(str(scheduler.id)), keep)
        scheduler.extensions[EXTENSION] = store

        def active() -> set[str]:
            return set(scheduler.clients)

        def has(sha: str, client: str | None = None) -> dict[str, Any]:
            return {"has": store.has(sha, client), "kept": store.builds()}

        def put(sha: str, offset: int, data: bytes) -> int:
            return store.put(sha, offset, data)

        def commit(sha: str, client: str | None = None) -> dict[str, Any]:
            evicted = store.commit(sha, client, active())
            return {"evicted": evicted, "kept": store.builds()}

        def read(sha: str, offset: int = 0, size: int = CHUNK_BYTES) -> bytes | None:
            return store.read(sha, offset, size)

        for name, fn in zip(HANDLERS, (has, put, commit, read), strict=True):
            scheduler.handlers[HANDLER_PREFIX + name] = fn

        class RemoveBuilds(SchedulerPlugin):
            """Deletes the store's directory when the scheduler closes."""

            name = "solidflow-builds-cleanup"

            async def close(self) -> None:
                store.close()

        scheduler.add_plugin(RemoveBuilds(), name=RemoveBuilds.name, idempotent=True)
    store.keep = max(1, int(keep))
    store.evict(set(scheduler.clients))
    return store.builds()


def ship(client: Any, path: str, want: str | None, keep: int) -> dict[str, Any]:
    """Makes sure the scheduler holds the build at `path`; uploads it only if the
    scheduler does not have it. Returns what happened, with the bytes sent."""
    sha = sha256_of(path)
    if want and want.lower() != sha:
        raise ValueError("sha256 of %s is %s, not %s as requested" % (path, sha, want))
    client.run_on_scheduler(install_store, int(keep))
    rpc = client.scheduler
    there = client.sync(getattr(rpc, HANDLER_PREFIX + "has"), sha=sha, client=client.id)
    if there["has"]:
        return {"sha256": sha, "cached": True, "bytes_sent": 0, "evicted": [], "kept": there["kept"]}
    sent = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK_BYTES)
            client.sync(getattr(rpc, HANDLER_PREFIX + "put"), sha=sha, offset=sent, data=chunk)
            sent += len(chunk)
            if len(chunk) < CHUNK_BYTES:
                break
    result = client.sync(getattr(rpc, HANDLER_PREFIX + "commit"), sha=sha, client=client.id)
    return {"sha256": sha, "cached": False, "bytes_sent": sent, "evicted": result["evicted"], "kept": result["kept"]}


def bin_dir() -> str:
    """The worker's content-addressed cache of shipped builds."""
    return os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "solidflow-bin")


def worker_bin_path(sha: str) -> str:
    """Where a shipped build with this hash lives on this worker."""
    return os.path.join(bin_dir(), sha)


def verified_build(worker: Any, sha: str) -> str | None:
    """The path of build `sha` if this worker process checked it already, else None
    (`ensure_build` then fetches or checks it)."""
    if sha in worker.__dict__.get("_solidflow_verified_builds", ()):
        return worker_bin_path(sha)
    return None


def ensure_build(worker: Any, sha: str) -> str:
    """The path of build `sha` on this worker, fetched from the scheduler the first
    time a task needs it (and checked against its hash once per worker process)."""
    from distributed.utils import sync

    path = worker_bin_path(sha)
    verified = worker.__dict__.setdefault("_solidflow_verified_builds", set())
    if sha in verified:
        return path
    with worker.__dict__.setdefault("_solidflow_fetch_lock", threading.Lock()):
        if sha in verified:
            return path
        if os.path.exists(path) and sha256_of(path) == sha:
            verified.add(sha)
            return path
        directory = bin_dir()
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + sha[:12])
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as f:
                offset = 0
                while True:
                    chunk = sync(
                        worker.loop,
                        getattr(worker.scheduler, HANDLER_PREFIX + "read"),
                        sha=sha,
                        offset=offset,
                        size=CHUNK_BYTES,
                    )
                    if chunk is None:
                        raise RuntimeError(
                            "build %s is not on the Dask scheduler (it was evicted, or the scheduler restarted): "
                            "run again to ship it, or raise the dask executor's `keep_builds`" % sha[:12]
                        )
                    if not chunk:
                        break
                    f.write(chunk)
                    h.update(chunk)
                    offset += len(chunk)
            if h.hexdigest() != sha:
                raise RuntimeError(
                    "build %s arrived from the scheduler with sha256 %s" % (sha[:12], h.hexdigest()[:12])
                )
            os.chmod(tmp, 0o755)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        verified.add(sha)
        return path
