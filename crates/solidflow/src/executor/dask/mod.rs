//! `dask`: every step attempt runs as one Dask task on a local or remote cluster.
//!
//! Dask's client protocol is pickled Python, so this executor drives a small Python
//! program, the [`bridge`], over JSON lines (see `docs/dask-bridge.md`). The
//! executor itself is the shared [`Scheduler`] loop that `in_process` and
//! `multiprocess` use: it submits a step to Dask only once its upstream steps
//! succeeded, so dependents of a failure are never submitted, retries and skips are
//! decided (and reported) in one place, and Dask places every ready step wherever
//! there is room. (Passing upstream futures as Dask dependencies makes Dask pile
//! siblings onto the upstream's worker; see the probe in `docs/dask-bridge.md`.)
//!
//! Each Dask task runs the pipeline's own binary in step mode on a worker (the step
//! protocol, [`crate::execution::protocol`]): `[executable, "step"]` with the
//! [`StepInvocation`] on stdin. Its stdout lines (step events) come back live through
//! a Dask event topic per run and are forwarded into the run's event sink tagged with
//! the worker's address; its stderr lines become `LOG_MESSAGE`s. The task also keeps a
//! complete copy of both streams on the worker's disk under
//! `<home>/logs/<run_id>/<step_key>.{stdout.jsonl,stderr.log}`, so the record survives
//! if the capped live stream drops lines (and, when that file is readable here, the
//! missing events are recovered from it).
//!
//! User guide: `docs/dask.md`.

pub mod bridge;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use self::bridge::{
    AdaptSpec, Bridge, BridgeError, BridgeMessage, BridgeOptions, ClusterKind, ClusterSpec,
    ConnectRequest, ConnectedInfo, FailureReason, Stream, SubmitRequest, TaskDone, TlsConfig,
    WorkerInfo, WorkerResources,
};
use super::{ExecutionContext, Executor, ExecutorDefinition, ExecutorError, PARENT_PID_ENV};
use crate::config::schema::{ConfigType, Field};
use crate::execution::event::{ErrorInfo, Event, EventKind, Level};
use crate::execution::protocol::{PROTOCOL_VERSION, StepInvocation, StepMessage};
use crate::execution::scheduler::{Resources, Scheduler, Summary, check_resources};
use crate::plan::ExecutionPlan;
use crate::storage::Reach;

/// How long canceled steps get between SIGTERM and SIGKILL on the workers.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// Finished keys are released from the bridge (and Dask) in batches of this size.
const RELEASE_BATCH: usize = 64;

/// The cluster managers a `cluster:` selector may name.
const CLUSTER_KINDS: [(&str, ClusterKind, &str); 9] = [
    (
        "local",
        ClusterKind::Local,
        "A LocalCluster on 127.0.0.1 created for the run (the default without address).",
    ),
    (
        "existing",
        ClusterKind::Existing,
        "A running scheduler at `address` (the default with address).",
    ),
    (
        "slurm",
        ClusterKind::Slurm,
        "dask_jobqueue.SLURMCluster(**options); needs dask-jobqueue.",
    ),
    (
        "pbs",
        ClusterKind::Pbs,
        "dask_jobqueue.PBSCluster(**options); needs dask-jobqueue.",
    ),
    (
        "sge",
        ClusterKind::Sge,
        "dask_jobqueue.SGECluster(**options); needs dask-jobqueue.",
    ),
    (
        "lsf",
        ClusterKind::Lsf,
        "dask_jobqueue.LSFCluster(**options); needs dask-jobqueue.",
    ),
    (
        "kube",
        ClusterKind::Kube,
        "dask_kubernetes.operator.KubeCluster(**options); needs dask-kubernetes.",
    ),
    (
        "ssh",
        ClusterKind::Ssh,
        "distributed.SSHCluster(**options); needs asyncssh.",
    ),
    (
        "yarn",
        ClusterKind::Yarn,
        "dask_yarn.YarnCluster(**options); needs dask-yarn.",
    ),
];

/// The `config:` block of `execution: {dask: ...}`, with defaults applied.
#[derive(Debug, Clone)]
pub struct DaskConfig {
    /// Scheduler address of an existing cluster (`tcp://host:8786`, `tls://...`,
    /// or `host:port`).
    pub address: Option<String>,
    /// Seconds to wait for the bridge, the scheduler and the workers.
    pub timeout: Duration,
    /// TLS files for a `tls://` scheduler.
    pub tls: Option<TlsConfig>,
    /// The cluster manager; `None` means `existing` with an address, else `local`.
    pub cluster: Option<ClusterSpec>,
    /// Workers of a created cluster.
    pub n_workers: Option<u32>,
    /// Threads per worker of a created local cluster: concurrent steps per worker.
    pub threads_per_worker: Option<u32>,
    /// Resources of every worker of a created local cluster (`{GPU: 1}`).
    pub resources: Option<Resources>,
    /// Memory limit per worker of a created local cluster (`"4GiB"`, bytes or `"auto"`).
    pub memory_limit: Option<Value>,
    /// Python interpreter with `distributed` installed.
    pub python: PathBuf,
    /// The binary the workers run in step mode; `None` means this executable.
    pub executable: Option<PathBuf>,
    /// Upload the executable to every worker (content-addressed) before the run.
    pub ship_binary: bool,
    /// Give steps on longer downstream paths a higher Dask priority.
    pub critical_path_priority: bool,
    /// How many worker deaths a step survives (Dask re-runs it elsewhere) before it
    /// fails as "worker lost".
    pub allowed_failures: u32,
    /// Extra environment variables for the step processes (recorded in run history:
    /// not for secrets).
    pub env: BTreeMap<String, String>,
    /// Names of environment variables copied from this process to the step processes at
    /// submit time (credentials: their values never enter config or run history).
    pub forward_env: Vec<String>,
}

