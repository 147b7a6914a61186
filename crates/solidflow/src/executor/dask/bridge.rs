//! Rust client for the Dask bridge.
//!
//! Dask's client protocol is pickled Python, so the Dask executor does not speak it:
//! it starts `bridge.py` (embedded in this crate with `include_str!`) under a Python
//! interpreter that has `distributed` installed and talks to it in JSON lines:
//! requests on the bridge's stdin, messages on its stdout. The protocol is documented
//! in `docs/dask-bridge.md`.
//!
//! [`Bridge::spawn`] starts the program and waits for its `ready` message. It returns
//! the [`Bridge`] handle, used to send requests, and a receiver of [`BridgeMessage`]s
//! where everything that happens to submitted tasks arrives, in order: `started`,
//! `line` (live stdout/stderr of the step), and one final `done`, `failed` or
//! `skipped` per key. Replies to requests (`connected`, `canceled`, `uploaded`, ...)
//! are returned by the request methods instead. When the bridge exits, the receiver
//! gets [`BridgeMessage::Exited`] and then closes.
//!
//! The bridge's stderr (Dask's own logs, Python tracebacks) is forwarded to
//! `tracing` under the target `solidflow::dask::bridge`, and its tail is kept for
//! error messages.
//!
//! Dropping a [`Bridge`] closes its stdin: the bridge then kills the steps it is
//! running, closes its client and, if it created the cluster, the cluster, and
//! exits. [`Bridge::shutdown`] does the same and waits for it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, Command};
use tokio::sync::{mpsc, oneshot, watch};

/// Source of the bridge program, run by the Python interpreter.
pub const BRIDGE_SOURCE: &str = include_str!("bridge.py");

/// Version of the JSON-lines protocol this client speaks (the bridge's `ready`
/// message must report the same).
pub const PROTOCOL_VERSION: u32 = 1;

/// Environment variable naming the Python interpreter for the bridge, used when the
/// executor config has no `python:`.
pub const PYTHON_ENV_VAR: &str = "SOLIDFLOW_PYTHON";

/// How many stderr lines of the bridge are kept for error messages.
const STDERR_TAIL_LINES: usize = 60;

/// Extra time, beyond a request's own Dask timeout, that a reply may take.
const REPLY_MARGIN: Duration = Duration::from_secs(30);

/// The interpreter to use when none is configured: `$SOLIDFLOW_PYTHON`, else `python3`.
pub fn default_python() -> PathBuf {
    std::env::var_os(PYTHON_ENV_VAR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// Errors of the bridge client. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The interpreter could not be found.
    #[error(
        "Python interpreter `{}` not found ({source}); the Dask executor needs Python 3.10+ \
         with dask and distributed: set `python:` in the dask executor config or the \
         SOLIDFLOW_PYTHON environment variable to its path (scripts/python-env.sh creates \
         one in .venv)",
        python.display()
    )]
    PythonNotFound {
        /// The interpreter that was tried.
        python: PathBuf,
        /// The spawn error.
        source: std::io::Error,
    },
    /// The interpreter exists but could not be started.
    #[error("could not start the Dask bridge with `{}`: {source}", python.display())]
    Spawn {
        /// The interpreter that was tried.
        python: PathBuf,
        /// The spawn error.
        source: std::io::Error,
    },
    /// `distributed` cannot be imported by the interpreter.
    #[error(
        "the Dask bridge cannot import `distributed` with `{}`: {message}. Install it with \
         `{} -m pip install dask distributed`, or the pinned versions with \
         `{} -m pip install -r python/requirements.txt`",
        python.display(), python.display(), python.display()
    )]
    DistributedMissing {
        /// The interpreter that was used.
        python: PathBuf,
        /// What the bridge reported.
        message: String,
    },
    /// The bridge did not say `ready` in time.
    #[error(
        "the Dask bridge (`{}`) did not start within {timeout:?}; its stderr ends with:\n{stderr_tail}",
        python.display()
    )]
    StartupTimeout {
        /// The interpreter that was used.
        python: PathBuf,
        /// How long we waited.
        timeout: Duration,
        /// Last lines of the bridge's stderr.
        stderr_tail: String,
    },
    /// The bridge speaks another protocol version (a stale bridge.py?).
    #[error("the Dask bridge speaks protocol {found}, this solidflow speaks {PROTOCOL_VERSION}")]
    ProtocolMismatch {
        /// The version the bridge reported.
        found: u32,
    },
    /// The Dask scheduler did not answer within the timeout.
    #[error("Dask scheduler {address} unreachable within {timeout:?}: {message}")]
    SchedulerUnreachable {
        /// The scheduler address from the config.
        address: String,
        /// The connect timeout.
        timeout: Duration,
        /// What `distributed` said.
        message: String,
    },
    /// An optional Python package (e.g. dask-jobqueue) is needed; the message has the
    /// exact `pip install` command.
    #[error("{message}")]
    MissingPackage {
        /// The bridge's message, with the fix.
        message: String,
    },
    /// The bridge exited, or closed its stdout, while it was needed.
    #[error("the Dask bridge died unexpectedly ({status}); its stderr ends with:\n{stderr_tail}")]
    BridgeDied {
        /// Exit status, if it is known yet.
        status: String,
        /// Last lines of the bridge's stderr.
        stderr_tail: String,
    },
    /// A reply did not arrive in time.
    #[error("the Dask bridge did not answer `{op}` within {timeout:?}")]
    ReplyTimeout {
        /// The request's op.
        op: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The bridge reported an error for a request (`kind` is e.g. `bad_request`,
    /// `not_connected`, `workers_timeout`, `internal`).
    #[error("Dask bridge error ({kind}): {message}")]
    Remote {
        /// The error kind.
        kind: String,
        /// The error message.
        message: String,
    },
    /// The bridge answered with a message this request does not expect.
    #[error("unexpected reply from the Dask bridge to `{op}`: {reply:?}")]
    UnexpectedReply {
        /// The request's op.
        op: String,
        /// What came back.
        reply: Box<BridgeMessage>,
    },
    /// Writing the bridge program to a temporary file failed.
    #[error("could not write the Dask bridge program to a temporary file: {0}")]
    Script(std::io::Error),
}

/// How to start the bridge.
#[derive(Debug, Clone)]
pub struct BridgeOptions {
    /// Python interpreter with `distributed` installed.
    pub python: PathBuf,
    /// Extra interpreter arguments, placed before the program (e.g. `-X dev`).
    pub python_args: Vec<OsString>,
    /// Extra environment variables for the bridge (and a LocalCluster it creates).
    pub env: Vec<(OsString, OsString)>,
    /// How long the bridge may take to import `distributed` and say `ready`.
    pub startup_timeout: Duration,
    /// How long quick requests (submit, cancel, workers, ...) may take to be answered.
    pub request_timeout: Duration,
}

impl Default for BridgeOptions {
    fn default() -> Self {
        Self {
            python: default_python(),
            python_args: Vec::new(),
            env: Vec::new(),
            startup_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(60),
        }
    }
}

// ----------------------------------------------------------------------------------
// Requests
// ----------------------------------------------------------------------------------

/// Which cluster to create or join (`connect`'s `cluster`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterKind {
    /// A `LocalCluster` (or `SpecCluster` for per-worker resources) on 127.0.0.1.
    Local,
    /// A running scheduler at `address`.
    Existing,
    /// `dask_jobqueue.SLURMCluster`.
    Slurm,
    /// `dask_jobqueue.PBSCluster`.
    Pbs,
    /// `dask_jobqueue.SGECluster`.
    Sge,
    /// `dask_jobqueue.LSFCluster`.
    Lsf,
    /// `dask_kubernetes.operator.KubeCluster`.
    Kube,
    /// `distributed.SSHCluster` (needs asyncssh).
    Ssh,
    /// `dask_yarn.YarnCluster`.
    Yarn,
}

