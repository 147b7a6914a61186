"""The bridge protocol's messages, as types: requests (stdin) and messages (stdout).

Every message is one JSON object on one line, tagged by "type" (messages) or "op"
(requests). Failure reasons and error kinds are machine-readable codes; the Rust side
never reads message text. Golden examples live in tests/fixtures/protocol/.
"""

from __future__ import annotations

from typing import Literal, TypedDict, get_args

PROTOCOL_VERSION = 1

# Why a task ended without its command finishing.
FailureReason = Literal["worker_lost", "canceled", "not_started", "scheduler_lost", "withdrawn", "error"]
FAILURE_REASONS: tuple[str, ...] = get_args(FailureReason)

# What kind of request failed, in an "error" reply.
ErrorKind = Literal[
    "bad_request",
    "not_connected",
    "already_connected",
    "scheduler_unreachable",
    "not_a_scheduler",
    "tls_config",
    "workers_timeout",
    "missing_package",
    "distributed_missing",
    "internal",
]
ERROR_KINDS: tuple[str, ...] = get_args(ErrorKind)


class BridgeError(Exception):
    """A request failed; reported as an "error" message with `kind`."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message


def causes_of(exc: BaseException) -> list[str]:
    """The chain of exceptions behind `exc` ("raise ... from e", or raised while
    handling e), outermost first, as "<Type>: <text>"."""
    causes: list[str] = []
    seen = {id(exc)}
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen and len(causes) < 10:
        seen.add(id(cause))
        causes.append("%s: %s" % (type(cause).__name__, cause))
        cause = cause.__cause__ or cause.__context__
    return causes


# ---- requests ------------------------------------------------------------------------


class SubmitRequest(TypedDict, total=False):
    """`submit`: run one command as a Dask task."""

    op: Literal["submit"]
    id: int
    key: str
    command: list[str]
    stdin: str
    env: dict[str, str]
    cwd: str | None
    resources: dict[str, float]
    priority: int
    log_topic: str
    log_files: dict[str, str]
    parent_pid_env: str | None
    warm: dict[str, int] | None  # {"max_steps": N, "max_rss_mb": M}: run on a warm step server
    after: list[str]  # keys of submitted tasks to wait for; runs only if each exited 0, else "withdrawn"


class CancelRequest(TypedDict, total=False):
    """`cancel`: stop tasks and kill their processes (SIGTERM, SIGKILL after grace)."""

    op: Literal["cancel"]
    id: int
    keys: list[str]
    grace: float


# ---- messages ------------------------------------------------------------------------


class Ready(TypedDict):
    type: Literal["ready"]
    protocol: int
    python: str
    executable: str
    dask: str
    distributed: str
    pid: int


class WorkerInfo(TypedDict):
    address: str
    resources: dict[str, float]
    nthreads: int | None
    name: str | None


class Connected(TypedDict):
    type: Literal["connected"]
    scheduler: str
    dashboard: str | None
    created_cluster: bool
    workers: list[WorkerInfo]


class Submitted(TypedDict):
    type: Literal["submitted"]
    key: str


class Started(TypedDict):
    type: Literal["started"]
    key: str
    worker: str
    pid: int | None
    attempt: int


class Line(TypedDict):
    type: Literal["line"]
    key: str
    worker: str
    stream: Literal["stdout", "stderr"]
    line: str


class _DoneRequired(TypedDict):
    type: Literal["done"]
    key: str
    exit_code: int | None
    signal: int | None
    worker: str
    stderr_tail: str
    duration: float
    log_files: dict[str, str]


class Done(_DoneRequired, total=False):
    lines_missing: int


class _FailedRequired(TypedDict):
    type: Literal["failed"]
    key: str
    reason: FailureReason
    message: str


class Failed(_FailedRequired, total=False):
    causes: list[str]


class Canceled(TypedDict):
    type: Literal["canceled"]
    keys: list[str]
    killed: dict[str, str]


class Released(TypedDict):
    type: Literal["released"]
    keys: list[str]


class Uploaded(TypedDict):
    type: Literal["uploaded"]
    sha256: str
    remote_path: str | None
    worker_paths: dict[str, str]
    command0: str
    cached: bool
    bytes_sent: int
    kept: list[str]
    evicted: list[str]


class Shutdown(TypedDict):
    type: Literal["shutdown"]


class _ErrorRequired(TypedDict):
    type: Literal["error"]
    kind: ErrorKind
    message: str


class Error(_ErrorRequired, total=False):
    causes: list[str]


# Every message type by its "type" tag.
MESSAGES: dict[str, type] = {
    "ready": Ready,
    "connected": Connected,
    "submitted": Submitted,
    "started": Started,
    "line": Line,
    "done": Done,
    "failed": Failed,
    "canceled": Canceled,
    "released": Released,
    "uploaded": Uploaded,
    "shutdown": Shutdown,
    "error": Error,
}

# The requests the server serves.
OPS: tuple[str, ...] = (
    "connect",
    "submit",
    "cancel",
    "release",
    "upload_binary",
    "shutdown",
)


def error(kind: ErrorKind, message: str, causes: list[str] | None = None) -> Error:
    """An "error" message."""
    msg: Error = {"type": "error", "kind": kind, "message": message}
    if causes:
        msg["causes"] = causes
    return msg


def failed(key: str, reason: FailureReason, message: str, causes: list[str] | None = None) -> Failed:
    """A "failed" message."""
    msg: Failed = {"type": "failed", "key": key, "reason": reason, "message": message}
    if causes:
        msg["causes"] = causes
    return msg