impl Default for DaskConfig {
    fn default() -> Self {
        Self {
            address: None,
            timeout: Duration::from_secs(30),
            tls: None,
            cluster: None,
            n_workers: None,
            threads_per_worker: Some(1),
            resources: None,
            memory_limit: None,
            python: bridge::default_python(),
            executable: None,
            ship_binary: false,
            critical_path_priority: true,
            allowed_failures: 3,
            env: BTreeMap::new(),
            forward_env: Vec::new(),
        }
    }
}

/// The schema of the dask executor's `config:` block.
pub fn config_schema() -> ConfigType {
    let kinds = CLUSTER_KINDS
        .iter()
        .map(|(name, _, doc)| Field::optional(*name, ConfigType::map(ConfigType::Any)).doc(*doc));
    ConfigType::shape([
        Field::optional("address", ConfigType::String)
            .doc("Scheduler of an existing cluster, e.g. tcp://dask-scheduler:8786 (tls://... with `tls`). Without it a local cluster is created for the run."),
        Field::optional("timeout", ConfigType::Float)
            .default(30)
            .doc("Seconds to wait for Python, the scheduler and the workers before failing with the fix."),
        Field::optional(
            "tls",
            ConfigType::shape([
                Field::optional("ca_file", ConfigType::String).doc("CA certificate."),
                Field::optional("cert", ConfigType::String).doc("Client certificate."),
                Field::optional("key", ConfigType::String).doc("Client private key."),
            ]),
        )
        .doc("TLS files for a tls:// scheduler."),
        Field::optional("cluster", ConfigType::selector(kinds))
            .doc("Cluster manager, with options passed to its Python class as keyword arguments, e.g. {slurm: {queue: regular, cores: 8, memory: 24GB}}."),
        Field::optional(
            "adapt",
            ConfigType::shape([
                Field::optional("minimum", ConfigType::Int).doc("Fewest workers."),
                Field::optional("maximum", ConfigType::Int).doc("Most workers."),
            ]),
        )
        .doc("Adaptive scaling of a created cluster manager (cluster.adapt), instead of n_workers."),
        Field::optional("n_workers", ConfigType::Int).doc("Workers to start (local) or scale to (cluster managers). Default: Dask's choice for local (about one per core)."),
        Field::optional("threads_per_worker", ConfigType::Int)
            .default(1)
            .doc("Threads per local worker, i.e. steps each worker runs at once."),
        Field::optional("resources", ConfigType::map(ConfigType::Float))
            .doc("Resources every local worker offers, e.g. {GPU: 1}; steps with #[solid(resources(GPU = 1))] run only where they fit."),
        Field::optional("memory_limit", ConfigType::Any).doc("Memory limit per local worker: \"4GiB\", bytes, or \"auto\"."),
        Field::optional("python", ConfigType::String)
            .doc("Python with dask + distributed for the bridge. Default: $SOLIDFLOW_PYTHON, else python3."),
        Field::optional("executable", ConfigType::String)
            .doc("Path of this pipeline's binary on the workers. Default: the running executable's path."),
        Field::optional("ship_binary", ConfigType::Bool)
            .default(false)
            .doc("Upload the running binary to every worker (content-addressed, once per worker) so workers need only Python + distributed."),
        Field::optional("critical_path_priority", ConfigType::Bool)
            .default(true)
            .doc("Give steps with longer downstream paths a higher Dask priority."),
        Field::optional("allowed_failures", ConfigType::Int)
            .default(3)
            .doc("Worker deaths a step survives (re-run on another worker) before it fails with \"worker lost\". On an existing scheduler this changes its setting for every client."),
        Field::optional("env", ConfigType::map(ConfigType::String)).doc("Extra environment variables for the step processes. Recorded in run history: use forward_env for secrets."),
        Field::optional("forward_env", ConfigType::list(ConfigType::String)).doc("Names of environment variables (e.g. AWS_SECRET_ACCESS_KEY) copied from the parent to the step processes at submit time; their values are never recorded."),
    ])
}

fn config_error(path: &str, message: impl std::fmt::Display) -> ExecutorError {
    ExecutorError::Config(format!("execution.dask.config.{path}: {message}"))
}