/// Adaptive scaling bounds for a created cluster (`cluster.adapt(...)`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AdaptSpec {
    /// Minimum number of workers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minimum: Option<u32>,
    /// Maximum number of workers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maximum: Option<u32>,
}

/// The cluster manager and its options, passed straight to its Python class.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterSpec {
    /// Which manager.
    pub kind: ClusterKind,
    /// Keyword arguments of the manager's class (e.g. `queue`, `cores`, `memory`).
    #[serde(default)]
    pub options: serde_json::Map<String, Value>,
    /// Adaptive scaling instead of a fixed `n_workers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapt: Option<AdaptSpec>,
}

/// TLS files for connecting to a `tls://` scheduler.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TlsConfig {
    /// CA certificate.
    pub ca_file: Option<PathBuf>,
    /// Client certificate.
    pub cert: Option<PathBuf>,
    /// Client private key.
    pub key: Option<PathBuf>,
}

/// Resources of the workers of a created local cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WorkerResources {
    /// The same resources on every worker.
    Uniform(BTreeMap<String, f64>),
    /// One map per worker (creates that many workers).
    PerWorker(Vec<BTreeMap<String, f64>>),
}

/// `connect`: create a cluster or join one. All fields are optional; the default
/// creates a LocalCluster with Dask's default size.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnectRequest {
    /// Scheduler address (`tcp://...`, `tls://...`) of an existing cluster.
    pub address: Option<String>,
    /// Seconds to wait for the scheduler (and for `wait_for_workers`).
    pub timeout: Option<f64>,
    /// TLS files, for `tls://` addresses.
    pub tls: Option<TlsConfig>,
    /// Cluster manager; `None` means `existing` if `address` is set, else `local`.
    pub cluster: Option<ClusterSpec>,
    /// Workers to start (local) or scale to (managers).
    pub n_workers: Option<u32>,
    /// Threads per worker, i.e. concurrent steps per worker.
    pub threads_per_worker: Option<u32>,
    /// Memory limit per worker (`"4GiB"`, bytes, or `"auto"`).
    pub memory_limit: Option<Value>,
    /// Worker resources for a created local cluster.
    pub worker_resources: Option<WorkerResources>,
    /// `distributed.scheduler.allowed-failures`: how many worker deaths a task
    /// survives (re-run elsewhere) before it fails as `worker_lost`. On an existing
    /// scheduler this changes the setting for all its clients.
    pub allowed_failures: Option<u32>,
    /// Wait until this many workers have joined before replying.
    pub wait_for_workers: Option<u32>,
}

/// How `deps` are enforced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DepMode {
    /// The bridge holds the task and submits it to Dask once every dependency is
    /// `done` with exit code 0 (or reports it `skipped`). Siblings then spread over
    /// all workers (see the measurements in docs/dask-bridge.md).
    #[default]
    Bridge,
    /// Pass the dependencies' futures as task arguments; Dask prefers the worker that
    /// holds them.
    Dask,
}

