//! Requests of the bridge protocol: what the executor asks of the bridge (`connect`,
//! `submit`) and the cluster settings they carry. See `docs/dask-bridge.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which cluster to create or join (`connect`'s `cluster`). The one list of cluster
/// managers: the `cluster:` selector of the Dask config block is derived from it, with
/// these docs.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ClusterKind {
    /// A LocalCluster (or SpecCluster for per-worker resources) on 127.0.0.1 created for the run (the default without address).
    Local,
    /// A running scheduler at `address` (the default with address).
    Existing,
    /// dask_jobqueue.SLURMCluster(**options); needs dask-jobqueue.
    Slurm,
    /// dask_jobqueue.PBSCluster(**options); needs dask-jobqueue.
    Pbs,
    /// dask_jobqueue.SGECluster(**options); needs dask-jobqueue.
    Sge,
    /// dask_jobqueue.LSFCluster(**options); needs dask-jobqueue.
    Lsf,
    /// dask_kubernetes.operator.KubeCluster(**options); needs dask-kubernetes.
    Kube,
    /// distributed.SSHCluster(**options); needs asyncssh.
    Ssh,
    /// dask_yarn.YarnCluster(**options); needs dask-yarn.
    Yarn,
}

/// Adaptive scaling bounds for a created cluster (`cluster.adapt(...)`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdaptSpec {
    /// Fewest workers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minimum: Option<u32>,
    /// Most workers.
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
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
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
pub(crate) enum WorkerResources {
    /// The same resources on every worker.
    Uniform(BTreeMap<String, f64>),
    /// One map per worker (creates that many workers).
    PerWorker(Vec<BTreeMap<String, f64>>),
}

/// `connect`: create a cluster or join one. All fields are optional; the default
/// creates a LocalCluster with Dask's default size.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ConnectRequest {
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

/// `submit`: run one command as a Dask task.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SubmitRequest {
    /// Unique Dask key (include run id and attempt).
    pub key: String,
    /// argv. `command[0]` may be `{uploaded:<sha256>}` (see [`Bridge::upload_binary`](super::Bridge::upload_binary)).
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
    /// Run the step on one of the worker's warm step servers (`<command[0]>
    /// step-server`, fed `stdin` as the invocation) instead of starting `command`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm: Option<WarmTask>,
    /// Keys of tasks submitted before (and not released) that this one waits for: Dask
    /// starts it when they ended, and it runs only if each ran its command to exit
    /// status 0; otherwise it ends as `failed` with reason `withdrawn`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
}

/// How a worker recycles its warm step servers (`submit`'s `warm`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct WarmTask {
    /// Replace a server after this many steps (0: never).
    pub max_steps: u64,
    /// Replace a server whose resident memory exceeds this many MB (0: no limit).
    pub max_rss_mb: u64,
}

impl SubmitRequest {
    /// A request with no stdin, env or resources.
    pub(crate) fn new(
        key: impl Into<String>,
        command: Vec<String>,
        log_topic: impl Into<String>,
    ) -> Self {
        Self {
            key: key.into(),
            command,
            stdin: String::new(),
            env: BTreeMap::new(),
            cwd: None,
            resources: BTreeMap::new(),
            priority: 0,
            log_topic: log_topic.into(),
            log_files: BTreeMap::new(),
            parent_pid_env: None,
            warm: None,
            after: Vec::new(),
        }
    }
}

/// One request, as it goes on the wire (tagged by `op`; the client adds `id`).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Request<'a> {
    /// Create or join a cluster.
    Connect(&'a ConnectRequest),
    /// Run one command as a Dask task.
    Submit(&'a SubmitRequest),
    /// Stop tasks: SIGTERM their process groups, SIGKILL after `grace` seconds.
    Cancel {
        /// The tasks.
        keys: &'a [String],
        /// Seconds between SIGTERM and SIGKILL.
        grace: f64,
    },
    /// Forget finished tasks.
    Release {
        /// The tasks.
        keys: &'a [String],
    },
    /// Make sure the scheduler holds an executable (uploaded only if it does not);
    /// workers fetch it when a task first needs it.
    UploadBinary {
        /// The file on this machine.
        path: &'a Path,
        /// Its expected sha256, if known.
        sha256: Option<&'a str>,
        /// How many builds the scheduler keeps.
        keep: u32,
    },
    /// Clean up and exit.
    Shutdown,
}

impl Request<'_> {
    /// The wire form without `id`.
    pub(crate) fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("requests serialize")
    }
}