impl DaskConfig {
    /// Reads a (validated) `config:` block; missing keys get their defaults.
    pub fn from_value(config: &Value) -> Result<Self, ExecutorError> {
        let mut out = Self::default();
        let get = |k: &str| config.get(k).filter(|v| !v.is_null());
        let str_of = |k: &str| get(k).and_then(Value::as_str).map(str::to_string);
        let u32_of = |k: &str| -> Result<Option<u32>, ExecutorError> {
            get(k)
                .map(|v| {
                    v.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| config_error(k, "expected a whole number ≥ 0"))
                })
                .transpose()
        };
        out.address = str_of("address").filter(|a| !a.trim().is_empty());
        if let Some(t) = get("timeout") {
            let secs = t
                .as_f64()
                .filter(|s| *s > 0.0)
                .ok_or_else(|| config_error("timeout", "expected a number of seconds > 0"))?;
            out.timeout = Duration::from_secs_f64(secs);
        }
        if let Some(tls) = get("tls") {
            out.tls =
                Some(serde_json::from_value(tls.clone()).map_err(|e| config_error("tls", e))?);
        }
        if let Some(cluster) = get("cluster").and_then(Value::as_object) {
            let (name, options) = cluster
                .iter()
                .next()
                .ok_or_else(|| config_error("cluster", "name one cluster kind"))?;
            let kind = CLUSTER_KINDS
                .iter()
                .find(|(n, _, _)| n == name)
                .map(|(_, k, _)| *k)
                .ok_or_else(|| config_error("cluster", format!("unknown cluster kind `{name}`")))?;
            let options = options.as_object().cloned().unwrap_or_default();
            out.cluster = Some(ClusterSpec {
                kind,
                options,
                adapt: None,
            });
        }
        if let Some(adapt) = get("adapt") {
            let adapt: AdaptSpec =
                serde_json::from_value(adapt.clone()).map_err(|e| config_error("adapt", e))?;
            match &mut out.cluster {
                Some(spec) if !matches!(spec.kind, ClusterKind::Local | ClusterKind::Existing) => {
                    spec.adapt = Some(adapt)
                }
                _ => {
                    return Err(config_error(
                        "adapt",
                        "adaptive scaling needs a cluster manager, e.g. `cluster: {slurm: {...}}`",
                    ));
                }
            }
        }
        out.n_workers = u32_of("n_workers")?;
        if let Some(t) = u32_of("threads_per_worker")? {
            out.threads_per_worker = Some(t.max(1));
        }
        if let Some(r) = get("resources").and_then(Value::as_object) {
            out.resources = Some(
                r.iter()
                    .map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(0.0)))
                    .collect(),
            );
        }
        out.memory_limit = get("memory_limit").cloned();
        if let Some(p) = str_of("python") {
            out.python = PathBuf::from(p);
        }
        out.executable = str_of("executable").map(PathBuf::from);
        if let Some(b) = get("ship_binary").and_then(Value::as_bool) {
            out.ship_binary = b;
        }
        if let Some(b) = get("critical_path_priority").and_then(Value::as_bool) {
            out.critical_path_priority = b;
        }
        if let Some(n) = u32_of("allowed_failures")? {
            out.allowed_failures = n;
        }
        if let Some(env) = get("env").and_then(Value::as_object) {
            out.env = env
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str().map_or_else(|| v.to_string(), str::to_string),
                    )
                })
                .collect();
        }
        if let Some(names) = get("forward_env").and_then(Value::as_array) {
            out.forward_env = names
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect();
        }
        if out.address.is_some()
            && matches!(out.cluster.as_ref().map(|c| c.kind), Some(k) if k != ClusterKind::Existing)
        {
            return Err(config_error(
                "cluster",
                "`address` connects to a running scheduler, so `cluster` can only be `existing` there; remove one of them",
            ));
        }
        Ok(out)
    }

    fn kind(&self) -> ClusterKind {
        match (&self.cluster, &self.address) {
            (Some(c), _) => c.kind,
            (None, Some(_)) => ClusterKind::Existing,
            (None, None) => ClusterKind::Local,
        }
    }

    /// Whether workers may run on other machines than this one (so storage on this
    /// machine's disk would not reach them).
    pub fn is_remote(&self) -> bool {
        match self.kind() {
            ClusterKind::Local => false,
            ClusterKind::Existing => !self.address.as_deref().is_some_and(is_loopback_address),
            _ => true,
        }
    }

    fn describe_cluster(&self) -> String {
        match (self.kind(), &self.address) {
            (ClusterKind::Existing, Some(a)) => format!("the Dask cluster at {a}"),
            (ClusterKind::Local, _) => "a local Dask cluster".into(),
            (kind, _) => format!(
                "a {} Dask cluster",
                serde_json::to_value(kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            ),
        }
    }
}

/// Whether a scheduler address (`tcp://127.0.0.1:8786`, `localhost:8786`) is on this machine.
fn is_loopback_address(address: &str) -> bool {
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    let host = match rest.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => rest.rsplit_once(':').map_or(rest, |(h, _)| h),
    };
    host == "localhost" || host == "::1" || host.starts_with("127.")
}

/// The host part of a worker address, for event records.
fn worker_host(address: &str) -> String {
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    rest.rsplit_once(':')
        .map_or(rest, |(h, _)| h)
        .trim_matches(['[', ']'])
        .to_string()
}

/// Runs every step as a Dask task (see the module docs).
#[derive(Debug, Clone)]
pub struct DaskExecutor {
    config: DaskConfig,
}

impl DaskExecutor {
    /// An executor with this configuration.
    pub fn new(config: DaskConfig) -> Self {
        Self { config }
    }

    /// Its configuration.
    pub fn config(&self) -> &DaskConfig {
        &self.config
    }
}

/// The `dask` executor definition (what [`crate::executor::dask_executor`] returns).
pub fn definition() -> ExecutorDefinition {
    ExecutorDefinition {
        name: "dask",
        description: "Run every step as a Dask task on a local or remote cluster (needs filesystem or s3 storage, and Python with dask + distributed).",
        config: config_schema,
        build: |config: &Value| Ok(Arc::new(DaskExecutor::new(DaskConfig::from_value(config)?))),
    }
}