/// `submit`: run one command as a Dask task.
#[derive(Debug, Clone, Serialize)]
pub struct SubmitRequest {
    /// Unique Dask key (include run id and attempt).
    pub key: String,
    /// argv. `command[0]` may be `{uploaded:<sha256>}` (see [`Bridge::upload_binary`]).
    pub command: Vec<String>,
    /// Fed to the process's stdin, which is then closed.
    pub stdin: String,
    /// Added to the worker's environment.
    pub env: BTreeMap<String, String>,
    /// Working directory on the worker.
    pub cwd: Option<PathBuf>,
    /// Dask resources the task needs, e.g. `{"GPU": 1}`.
    pub resources: BTreeMap<String, f64>,
    /// Dask priority (higher runs first).
    pub priority: i64,
    /// Keys of earlier submits this one waits for.
    pub deps: Vec<String>,
    /// How `deps` are enforced.
    pub dep_mode: DepMode,
    /// Skip (report `skipped`) if a dependency did not succeed.
    pub skip_on_upstream_failure: bool,
    /// Event topic for live lines; use one per run.
    pub log_topic: String,
    /// Files on the worker (`stdout`, `stderr`) that get a complete copy of the
    /// command's output, appended to; best effort (skipped if they can't be opened).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub log_files: BTreeMap<String, PathBuf>,
    /// An environment variable that gets the worker process's pid, for a command that
    /// makes itself die with its parent when it finds it (solidflow's step mode does,
    /// with [`crate::executor::PARENT_PID_ENV`]). With it, the command starts without
    /// a `preexec_fn` (which would make Python fork the big worker process: ~10 ms
    /// instead of ~0.1 ms with vfork). Without it the bridge sets `PR_SET_PDEATHSIG`
    /// itself, in a `preexec_fn`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_pid_env: Option<String>,
}

impl SubmitRequest {
    /// A request with no stdin, env, resources or deps, skipping on upstream failure.
    pub fn new(key: impl Into<String>, command: Vec<String>, log_topic: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            command,
            stdin: String::new(),
            env: BTreeMap::new(),
            cwd: None,
            resources: BTreeMap::new(),
            priority: 0,
            deps: Vec::new(),
            dep_mode: DepMode::Bridge,
            skip_on_upstream_failure: true,
            log_topic: log_topic.into(),
            log_files: BTreeMap::new(),
            parent_pid_env: None,
        }
    }
}

// ----------------------------------------------------------------------------------
// Messages
// ----------------------------------------------------------------------------------

/// The bridge's first message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadyInfo {
    /// Protocol version.
    pub protocol: u32,
    /// Python version.
    pub python: String,
    /// `sys.executable`.
    pub executable: String,
    /// dask version.
    pub dask: String,
    /// distributed version.
    pub distributed: String,
    /// Bridge process id.
    pub pid: u32,
}

/// A Dask worker as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// `tcp://host:port`.
    pub address: String,
    /// Resources it offers.
    #[serde(default)]
    pub resources: BTreeMap<String, f64>,
    /// Threads (concurrent tasks).
    pub nthreads: Option<u32>,
    /// Worker name.
    #[serde(default)]
    pub name: Option<String>,
}

/// Reply to `connect`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectedInfo {
    /// Scheduler address.
    pub scheduler: String,
    /// Dashboard URL, if any.
    pub dashboard: Option<String>,
    /// Whether the bridge created (and will close) the cluster.
    pub created_cluster: bool,
    /// Workers connected now.
    pub workers: Vec<WorkerInfo>,
}

/// Final message of a task whose command ran to the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskDone {
    /// The key.
    pub key: String,
    /// Exit code, or `None` if killed by a signal.
    pub exit_code: Option<i32>,
    /// Signal that killed the process.
    pub signal: Option<i32>,
    /// Worker it ran on.
    pub worker: String,
    /// Last stderr lines (at most 8 KiB).
    pub stderr_tail: String,
    /// Run time in seconds.
    pub duration: f64,
    /// Set when some live lines did not arrive within 5 s of the end.
    #[serde(default)]
    pub lines_missing: Option<u64>,
    /// The worker-side copies of the output that were written (`stdout`, `stderr`).
    #[serde(default)]
    pub log_files: BTreeMap<String, String>,
}

impl TaskDone {
    /// Exit code 0 and no signal.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && self.signal.is_none()
    }
}

/// Why a task failed without its command finishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// Its worker died (more often than `allowed_failures`).
    WorkerLost,
    /// Canceled (by `cancel`, or by Dask).
    Canceled,
    /// No worker offers the resources it needs; it was never submitted.
    UnsatisfiableResources,
    /// A `dep_mode: dask` dependency failed.
    UpstreamFailed,
    /// The connection to the scheduler was lost.
    SchedulerLost,
    /// Anything else: the command could not start, bad request, task exception.
    Error,
    /// A reason this client does not know.
    #[serde(other)]
    Other,
}

/// Final message of a task that failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskFailed {
    /// The key.
    pub key: String,
    /// Category.
    pub reason: FailureReason,
    /// Human-readable detail.
    pub message: String,
}

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// The step's stdout.
    #[default]
    Stdout,
    /// The step's stderr.
    Stderr,
}

/// Reply to `upload_binary`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Uploaded {
    /// Content hash.
    pub sha256: String,
    /// Path on the workers, if the same on all of them.
    pub remote_path: Option<String>,
    /// Path per worker.
    #[serde(default)]
    pub worker_paths: BTreeMap<String, String>,
    /// What to put in `command[0]`: `{uploaded:<sha256>}`.
    pub command0: String,
}

