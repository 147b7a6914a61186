//! The `config:` block of `execution: {dask: ...}`: its schema, [`DaskConfig`] with
//! its defaults, and the parsing of a validated block.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::address::is_loopback_address;
use super::bridge::{self, AdaptSpec, ClusterKind, ClusterSpec, TlsConfig};
use crate::config::schema::{ConfigType, Field};
use crate::execution::scheduler::Resources;
use crate::executor::ExecutorError;

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

    pub(super) fn kind(&self) -> ClusterKind {
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

    pub(super) fn describe_cluster(&self) -> String {
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

#[cfg(test)]
mod tests {
    use serde_json::json;

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
}