impl Executor for DaskExecutor {
    fn check(&self, ctx: &ExecutionContext) -> Result<(), ExecutorError> {
        let storage = &ctx.env.storage;
        match storage.reach() {
            Reach::Process => {
                return Err(ExecutorError::Config(format!(
                    "the dask executor runs every step in its own process on a Dask worker, but `{}` storage lives inside \
                     one process, so steps could not see each other's outputs; choose `storage: {{filesystem: {{}}}}` for a \
                     local cluster, or `storage: {{s3: {{config: {{...}}}}}}` for a distributed one",
                    storage.kind()
                )));
            }
            Reach::Machine if self.config.is_remote() => {
                return Err(ExecutorError::Config(format!(
                    "`{}` storage on this machine's disk cannot be read by workers of {} on other machines; use \
                     `storage: {{s3: {{config: {{...}}}}}}`, or, if base_dir is a shared mount (NFS) at the same path on every \
                     worker, declare it with `storage: {{filesystem: {{config: {{base_dir: ..., shared: true}}}}}}`",
                    storage.kind(),
                    self.config.describe_cluster()
                )));
            }
            _ => {}
        }
        // Only a local cluster created for the run has workers we know in advance.
        let local_resources_known = self.config.kind() == ClusterKind::Local
            && !self
                .config
                .cluster
                .as_ref()
                .is_some_and(|c| c.options.contains_key("resources"));
        if local_resources_known {
            let offered = self.config.resources.clone().unwrap_or_default();
            check_resources(&ctx.env.plan, Some(&offered)).map_err(|e| {
                ExecutorError::Config(format!(
                    "{e} (for the local Dask cluster: `execution: {{dask: {{config: {{resources: {{...}}}}}}}}` gives every \
                     local worker these resources; for a real cluster start workers with `dask worker <scheduler> --resources \"GPU=1\"`)"
                ))
            })?;
        }
        Ok(())
    }

    fn execute(&self, ctx: &ExecutionContext) -> Result<Summary, ExecutorError> {
        let run = || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| {
                    ExecutorError::Engine(format!(
                        "dask executor: cannot start its async runtime: {e}"
                    ))
                })?;
            runtime.block_on(self.run(ctx))
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // Called from async code: a runtime cannot block inside another one.
            std::thread::scope(|s| {
                s.spawn(run).join().unwrap_or_else(|_| {
                    Err(ExecutorError::Engine(
                        "dask executor thread panicked".into(),
                    ))
                })
            })
        } else {
            run()
        }
    }
}

/// What the parent knows about one submitted step attempt.
struct InFlight {
    step: usize,
    attempt: u32,
    worker: Option<String>,
    pid: u32,
    result: Option<(bool, Option<ErrorInfo>, Option<Option<f64>>)>,
    /// Hashes of the stdout lines forwarded, to recover missing ones from the log file.
    seen: HashSet<u64>,
}

/// How a step attempt ended.
enum Outcome {
    Succeeded,
    Failed(ErrorInfo, Option<Option<Duration>>),
}

struct Run<'a> {
    executor: &'a DaskExecutor,
    ctx: &'a ExecutionContext,
    bridge: &'a Bridge,
    inflight: HashMap<String, InFlight>,
    to_release: Vec<String>,
}

fn engine(what: &str, e: BridgeError) -> ExecutorError {
    ExecutorError::Engine(format!("dask executor: {what}: {e}"))
}

impl DaskExecutor {
    async fn run(&self, ctx: &ExecutionContext) -> Result<Summary, ExecutorError> {
        let options = BridgeOptions {
            python: self.config.python.clone(),
            startup_timeout: self.config.timeout.max(Duration::from_secs(5)),
            ..BridgeOptions::default()
        };
        let (bridge, mut rx) = Bridge::spawn(options)
            .await
            .map_err(|e| engine("cannot start the Dask bridge", e))?;
        let result = self.drive(ctx, &bridge, &mut rx).await;
        // Always: kill our steps, close the client and a cluster we created.
        if let Err(e) = bridge.shutdown(Duration::from_secs(60)).await {
            tracing::warn!(target: "solidflow::dask", "Dask bridge shutdown: {e}");
        }
        result
    }

    fn connect_request(&self) -> ConnectRequest {
        let c = &self.config;
        let local = c.kind() == ClusterKind::Local;
        ConnectRequest {
            address: c.address.clone(),
            timeout: Some(c.timeout.as_secs_f64()),
            tls: c.tls.clone(),
            cluster: c.cluster.clone(),
            n_workers: c.n_workers,
            threads_per_worker: if local { c.threads_per_worker } else { None },
            memory_limit: if local { c.memory_limit.clone() } else { None },
            worker_resources: if local {
                c.resources.clone().map(WorkerResources::Uniform)
            } else {
                None
            },
            allowed_failures: Some(c.allowed_failures),
            // An existing scheduler without workers would make the run wait forever.
            wait_for_workers: (c.kind() == ClusterKind::Existing).then_some(1),
        }
    }

    async fn connect(&self, bridge: &Bridge) -> Result<ConnectedInfo, ExecutorError> {
        bridge.connect(&self.connect_request()).await.map_err(|e| match e {
            BridgeError::SchedulerUnreachable { .. } => {
                let address = self.config.address.clone().unwrap_or_default();
                let dashboard_hint = if address.ends_with(":8787") {
                    " Port 8787 is usually the Dask dashboard; the scheduler listens on 8786 by default (`tcp://host:8786`)."
                } else {
                    ""
                };
                ExecutorError::Engine(format!(
                    "dask executor: {e}. Check that `dask scheduler` is running there and reachable from this machine, or \
                     raise `timeout`.{dashboard_hint}"
                ))
            }
            BridgeError::Remote { ref kind, .. } if kind == "workers_timeout" => ExecutorError::Engine(format!(
                "dask executor: {e}. Start workers with `dask worker {}`.",
                self.config.address.as_deref().unwrap_or("<scheduler address>")
            )),
            e => engine(&format!("cannot connect to {}", self.config.describe_cluster()), e),
        })
    }