/// A message from the bridge. Task events (`Started`, `Line`, `Done`, `Failed`,
/// `Skipped`) arrive on the receiver from [`Bridge::spawn`]; replies are returned by
/// the request methods.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BridgeMessage {
    /// The bridge started.
    Ready(ReadyInfo),
    /// Reply to `connect`.
    Connected(ConnectedInfo),
    /// Reply to `submit`: accepted (`held`: waiting in the bridge for its deps).
    Submitted {
        /// The key.
        key: String,
        /// Whether it waits in the bridge for dependencies.
        #[serde(default)]
        held: bool,
    },
    /// The command started on a worker. `attempt` > 1 means Dask re-ran it after
    /// losing a worker.
    Started {
        /// The key.
        key: String,
        /// Worker address.
        worker: String,
        /// Process id on the worker.
        pid: Option<u32>,
        /// 1 for the first start.
        attempt: u32,
    },
    /// One line of the command's output, live.
    Line {
        /// The key.
        key: String,
        /// Worker address.
        worker: String,
        /// stdout or stderr.
        #[serde(default)]
        stream: Stream,
        /// The line, without its newline.
        line: String,
    },
    /// The command ran to the end (any exit code).
    Done(TaskDone),
    /// The task failed without a result.
    Failed(TaskFailed),
    /// Not run because a dependency did not succeed.
    Skipped {
        /// The key.
        key: String,
        /// The dependencies that did not succeed.
        upstream: Vec<String>,
    },
    /// Reply to `cancel`.
    Canceled {
        /// Keys asked for.
        keys: Vec<String>,
        /// Keys whose running process was killed, with the worker.
        #[serde(default)]
        killed: BTreeMap<String, String>,
    },
    /// Reply to `release`.
    Released {
        /// Keys forgotten.
        keys: Vec<String>,
    },
    /// Reply to `upload_binary`.
    Uploaded(Uploaded),
    /// Reply to `workers`.
    Workers {
        /// Current workers.
        workers: Vec<WorkerInfo>,
    },
    /// Reply to `ping`.
    Pong,
    /// Reply to `shutdown`.
    Shutdown,
    /// A request failed.
    Error {
        /// Category (`scheduler_unreachable`, `missing_package`, `bad_request`, ...).
        kind: String,
        /// Detail.
        message: String,
    },
    /// Not from the wire: the bridge exited. Last message on the receiver.
    #[serde(skip)]
    Exited {
        /// Whether it was asked to (shutdown / dropped handle).
        expected: bool,
        /// Exit status as text.
        status: String,
        /// Last lines of stderr.
        stderr_tail: String,
    },
}

impl BridgeMessage {
    /// The task key, for task events.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Started { key, .. }
            | Self::Line { key, .. }
            | Self::Skipped { key, .. }
            | Self::Submitted { key, .. } => Some(key),
            Self::Done(d) => Some(&d.key),
            Self::Failed(f) => Some(&f.key),
            _ => None,
        }
    }

    /// Whether this is the last message for its key (`done`, `failed`, `skipped`).
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Done(_) | Self::Failed(_) | Self::Skipped { .. })
    }

    fn is_task_event(&self) -> bool {
        matches!(self, Self::Started { .. } | Self::Line { .. }) || self.is_final()
    }
}

// ----------------------------------------------------------------------------------
// The client
// ----------------------------------------------------------------------------------

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<BridgeMessage>>>>;
type Tail = Arc<Mutex<VecDeque<String>>>;

/// A running bridge process. See the module docs.
pub struct Bridge {
    python: PathBuf,
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    pending: Pending,
    next_id: AtomicU64,
    stderr_tail: Tail,
    exit: watch::Receiver<Option<String>>,
    expected_exit: Arc<AtomicBool>,
    kill: Mutex<Option<oneshot::Sender<()>>>,
    ready: ReadyInfo,
    request_timeout: Duration,
    _script: tempfile::TempPath,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("python", &self.python)
            .field("ready", &self.ready)
            .finish()
    }
}