    async fn drive(
        &self,
        ctx: &ExecutionContext,
        bridge: &Bridge,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<BridgeMessage>,
    ) -> Result<Summary, ExecutorError> {
        let env = &ctx.env;
        let plan = env.plan.clone();
        let connect_started = Instant::now();
        let connected = self.connect(bridge).await?;
        let info = bridge.info();
        env.events.emit(
            None,
            Level::Info,
            format!(
                "dask executor: {} scheduler {} with {} worker(s){}",
                if connected.created_cluster {
                    "started"
                } else {
                    "connected to"
                },
                connected.scheduler,
                connected.workers.len(),
                connected
                    .dashboard
                    .as_deref()
                    .map(|d| format!(", dashboard {d}"))
                    .unwrap_or_default()
            ),
            EventKind::EngineEvent {
                details: json!({
                    "scheduler": connected.scheduler,
                    "dashboard": connected.dashboard,
                    "created_cluster": connected.created_cluster,
                    "workers": connected.workers,
                    "python": info.executable,
                    "dask": info.dask,
                    "distributed": info.distributed,
                    "connect_ms": connect_started.elapsed().as_millis() as u64,
                }),
            },
        );
        let adaptive = self
            .config
            .cluster
            .as_ref()
            .is_some_and(|c| c.adapt.is_some());
        if !adaptive {
            unsatisfiable_resources(&plan, &connected.workers).map_err(ExecutorError::Engine)?;
        }

        let executable = match &self.config.executable {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .map_err(|e| ExecutorError::Engine(format!("dask executor: cannot locate this binary for the workers: {e}; set `executable:`")))?,
        };
        let command0 = if self.config.ship_binary {
            let started = Instant::now();
            let uploaded = bridge
                .upload_binary(&executable, None)
                .await
                .map_err(|e| engine("cannot ship the binary to the workers", e))?;
            env.events.emit(
                None,
                Level::Info,
                format!("dask executor: shipped {} (sha256 {}) to the workers", executable.display(), &uploaded.sha256[..12]),
                EventKind::EngineEvent {
                    details: json!({"sha256": uploaded.sha256, "worker_paths": uploaded.worker_paths, "upload_ms": started.elapsed().as_millis() as u64}),
                },
            );
            uploaded.command0
        } else {
            executable.display().to_string()
        };

        let priorities = if self.config.critical_path_priority {
            critical_path(&plan)
        } else {
            vec![0; plan.steps.len()]
        };
        // Workers on this machine run in our working directory, so relative paths in
        // config (storage base_dir) mean the same thing in the step processes.
        let cwd = (!self.config.is_remote())
            .then(|| std::env::current_dir().ok())
            .flatten();
        let log_dir = ctx.home.join("logs").join(&env.run_id);
        let mut run = Run {
            executor: self,
            ctx,
            bridge,
            inflight: HashMap::new(),
            to_release: Vec::new(),
        };
        let mut scheduler = Scheduler::new(&plan, env.events.clone(), None);
        let topic = format!("solidflow-{}", env.run_id);
        let mut step_env = self.config.env.clone();
        for name in &self.config.forward_env {
            if let Ok(value) = std::env::var(name) {
                step_env.insert(name.clone(), value);
            }
        }

        loop {
            if ctx.cancel.is_canceled() {
                run.cancel(&mut scheduler, rx).await;
                return Ok(scheduler.summary());
            }
            // Every step that is ready now goes out in one batch of submits.
            let mut steps = Vec::new();
            let mut requests = Vec::new();
            while let Some((step, attempt)) = scheduler.next() {
                let s = &plan.steps[step];
                let key = format!("{}-{}-a{attempt}", s.key, env.run_id);
                let invocation = StepInvocation {
                    protocol: PROTOCOL_VERSION,
                    run_id: env.run_id.clone(),
                    pipeline: env.pipeline.name().to_string(),
                    mode: env.config.mode.clone(),
                    step_key: s.key.clone(),
                    attempt,
                    run_config: env.config.value.clone(),
                    home: ctx.home.clone(),
                };
                let mut request = SubmitRequest::new(
                    key.clone(),
                    vec![command0.clone(), "step".into()],
                    topic.clone(),
                );
                request.stdin = serde_json::to_string(&invocation).expect("invocations serialize");
                request.env = step_env.clone();
                request.cwd = cwd.clone();
                request.resources = s.required_resources.clone();
                request.priority = priorities[step];
                // Step mode makes itself die with the worker process (PR_SET_PDEATHSIG)
                // when it finds the worker's pid here, so the bridge can start it
                // without a preexec_fn (vfork instead of fork: ~10 ms less per step).
                request.parent_pid_env = Some(PARENT_PID_ENV.to_string());
                request.log_files = BTreeMap::from([
                    (
                        "stdout".to_string(),
                        log_dir.join(format!("{}.stdout.jsonl", s.key)),
                    ),
                    (
                        "stderr".to_string(),
                        log_dir.join(format!("{}.stderr.log", s.key)),
                    ),
                ]);
                run.inflight.insert(
                    key,
                    InFlight {
                        step,
                        attempt,
                        worker: None,
                        pid: 0,
                        result: None,
                        seen: HashSet::new(),
                    },
                );
                steps.push(step);
                requests.push(request);
            }
            if !requests.is_empty() {
                let results = bridge.submit_many(&requests).await;
                for ((step, request), result) in steps.into_iter().zip(&requests).zip(results) {
                    let Err(e) = result else { continue };
                    if matches!(e, BridgeError::BridgeDied { .. }) {
                        return Err(engine("the Dask bridge died", e));
                    }
                    run.inflight.remove(&request.key);
                    let error = ErrorInfo {
                        message: format!("could not submit {} to Dask: {e}", request.key),
                        causes: vec![],
                        kind: "error".into(),
                        location: None,
                    };
                    scheduler.failed(step, error, None);
                }
            }
            if scheduler.is_finished() {
                break;
            }
            let wait = scheduler
                .next_wakeup()
                .map_or(Duration::from_millis(50), |t| {
                    t.saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(50))
                });
            let first = tokio::select! {
                msg = rx.recv() => Some(msg),
                _ = tokio::time::sleep(wait) => None,
            };
            let mut batch = Vec::new();
            if let Some(msg) = first {
                batch.push(msg.ok_or_else(|| {
                    ExecutorError::Engine("dask executor: the Dask bridge went away".into())
                })?);
                while let Ok(msg) = rx.try_recv() {
                    batch.push(msg);
                }
            }
            for msg in batch {
                if let Some((step, outcome)) = run.handle(msg)? {
                    match outcome {
                        Outcome::Succeeded => scheduler.succeeded(step),
                        Outcome::Failed(error, retry) => {
                            scheduler.failed(step, error, retry);
                        }
                    }
                }
            }
            run.release(false).await;
        }
        run.release(true).await;
        Ok(scheduler.summary())
    }
}

/// Fails when some step needs resources that no connected worker offers, naming them.
fn unsatisfiable_resources(plan: &ExecutionPlan, workers: &[WorkerInfo]) -> Result<(), String> {
    if workers.is_empty() {
        return Ok(());
    }
    let problems: Vec<String> = plan
        .steps
        .iter()
        .filter(|s| !s.required_resources.is_empty())
        .filter(|s| {
            !workers.iter().any(|w| {
                s.required_resources
                    .iter()
                    .all(|(r, need)| w.resources.get(r).copied().unwrap_or(0.0) + 1e-9 >= *need)
            })
        })
        .map(|s| {
            let needs: Vec<String> = s
                .required_resources
                .iter()
                .map(|(r, n)| format!("{r}={n}"))
                .collect();
            format!("step `{}` requires {}", s.key, needs.join(", "))
        })
        .collect();
    if problems.is_empty() {
        return Ok(());
    }
    let offers: Vec<String> = workers
        .iter()
        .map(|w| {
            let r: Vec<String> = w
                .resources
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!(
                "{}: {}",
                w.address,
                if r.is_empty() {
                    "no resources".to_string()
                } else {
                    r.join(", ")
                }
            )
        })
        .collect();
    Err(format!(
        "dask executor: {} but no Dask worker offers that (workers offer: {}); start a worker with e.g. \
         `dask worker <scheduler> --resources \"GPU=1\"`, or for a local cluster set \
         `execution: {{dask: {{config: {{resources: {{GPU: 1}}}}}}}}`",
        problems.join("; "),
        offers.join("; ")
    ))
}

/// For each step, the number of steps on the longest path from it to the end of the
/// plan (itself included): the Dask priority when `critical_path_priority` is on.
pub fn critical_path(plan: &ExecutionPlan) -> Vec<i64> {
    fn visit(plan: &ExecutionPlan, step: usize, memo: &mut [Option<i64>]) -> i64 {
        if let Some(v) = memo[step] {
            return v;
        }
        let mut best = 0;
        for &d in &plan.steps[step].downstream {
            best = best.max(visit(plan, d, memo));
        }
        memo[step] = Some(best + 1);
        best + 1
    }
    let mut memo = vec![None; plan.steps.len()];
    (0..plan.steps.len())
        .map(|s| visit(plan, s, &mut memo))
        .collect()
}

fn hash_line(line: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    line.hash(&mut h);
    h.finish()
}