fn tail_text(tail: &Tail) -> String {
    let lines = tail.lock().unwrap_or_else(|e| e.into_inner());
    if lines.is_empty() {
        "(no stderr output)".to_string()
    } else {
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

fn status_text(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("could not wait for it: {e}"),
    }
}

impl Bridge {
    /// Starts the bridge with `options.python` and waits for its `ready` message.
    ///
    /// Returns the handle and the receiver of task events (and, at the end,
    /// [`BridgeMessage::Exited`]).
    pub async fn spawn(
        options: BridgeOptions,
    ) -> Result<(Bridge, mpsc::UnboundedReceiver<BridgeMessage>), BridgeError> {
        let python = options.python.clone();
        let script = write_script().map_err(BridgeError::Script)?;

        let mut cmd = Command::new(&python);
        cmd.args(&options.python_args)
            .arg(&*script)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                BridgeError::PythonNotFound {
                    python: python.clone(),
                    source,
                }
            } else {
                BridgeError::Spawn {
                    python: python.clone(),
                    source,
                }
            }
        })?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");

        // stderr -> tracing + tail
        let stderr_tail: Tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_done = {
            let tail = stderr_tail.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains(" - ERROR - ") || line.contains("Traceback") {
                        tracing::warn!(target: "solidflow::dask::bridge", "{line}");
                    } else {
                        tracing::debug!(target: "solidflow::dask::bridge", "{line}");
                    }
                    let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                    if t.len() == STDERR_TAIL_LINES {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            })
        };

        // reaper: waits for exit (or kills on request) and publishes the status
        let (exit_tx, exit_rx) = watch::channel(None);
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                _ = kill_rx => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let _ = exit_tx.send(Some(status_text(status)));
        });

        // stdout -> ready / replies / events
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<BridgeMessage, ()>>();
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let expected_exit = Arc::new(AtomicBool::new(false));
        {
            let pending = pending.clone();
            let tail = stderr_tail.clone();
            let mut exit_rx = exit_rx.clone();
            let expected_exit = expected_exit.clone();
            tokio::spawn(async move {
                let mut ready_tx = Some(ready_tx);
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let (id, msg) = match parse_message(&line) {
                        Ok(parsed) => parsed,
                        Err(e) => {
                            tracing::warn!(target: "solidflow::dask::bridge", "unreadable bridge message ({e}): {line}");
                            continue;
                        }
                    };
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(Ok(msg));
                        continue;
                    }
                    let waiter = id.and_then(|id| {
                        pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&id)
                    });
                    match waiter {
                        Some(w) => {
                            if msg.is_task_event() {
                                let _ = events_tx.send(msg.clone());
                            }
                            let _ = w.send(msg);
                        }
                        None => {
                            let _ = events_tx.send(msg);
                        }
                    }
                }
                // stdout closed: the bridge is exiting.
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(Err(()));
                }
                pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
                let status = match tokio::time::timeout(
                    Duration::from_secs(30),
                    exit_rx.wait_for(|s| s.is_some()),
                )
                .await
                {
                    Ok(Ok(s)) => s.clone().unwrap_or_default(),
                    _ => "still running after closing its stdout".to_string(),
                };
                let _ = tokio::time::timeout(Duration::from_secs(2), stderr_done).await;
                let _ = events_tx.send(BridgeMessage::Exited {
                    expected: expected_exit.load(Ordering::SeqCst),
                    status,
                    stderr_tail: tail_text(&tail),
                });
            });
        }

        let mut bridge = Bridge {
            python: python.clone(),
            stdin: tokio::sync::Mutex::new(Some(stdin)),
            pending,
            next_id: AtomicU64::new(1),
            stderr_tail,
            exit: exit_rx,
            expected_exit,
            kill: Mutex::new(Some(kill_tx)),
            ready: ReadyInfo {
                protocol: 0,
                python: String::new(),
                executable: String::new(),
                dask: String::new(),
                distributed: String::new(),
                pid: 0,
            },
            request_timeout: options.request_timeout,
            _script: script,
        };

        let first = match tokio::time::timeout(options.startup_timeout, ready_rx).await {
            Err(_) => {
                bridge.kill();
                return Err(BridgeError::StartupTimeout {
                    python,
                    timeout: options.startup_timeout,
                    stderr_tail: tail_text(&bridge.stderr_tail),
                });
            }
            Ok(Ok(Ok(msg))) => msg,
            Ok(_) => return Err(bridge.died().await),
        };
        match first {
            BridgeMessage::Ready(info) => {
                if info.protocol != PROTOCOL_VERSION {
                    bridge.kill();
                    return Err(BridgeError::ProtocolMismatch {
                        found: info.protocol,
                    });
                }
                tracing::debug!(
                    target: "solidflow::dask::bridge",
                    "bridge pid {} ready: python {} ({}), dask {}, distributed {}",
                    info.pid, info.python, info.executable, info.dask, info.distributed
                );
                bridge.ready = info;
                Ok((bridge, events_rx))
            }
            BridgeMessage::Error { kind, message } if kind == "distributed_missing" => {
                Err(BridgeError::DistributedMissing { python, message })
            }
            other => {
                bridge.kill();
                Err(BridgeError::UnexpectedReply {
                    op: "startup".into(),
                    reply: Box::new(other),
                })
            }
        }
    }

    /// Versions and pid reported by the bridge at startup.
    pub fn info(&self) -> &ReadyInfo {
        &self.ready
    }

    /// The interpreter running the bridge.
    pub fn python(&self) -> &Path {
        &self.python
    }

    /// Last lines of the bridge's stderr.
    pub fn stderr_tail(&self) -> String {
        tail_text(&self.stderr_tail)
    }

    /// Sends a raw request (an object with `"op"`; an `"id"` is added) and waits up
    /// to `timeout` for the reply with that id. Error replies become
    /// [`BridgeError::Remote`] (or a more specific variant).
    pub async fn request(
        &self,
        mut request: Value,
        timeout: Duration,
    ) -> Result<BridgeMessage, BridgeError> {
        let op = request
            .get("op")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        if let Value::Object(map) = &mut request {
            map.insert("id".into(), Value::from(id));
        }
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        if let Err(e) = self.write_line(&request).await {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            return Err(e);
        }
        self.reply(&op, id, rx, timeout).await
    }

    /// Waits up to `timeout` for the reply to request `id`.
    async fn reply(
        &self,
        op: &str,
        id: u64,
        rx: oneshot::Receiver<BridgeMessage>,
        timeout: Duration,
    ) -> Result<BridgeMessage, BridgeError> {
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(BridgeMessage::Error { kind, message })) => Err(match kind.as_str() {
                "missing_package" => BridgeError::MissingPackage { message },
                _ => BridgeError::Remote { kind, message },
            }),
            Ok(Ok(msg)) => Ok(msg),
            Ok(Err(_)) => Err(self.died().await),
            Err(_) => {
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                Err(BridgeError::ReplyTimeout {
                    op: op.to_string(),
                    timeout,
                })
            }
        }
    }

    /// Creates or joins a cluster (see [`ConnectRequest`]).
    pub async fn connect(&self, request: &ConnectRequest) -> Result<ConnectedInfo, BridgeError> {
        let dask_timeout = Duration::from_secs_f64(request.timeout.unwrap_or(30.0).max(0.0));
        let mut value = serde_json::to_value(request).expect("ConnectRequest serializes");
        value["op"] = "connect".into();
        // A cluster manager may wait for its scheduler and then for workers.
        match self
            .request(value, dask_timeout * 2 + REPLY_MARGIN * 2)
            .await
        {
            Ok(BridgeMessage::Connected(info)) => Ok(info),
            Ok(other) => Err(BridgeError::UnexpectedReply {
                op: "connect".into(),
                reply: Box::new(other),
            }),
            Err(BridgeError::Remote { kind, message }) if kind == "scheduler_unreachable" => {
                Err(BridgeError::SchedulerUnreachable {
                    address: request.address.clone().unwrap_or_default(),
                    timeout: dask_timeout,
                    message,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Submits one task. Returns once the bridge accepted it; everything that happens
    /// to it (including an immediate `failed` for unsatisfiable resources or unknown
    /// deps) arrives on the event receiver.
    pub async fn submit(&self, request: &SubmitRequest) -> Result<(), BridgeError> {
        let mut value = serde_json::to_value(request).expect("SubmitRequest serializes");
        value["op"] = "submit".into();
        match self.request(value, self.request_timeout).await? {
            BridgeMessage::Submitted { .. } | BridgeMessage::Failed(_) => Ok(()),
            other => Err(BridgeError::UnexpectedReply {
                op: "submit".into(),
                reply: Box::new(other),
            }),
        }
    }

    /// Submits several tasks at once: all requests are written before the first
    /// reply is awaited, so the bridge works through them without a round trip per
    /// task. One result per request, in order (see [`Bridge::submit`]).
    pub async fn submit_many(&self, requests: &[SubmitRequest]) -> Vec<Result<(), BridgeError>> {
        let mut bytes = Vec::new();
        let mut waiting = Vec::with_capacity(requests.len());
        for request in requests {
            let mut value = serde_json::to_value(request).expect("SubmitRequest serializes");
            let id = self.next_id.fetch_add(1, Ordering::SeqCst);
            value["op"] = "submit".into();
            value["id"] = id.into();
            serde_json::to_writer(&mut bytes, &value).expect("requests serialize");
            bytes.push(b'\n');
            let (tx, rx) = oneshot::channel();
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, tx);
            waiting.push((id, rx));
        }
        if let Err(e) = self.write_bytes(&bytes).await {
            {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                for (id, _) in &waiting {
                    pending.remove(id);
                }
            }
            let mut results = vec![Err(e)];
            for _ in 1..waiting.len() {
                results.push(Err(self.died().await));
            }
            return results;
        }
        let mut results = Vec::with_capacity(waiting.len());
        for (id, rx) in waiting {
            let reply = self.reply("submit", id, rx, self.request_timeout).await;
            results.push(match reply {
                Ok(BridgeMessage::Submitted { .. } | BridgeMessage::Failed(_)) => Ok(()),
                Ok(other) => Err(BridgeError::UnexpectedReply {
                    op: "submit".into(),
                    reply: Box::new(other),
                }),
                Err(e) => Err(e),
            });
        }
        results
    }

    /// Cancels tasks and kills their running processes (SIGTERM to the process
    /// group, SIGKILL after `grace`). Returns the keys whose process was killed, with
    /// the worker. Each canceled task also gets `failed` / `canceled` on the receiver.
    pub async fn cancel(
        &self,
        keys: &[String],
        grace: Duration,
    ) -> Result<BTreeMap<String, String>, BridgeError> {
        let value = serde_json::json!({"op": "cancel", "keys": keys, "grace": grace.as_secs_f64()});
        match self.request(value, self.request_timeout).await? {
            BridgeMessage::Canceled { killed, .. } => Ok(killed),
            other => Err(BridgeError::UnexpectedReply {
                op: "cancel".into(),
                reply: Box::new(other),
            }),
        }
    }

    /// Forgets finished tasks so Dask can release them. They can no longer be deps.
    pub async fn release(&self, keys: &[String]) -> Result<(), BridgeError> {
        let value = serde_json::json!({"op": "release", "keys": keys});
        match self.request(value, self.request_timeout).await? {
            BridgeMessage::Released { .. } => Ok(()),
            other => Err(BridgeError::UnexpectedReply {
                op: "release".into(),
                reply: Box::new(other),
            }),
        }
    }

    /// Ships an executable to every current and future worker, content-addressed.
    /// Use [`Uploaded::command0`] as `command[0]` to run it.
    pub async fn upload_binary(
        &self,
        path: &Path,
        sha256: Option<&str>,
    ) -> Result<Uploaded, BridgeError> {
        let value = serde_json::json!({"op": "upload_binary", "path": path, "sha256": sha256});
        match self
            .request(value, self.request_timeout + REPLY_MARGIN * 4)
            .await?
        {
            BridgeMessage::Uploaded(u) => Ok(u),
            other => Err(BridgeError::UnexpectedReply {
                op: "upload_binary".into(),
                reply: Box::new(other),
            }),
        }
    }

    /// The workers connected to the scheduler now.
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, BridgeError> {
        match self
            .request(serde_json::json!({"op": "workers"}), self.request_timeout)
            .await?
        {
            BridgeMessage::Workers { workers } => Ok(workers),
            other => Err(BridgeError::UnexpectedReply {
                op: "workers".into(),
                reply: Box::new(other),
            }),
        }
    }

    /// Round trip to the bridge.
    pub async fn ping(&self) -> Result<(), BridgeError> {
        match self
            .request(serde_json::json!({"op": "ping"}), self.request_timeout)
            .await?
        {
            BridgeMessage::Pong => Ok(()),
            other => Err(BridgeError::UnexpectedReply {
                op: "ping".into(),
                reply: Box::new(other),
            }),
        }
    }

    /// Kills running steps, closes the client (and the cluster, if the bridge
    /// created it) and waits for the bridge to exit; kills it if it takes longer
    /// than `timeout`.
    pub async fn shutdown(self, timeout: Duration) -> Result<(), BridgeError> {
        self.expected_exit.store(true, Ordering::SeqCst);
        let reply = self
            .request(serde_json::json!({"op": "shutdown"}), timeout)
            .await;
        let mut exit = self.exit.clone();
        let exited = tokio::time::timeout(timeout, exit.wait_for(|s| s.is_some()))
            .await
            .is_ok();
        if !exited {
            self.kill();
        }
        match reply {
            Ok(BridgeMessage::Shutdown) => Ok(()),
            Ok(other) => Err(BridgeError::UnexpectedReply {
                op: "shutdown".into(),
                reply: Box::new(other),
            }),
            Err(e) => Err(e),
        }
    }

    /// Kills the bridge process at once (no cleanup of a created cluster).
    pub fn kill(&self) {
        self.expected_exit.store(true, Ordering::SeqCst);
        if let Some(tx) = self.kill.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(());
        }
    }

    async fn write_line(&self, request: &Value) -> Result<(), BridgeError> {
        let mut line = serde_json::to_vec(request).expect("requests serialize");
        line.push(b'\n');
        self.write_bytes(&line).await
    }

    /// Writes whole request lines to the bridge's stdin.
    async fn write_bytes(&self, line: &[u8]) -> Result<(), BridgeError> {
        let mut guard = self.stdin.lock().await;
        let Some(stdin) = guard.as_mut() else {
            return Err(self.died().await);
        };
        let result = async {
            stdin.write_all(line).await?;
            stdin.flush().await
        }
        .await;
        if result.is_err() {
            *guard = None;
            drop(guard);
            return Err(self.died().await);
        }
        Ok(())
    }

    /// The error for a bridge that went away: waits briefly for its exit status.
    async fn died(&self) -> BridgeError {
        let mut exit = self.exit.clone();
        let status = match tokio::time::timeout(
            Duration::from_secs(5),
            exit.wait_for(|s| s.is_some()),
        )
        .await
        {
            Ok(Ok(s)) => s.clone().unwrap_or_default(),
            _ => "its stdout closed; still running".to_string(),
        };
        // give the stderr reader a moment to collect the traceback
        tokio::time::sleep(Duration::from_millis(50)).await;
        BridgeError::BridgeDied {
            status,
            stderr_tail: self.stderr_tail(),
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        // Closing stdin makes the bridge clean up (kill steps, close a created
        // cluster) and exit on its own.
        self.expected_exit.store(true, Ordering::SeqCst);
        if let Ok(mut guard) = self.stdin.try_lock() {
            guard.take();
        }
    }
}

fn write_script() -> std::io::Result<tempfile::TempPath> {
    use std::io::Write;
    let mut file = tempfile::Builder::new()
        .prefix("solidflow-dask-bridge-")
        .suffix(".py")
        .tempfile()?;
    file.write_all(BRIDGE_SOURCE.as_bytes())?;
    file.flush()?;
    Ok(file.into_temp_path())
}

/// Splits a wire message into its request id (if any) and typed content.
fn parse_message(line: &str) -> Result<(Option<u64>, BridgeMessage), serde_json::Error> {
    let value: Value = serde_json::from_str(line)?;
    let id = value.get("id").and_then(Value::as_u64);
    let msg = serde_json::from_value(value)?;
    Ok((id, msg))
}

#[cfg(test)]
mod tests {
    //! These run the real bridge against a real LocalCluster. They need the venv
    //! made by `scripts/python-env.sh` (or `SOLIDFLOW_PYTHON`) and fail if it is
    //! missing.
    use super::*;

    fn python() -> PathBuf {
        let python = std::env::var_os(PYTHON_ENV_VAR)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python")
            });
        assert!(
            python.exists() || python.components().count() == 1,
            "the Dask bridge tests need Python with dask/distributed: {} does not exist. \
             Run scripts/python-env.sh (creates .venv) or set SOLIDFLOW_PYTHON.",
            python.display()
        );
        python
    }

    fn options() -> BridgeOptions {
        BridgeOptions {
            python: python(),
            ..BridgeOptions::default()
        }
    }

    async fn next_final(
        rx: &mut mpsc::UnboundedReceiver<BridgeMessage>,
        seen: &mut Vec<BridgeMessage>,
        key: &str,
    ) -> BridgeMessage {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .expect("timed out waiting for a bridge message")
                .expect("bridge event stream closed");
            let done = msg.key() == Some(key) && msg.is_final();
            seen.push(msg.clone());
            if done {
                return msg;
            }
        }
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_cluster_lines_resources_cancel_shutdown() {
        let (bridge, mut rx) = Bridge::spawn(options()).await.expect("bridge starts");
        assert_eq!(bridge.info().protocol, PROTOCOL_VERSION);
        let connected = bridge
            .connect(&ConnectRequest {
                n_workers: Some(2),
                threads_per_worker: Some(1),
                worker_resources: Some(WorkerResources::PerWorker(vec![
                    BTreeMap::from([("GPU".to_string(), 1.0)]),
                    BTreeMap::new(),
                ])),
                timeout: Some(60.0),
                ..Default::default()
            })
            .await
            .expect("local cluster starts");
        assert!(connected.created_cluster);
        assert_eq!(connected.workers.len(), 2);
        let gpu = connected
            .workers
            .iter()
            .find(|w| w.resources.contains_key("GPU"))
            .unwrap()
            .address
            .clone();
        let mut seen = Vec::new();

        // live lines arrive before done, a second apart
        bridge
            .submit(&SubmitRequest::new(
                "t-live",
                sh("echo a; sleep 1; echo b"),
                "t",
            ))
            .await
            .unwrap();
        let mut times = Vec::new();
        let done = loop {
            let msg = rx.recv().await.unwrap();
            times.push((std::time::Instant::now(), msg.clone()));
            if msg.is_final() {
                break msg;
            }
        };
        let lines: Vec<_> = times
            .iter()
            .filter_map(|(t, m)| match m {
                BridgeMessage::Line { line, .. } => Some((*t, line.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            lines.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(
            lines[1].0 - lines[0].0 > Duration::from_millis(700),
            "lines were not live"
        );
        let BridgeMessage::Done(done) = done else {
            panic!("expected done, got {done:?}")
        };
        assert!(done.success(), "{done:?}");

        // GPU task on the GPU worker
        let mut req = SubmitRequest::new("t-gpu", sh("echo gpu"), "t");
        req.resources.insert("GPU".into(), 1.0);
        bridge.submit(&req).await.unwrap();
        match next_final(&mut rx, &mut seen, "t-gpu").await {
            BridgeMessage::Done(d) => assert_eq!(d.worker, gpu),
            other => panic!("{other:?}"),
        }

        // unsatisfiable resources
        let mut req = SubmitRequest::new("t-tpu", sh("true"), "t");
        req.resources.insert("TPU".into(), 1.0);
        bridge.submit(&req).await.unwrap();
        match next_final(&mut rx, &mut seen, "t-tpu").await {
            BridgeMessage::Failed(f) => {
                assert_eq!(f.reason, FailureReason::UnsatisfiableResources);
                assert!(f.message.contains("TPU"), "{}", f.message);
            }
            other => panic!("{other:?}"),
        }

        // deps held in the bridge; failed upstream -> skipped
        bridge
            .submit(&SubmitRequest::new("t-up", sh("exit 4"), "t"))
            .await
            .unwrap();
        let mut req = SubmitRequest::new("t-down", sh("echo no"), "t");
        req.deps = vec!["t-up".into()];
        bridge.submit(&req).await.unwrap();
        match next_final(&mut rx, &mut seen, "t-down").await {
            BridgeMessage::Skipped { upstream, .. } => assert_eq!(upstream, ["t-up"]),
            other => panic!("{other:?}"),
        }

        // cancel kills the running process
        bridge
            .submit(&SubmitRequest::new(
                "t-cancel",
                sh("echo go; exec sleep 300"),
                "t",
            ))
            .await
            .unwrap();
        let pid = loop {
            match rx.recv().await.unwrap() {
                BridgeMessage::Started { key, pid, .. } if key == "t-cancel" => break pid.unwrap(),
                other => seen.push(other),
            }
        };
        let killed = bridge
            .cancel(&["t-cancel".to_string()], Duration::from_secs(5))
            .await
            .unwrap();
        assert!(killed.contains_key("t-cancel"), "{killed:?}");
        match next_final(&mut rx, &mut seen, "t-cancel").await {
            BridgeMessage::Failed(f) => assert_eq!(f.reason, FailureReason::Canceled),
            other => panic!("{other:?}"),
        }
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while proc_is_running(&proc_dir) {
            assert!(
                std::time::Instant::now() < deadline,
                "canceled step {pid} still running"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        bridge
            .shutdown(Duration::from_secs(60))
            .await
            .expect("clean shutdown");
        loop {
            match rx.recv().await {
                Some(BridgeMessage::Exited {
                    expected, status, ..
                }) => {
                    assert!(expected);
                    assert!(status.contains("exit status: 0"), "{status}");
                    break;
                }
                Some(_) => {}
                None => panic!("no Exited message"),
            }
        }
    }

    fn proc_is_running(dir: &Path) -> bool {
        // a zombie (state Z) has exited
        std::fs::read_to_string(dir.join("stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
    }

    #[tokio::test]
    async fn missing_python_names_the_fix() {
        let err = Bridge::spawn(BridgeOptions {
            python: "/nonexistent/python3".into(),
            ..options()
        })
        .await
        .unwrap_err();
        assert!(matches!(err, BridgeError::PythonNotFound { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("/nonexistent/python3")
                && text.contains("SOLIDFLOW_PYTHON")
                && text.contains("python:"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn missing_distributed_names_the_fix() {
        // -S: no site-packages, so `distributed` cannot be imported.
        let err = Bridge::spawn(BridgeOptions {
            python_args: vec!["-S".into()],
            ..options()
        })
        .await
        .unwrap_err();
        assert!(
            matches!(err, BridgeError::DistributedMissing { .. }),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("pip install dask distributed"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn unreachable_scheduler_names_the_address() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("tcp://127.0.0.1:{port}");
        let (bridge, _rx) = Bridge::spawn(options()).await.unwrap();
        let err = bridge
            .connect(&ConnectRequest {
                address: Some(address.clone()),
                timeout: Some(1.0),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(
            matches!(err, BridgeError::SchedulerUnreachable { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(&address), "{err}");
        // still serving
        bridge.ping().await.unwrap();
        bridge.shutdown(Duration::from_secs(30)).await.unwrap();
    }

    #[tokio::test]
    async fn dead_bridge_is_reported_with_stderr() {
        let (bridge, mut rx) = Bridge::spawn(options()).await.unwrap();
        let pid = bridge.info().pid;
        let status = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        match tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .unwrap()
        {
            Some(BridgeMessage::Exited {
                expected, status, ..
            }) => {
                assert!(!expected);
                assert!(status.contains("signal: 9"), "{status}");
            }
            other => panic!("{other:?}"),
        }
        let err = bridge.ping().await.unwrap_err();
        assert!(matches!(err, BridgeError::BridgeDied { .. }), "{err:?}");
    }

    #[test]
    fn messages_parse() {
        let (id, msg) = parse_message(
            r#"{"type":"failed","id":7,"key":"k","reason":"worker_lost","message":"m"}"#,
        )
        .unwrap();
        assert_eq!(id, Some(7));
        assert_eq!(
            msg,
            BridgeMessage::Failed(TaskFailed {
                key: "k".into(),
                reason: FailureReason::WorkerLost,
                message: "m".into()
            })
        );
        let (_, msg) =
            parse_message(r#"{"type":"failed","key":"k","reason":"new_reason","message":"m"}"#)
                .unwrap();
        assert!(matches!(
            msg,
            BridgeMessage::Failed(TaskFailed {
                reason: FailureReason::Other,
                ..
            })
        ));
        let req = serde_json::to_value(SubmitRequest::new("k", vec!["x".into()], "t")).unwrap();
        assert_eq!(req["dep_mode"], "bridge");
        assert_eq!(req["resources"], serde_json::json!({}));
    }
}