impl Run<'_> {
    fn step_key(&self, step: usize) -> &str {
        &self.ctx.env.plan.steps[step].key
    }

    /// Emits an event that happened on a worker (host and worker set from its address).
    fn emit_from_worker(
        &self,
        step: usize,
        worker: &str,
        pid: u32,
        level: Level,
        message: String,
        kind: EventKind,
    ) {
        let env = &self.ctx.env;
        env.events.forward(Event {
            run_id: env.run_id.clone(),
            pipeline: env.pipeline.name().to_string(),
            step_key: Some(self.step_key(step).to_string()),
            timestamp: chrono::Utc::now(),
            level,
            message,
            host: worker_host(worker),
            pid,
            worker: Some(worker.to_string()),
            kind,
        });
    }

    /// One stdout line of a step process: a step protocol message.
    fn stdout_line(&mut self, key: &str, worker: &str, line: &str) {
        let Some(f) = self.inflight.get_mut(key) else {
            return;
        };
        f.seen.insert(hash_line(line));
        let (step, pid) = (f.step, f.pid);
        match serde_json::from_str::<StepMessage>(line) {
            Ok(StepMessage::Event { mut event }) => {
                event.worker = Some(worker.to_string());
                self.ctx.env.events.forward(*event);
            }
            Ok(StepMessage::Result {
                ok,
                error,
                retry_requested,
            }) => f.result = Some((ok, error, retry_requested)),
            Err(e) if !line.trim().is_empty() => self.emit_from_worker(
                step,
                worker,
                pid,
                Level::Warning,
                format!("[stdout] {line}"),
                EventKind::EngineEvent {
                    details: json!({"stream": "stdout", "unparsed": e.to_string()}),
                },
            ),
            Err(_) => {}
        }
    }

    /// Handles one bridge message; returns the outcome when a step attempt ended.
    fn handle(&mut self, msg: BridgeMessage) -> Result<Option<(usize, Outcome)>, ExecutorError> {
        match msg {
            BridgeMessage::Started {
                key,
                worker,
                pid,
                attempt,
            } => {
                let Some(f) = self.inflight.get_mut(&key) else {
                    return Ok(None);
                };
                f.worker = Some(worker.clone());
                f.pid = pid.unwrap_or(0);
                f.result = None;
                let (step, scheduler_attempt, pid) = (f.step, f.attempt, f.pid);
                let step_key = self.step_key(step).to_string();
                if attempt > 1 {
                    self.emit_from_worker(
                        step,
                        &worker,
                        pid,
                        Level::Warning,
                        format!("a Dask worker died while running {step_key}; Dask re-runs it on {worker} (run {attempt} of attempt {scheduler_attempt})"),
                        EventKind::EngineEvent { details: json!({"dask_key": key, "dask_attempt": attempt, "worker_lost": true, "pid": pid}) },
                    );
                } else {
                    self.emit_from_worker(
                        step,
                        &worker,
                        pid,
                        Level::Debug,
                        format!("{step_key} (attempt {scheduler_attempt}) started on Dask worker {worker}, pid {pid}"),
                        EventKind::EngineEvent { details: json!({"dask_key": key, "pid": pid}) },
                    );
                }
                Ok(None)
            }
            BridgeMessage::Line {
                key,
                worker,
                stream: Stream::Stdout,
                line,
            } => {
                self.stdout_line(&key, &worker, &line);
                Ok(None)
            }
            BridgeMessage::Line {
                key,
                worker,
                stream: Stream::Stderr,
                line,
            } => {
                if let Some(f) = self.inflight.get(&key) {
                    self.emit_from_worker(
                        f.step,
                        &worker,
                        f.pid,
                        Level::Info,
                        format!("[stderr] {line}"),
                        EventKind::LogMessage,
                    );
                }
                Ok(None)
            }
            BridgeMessage::Done(done) => Ok(self.done(done)),
            BridgeMessage::Failed(failed) => {
                let Some(f) = self.inflight.remove(&failed.key) else {
                    return Ok(None);
                };
                self.to_release.push(failed.key.clone());
                let (kind, message) = match failed.reason {
                    FailureReason::WorkerLost => (
                        "worker_lost",
                        format!(
                            "worker lost: the Dask workers running {} died {} time(s) (allowed_failures: {}): {}",
                            self.step_key(f.step),
                            self.executor.config.allowed_failures + 1,
                            self.executor.config.allowed_failures,
                            failed.message
                        ),
                    ),
                    FailureReason::Canceled => {
                        ("interrupted", format!("interrupted: {}", failed.message))
                    }
                    FailureReason::UnsatisfiableResources => (
                        "error",
                        format!(
                            "{}; start a worker with `dask worker <scheduler> --resources \"NAME=N\"`",
                            failed.message
                        ),
                    ),
                    FailureReason::Error if failed.message.contains("could not start") => (
                        "crash",
                        format!(
                            "{}; the workers need this pipeline's binary at that path: set `executable:` to its path on the \
                             workers, or `ship_binary: true` to upload it",
                            failed.message
                        ),
                    ),
                    _ => ("error", failed.message.clone()),
                };
                let error = ErrorInfo {
                    message,
                    causes: vec![],
                    kind: kind.into(),
                    location: None,
                };
                Ok(Some((f.step, Outcome::Failed(error, None))))
            }
            BridgeMessage::Skipped { key, upstream } => {
                let Some(f) = self.inflight.remove(&key) else {
                    return Ok(None);
                };
                let error = ErrorInfo {
                    message: format!(
                        "Dask skipped the task because {} did not succeed",
                        upstream.join(", ")
                    ),
                    causes: vec![],
                    kind: "error".into(),
                    location: None,
                };
                Ok(Some((f.step, Outcome::Failed(error, None))))
            }
            BridgeMessage::Exited {
                status,
                stderr_tail,
                ..
            } => Err(ExecutorError::Engine(format!(
                "dask executor: the Dask bridge exited unexpectedly ({status}); its stderr ends with:\n{stderr_tail}"
            ))),
            _ => Ok(None),
        }
    }

    fn done(&mut self, done: TaskDone) -> Option<(usize, Outcome)> {
        self.to_release.push(done.key.clone());
        if let Some(missing) = done.lines_missing {
            self.recover_lines(&done, missing);
        }
        let f = self.inflight.remove(&done.key)?;
        let step_key = self.step_key(f.step).to_string();
        let outcome = match f.result {
            Some((true, _, _)) => Outcome::Succeeded,
            Some((false, error, retry)) => {
                let error = error.unwrap_or_else(|| ErrorInfo {
                    message: format!(
                        "{step_key} failed on Dask worker {} without details",
                        done.worker
                    ),
                    causes: vec![],
                    kind: "error".into(),
                    location: None,
                });
                Outcome::Failed(
                    error,
                    retry.map(|d| d.map(|s| Duration::from_secs_f64(s.max(0.0)))),
                )
            }
            None => {
                let how = match (done.exit_code, done.signal) {
                    (_, Some(sig)) => format!(
                        "was killed by signal {sig}{}",
                        if sig == 9 {
                            " (out of memory, or killed by another process)"
                        } else {
                            ""
                        }
                    ),
                    (Some(127), _) | (Some(126), _) => format!(
                        "exited with status {} (the binary could not be run there: set `executable:` to this pipeline's binary on \
                         the workers, or `ship_binary: true`)",
                        done.exit_code.unwrap_or_default()
                    ),
                    (Some(code), _) => format!("exited with status {code}"),
                    (None, None) => "ended".to_string(),
                };
                let causes = done
                    .stderr_tail
                    .lines()
                    .rev()
                    .take(8)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .map(str::to_string)
                    .collect();
                let error = ErrorInfo {
                    message: format!(
                        "step process {} for {step_key} on Dask worker {} {how} without reporting a result",
                        f.pid, done.worker
                    ),
                    causes,
                    kind: "crash".into(),
                    location: None,
                };
                Outcome::Failed(error, None)
            }
        };
        Some((f.step, outcome))
    }

    /// The live stream lost lines: say so, and forward what the worker's copy of the
    /// output has that we have not seen (when that file is readable from here).
    fn recover_lines(&mut self, done: &TaskDone, missing: u64) {
        let Some(f) = self.inflight.get(&done.key) else {
            return;
        };
        let (step, pid) = (f.step, f.pid);
        let file = done.log_files.get("stdout").map(PathBuf::from);
        let readable = file
            .as_deref()
            .and_then(|p| std::fs::read_to_string(p).ok());
        self.emit_from_worker(
            step,
            &done.worker,
            pid,
            Level::Warning,
            format!(
                "{missing} output line(s) of {} did not arrive live from Dask worker {}; {}",
                self.step_key(step),
                done.worker,
                match (&file, &readable) {
                    (Some(p), Some(_)) => format!("recovered them from {}", p.display()),
                    (Some(p), None) => format!(
                        "the complete output is kept on the worker in {}",
                        p.display()
                    ),
                    (None, _) => "the worker could not keep a copy of its output".into(),
                }
            ),
            EventKind::EngineEvent {
                details: json!({"lines_missing": missing, "log_files": done.log_files}),
            },
        );
        if let Some(text) = readable {
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !self.inflight[&done.key].seen.contains(&hash_line(l)))
                .collect();
            for line in lines {
                self.stdout_line(&done.key, &done.worker, line);
            }
        }
    }

    /// Releases finished keys from the bridge in batches (or all, at the end).
    async fn release(&mut self, all: bool) {
        if self.to_release.len() >= RELEASE_BATCH || (all && !self.to_release.is_empty()) {
            let keys = std::mem::take(&mut self.to_release);
            let _ = self.bridge.release(&keys).await;
        }
    }

    /// Ctrl-C: cancel every running task (killing its process on the worker), wait
    /// for them to end, and mark the unfinished steps interrupted.
    async fn cancel(
        &mut self,
        scheduler: &mut Scheduler<'_>,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<BridgeMessage>,
    ) {
        let keys: Vec<String> = self.inflight.keys().cloned().collect();
        if !keys.is_empty() {
            self.ctx.env.events.emit(
                None,
                Level::Warning,
                format!(
                    "dask executor: canceling {} running step(s) on the cluster",
                    keys.len()
                ),
                EventKind::EngineEvent {
                    details: json!({"dask_keys": keys}),
                },
            );
            if let Err(e) = self.bridge.cancel(&keys, CANCEL_GRACE).await {
                tracing::warn!(target: "solidflow::dask", "canceling Dask tasks: {e}");
            }
        }
        let mut interrupted = Vec::new();
        let deadline = tokio::time::Instant::now() + CANCEL_GRACE + Duration::from_secs(8);
        while !self.inflight.is_empty() {
            let Ok(Some(msg)) = tokio::time::timeout_at(deadline, rx.recv()).await else {
                break;
            };
            match self.handle(msg) {
                Ok(Some((step, Outcome::Succeeded))) => scheduler.succeeded(step),
                Ok(Some((step, Outcome::Failed(..)))) => interrupted.push(step),
                Ok(None) => {}
                Err(_) => break,
            }
        }
        interrupted.extend(self.inflight.drain().map(|(_, f)| f.step));
        scheduler.cancel(&interrupted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_blocks_parse() {
        let c = DaskConfig::from_value(&json!({})).unwrap();
        assert_eq!(c.kind(), ClusterKind::Local);
        assert!(!c.is_remote());
        assert_eq!(c.timeout, Duration::from_secs(30));
        let c =
            DaskConfig::from_value(&json!({"address": "dask_scheduler.dns-name:8787"})).unwrap();
        assert_eq!(c.kind(), ClusterKind::Existing);
        assert!(c.is_remote());
        let c = DaskConfig::from_value(&json!({"address": "tcp://127.0.0.1:8786"})).unwrap();
        assert!(!c.is_remote());
        let c = DaskConfig::from_value(
            &json!({"cluster": {"slurm": {"queue": "q"}}, "adapt": {"maximum": 4}}),
        )
        .unwrap();
        assert_eq!(c.kind(), ClusterKind::Slurm);
        assert!(c.is_remote());
        assert!(DaskConfig::from_value(&json!({"adapt": {"maximum": 4}})).is_err());
        assert!(
            DaskConfig::from_value(&json!({"address": "tcp://h:1", "cluster": {"local": {}}}))
                .is_err()
        );
    }

    #[test]
    fn addresses() {
        assert!(is_loopback_address("tcp://127.0.0.1:8786"));
        assert!(is_loopback_address("localhost:8786"));
        assert!(is_loopback_address("tcp://[::1]:8786"));
        assert!(!is_loopback_address("tls://scheduler.example:8786"));
        assert_eq!(worker_host("tcp://10.0.0.5:41545"), "10.0.0.5");
    }
}
