//! The `config:` block of `execution: {dask: ...}`: its schema, [`DaskConfig`] with
//! its defaults, and the parsing of a validated block.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::address::is_loopback_address;
use super::bridge::{self, AdaptSpec, ClusterKind, ClusterSpec, TlsConfig};
use crate::config::json_schema::{config_type_of, parse_block, resources_schema};
use crate::config::schema::ConfigType;
use crate::execution::scheduler::Resources;
use crate::executor::{ExecutorError, Isolation};

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
    /// How many shipped builds the scheduler keeps (most recently used first); older
    /// ones that no connected run uses are deleted.
    pub keep_builds: u32,
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
    /// How a worker runs a step: a new process, or forked by a warm step server.
    pub isolation: Isolation,
    /// Warm: a worker's step server is replaced after this many steps (0: never).
    pub max_steps_per_server: u64,
    /// Warm: a step server above this resident memory in MB is replaced (0: no limit).
    pub max_server_rss_mb: u64,
}

impl Default for DaskConfig {
    /// The defaults of the `config:` block.
    fn default() -> Self {
        DaskBlock::default()
            .into_config()
            .expect("the default block is valid")
    }
}

/// `execution: {dask: {config: ...}}`: the one definition of its keys, defaults,
/// ranges and docs; [`DaskConfig`] is what the executor makes of it.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub(super) struct DaskBlock {
    /// Scheduler of an existing cluster, e.g. tcp://dask-scheduler:8786 (tls://... with `tls`). Without it a local cluster is created for the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<String>,
    /// Seconds to wait for Python, the scheduler and the workers before failing with the fix.
    #[schemars(range(min = 0.1, max = 86400))]
    timeout: f64,
    /// TLS files for a tls:// scheduler.
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<TlsConfig>,
    /// Cluster manager, with options passed to its Python class as keyword arguments, e.g. {slurm: {queue: regular, cores: 8, memory: 24GB}}.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "cluster_schema")]
    cluster: Option<BTreeMap<ClusterKind, Map<String, Value>>>,
    /// Adaptive scaling of a created cluster manager (cluster.adapt), instead of n_workers.
    #[serde(skip_serializing_if = "Option::is_none")]
    adapt: Option<AdaptSpec>,
    /// Workers to start (local) or scale to (cluster managers). Default: Dask's choice for local (about one per core).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    n_workers: Option<u32>,
    /// Threads per local worker, i.e. steps each worker runs at once.
    #[schemars(range(min = 1, max = 1024))]
    threads_per_worker: u32,
    /// Resources every local worker offers, e.g. {GPU: 1}; steps with #[solid(resources(GPU = 1))] run only where they fit.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "resources_schema")]
    resources: Option<Resources>,
    /// Memory limit per local worker: "4GiB", bytes, or "auto".
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_limit: Option<Value>,
    /// Python with dask + distributed for the bridge. Default: $SOLIDFLOW_PYTHON, else python3.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    python: Option<PathBuf>,
    /// Path of this pipeline's binary on the workers. Default: the running executable's path.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    executable: Option<PathBuf>,
    /// Upload the running binary to every worker (content-addressed, once per worker) so workers need only Python + distributed.
    ship_binary: bool,
    /// With ship_binary: how many builds the scheduler keeps, most recently used first. Older builds are deleted from the scheduler unless a connected run uses them; a run of a kept build uploads nothing.
    #[schemars(range(min = 1, max = 1000))]
    keep_builds: u32,
    /// Give steps with longer downstream paths a higher Dask priority.
    critical_path_priority: bool,
    /// Worker deaths a step survives (re-run on another worker) before it fails with "worker lost". On an existing scheduler this changes its setting for every client.
    #[schemars(range(max = 1000))]
    allowed_failures: u32,
    /// Extra environment variables for the step processes. Recorded in run history: use forward_env for secrets.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    env: BTreeMap<String, String>,
    /// Names of environment variables (e.g. AWS_SECRET_ACCESS_KEY) copied from the parent to the step processes at submit time; their values are never recorded.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    forward_env: Vec<String>,
    /// process: each task starts `<binary> step`; warm: each worker keeps step servers (`<binary> step-server`) that fork every step from an already built repository (same isolation, no process start per step); in_server: those servers run each step themselves (no fork; a crash restarts the server; global state carries over between its steps).
    isolation: Isolation,
    /// warm: a worker's step server is replaced after this many steps (0: never).
    #[schemars(range(max = 1_000_000_000))]
    max_steps_per_server: u64,
    /// warm: a step server whose resident memory exceeds this many MB is replaced after its step (0: no limit).
    #[schemars(range(max = 1_000_000_000))]
    max_server_rss_mb: u64,
}

impl Default for DaskBlock {
    fn default() -> Self {
        Self {
            address: None,
            timeout: 30.0,
            tls: None,
            cluster: None,
            adapt: None,
            n_workers: None,
            threads_per_worker: 1,
            resources: None,
            memory_limit: None,
            python: None,
            executable: None,
            ship_binary: false,
            keep_builds: 3,
            critical_path_priority: true,
            allowed_failures: 3,
            env: BTreeMap::new(),
            forward_env: Vec::new(),
            isolation: Isolation::Process,
            max_steps_per_server: 0,
            max_server_rss_mb: 1024,
        }
    }
}

/// The `cluster:` selector: one key per [`ClusterKind`], documented by its variant's
/// doc comment, each taking the manager's keyword arguments.
fn cluster_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let kinds = generator.subschema_for::<ClusterKind>();
    let kinds = kinds
        .as_object()
        .and_then(|k| k.get("$ref"))
        .and_then(Value::as_str)
        .and_then(|r| {
            generator
                .definitions()
                .get(r.rsplit('/').next().unwrap_or(r))
        })
        .cloned()
        .unwrap_or_else(|| kinds.to_value());
    let choices: Vec<Value> = kinds
        .get("oneOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|kind| {
            let name = kind.get("const")?.as_str()?;
            Some(json!({
                "type": "object",
                "description": kind.get("description").cloned().unwrap_or_default(),
                "properties": {name: {"type": "object", "additionalProperties": true}},
                "required": [name],
                "additionalProperties": false,
            }))
        })
        .collect();
    schemars::json_schema!({ "oneOf": choices })
}

fn config_error(path: &str, message: impl std::fmt::Display) -> ExecutorError {
    ExecutorError::Config(format!("execution.dask.config.{path}: {message}"))
}

impl DaskBlock {
    fn into_config(self) -> Result<DaskConfig, ExecutorError> {
        let cluster = match self.cluster.map(|c| c.into_iter().collect::<Vec<_>>()) {
            None => None,
            Some(mut choices) if choices.len() == 1 => {
                let (kind, options) = choices.remove(0);
                Some(ClusterSpec {
                    kind,
                    options,
                    adapt: None,
                })
            }
            Some(_) => return Err(config_error("cluster", "name exactly one cluster kind")),
        };
        let mut out = DaskConfig {
            address: self.address.filter(|a| !a.trim().is_empty()),
            timeout: Duration::try_from_secs_f64(self.timeout)
                .ok()
                .filter(|t| !t.is_zero())
                .ok_or_else(|| config_error("timeout", "expected a number of seconds > 0"))?,
            tls: self.tls,
            cluster,
            n_workers: self.n_workers,
            threads_per_worker: Some(self.threads_per_worker.max(1)),
            resources: self.resources,
            memory_limit: self.memory_limit,
            python: self.python.unwrap_or_else(bridge::default_python),
            executable: self.executable,
            ship_binary: self.ship_binary,
            keep_builds: self.keep_builds.max(1),
            critical_path_priority: self.critical_path_priority,
            allowed_failures: self.allowed_failures,
            env: self.env,
            forward_env: self.forward_env,
            isolation: self.isolation,
            max_steps_per_server: self.max_steps_per_server,
            max_server_rss_mb: self.max_server_rss_mb,
        };
        if let Some(adapt) = self.adapt {
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
}

/// The schema of the dask executor's `config:` block.
pub fn config_schema() -> ConfigType {
    config_type_of::<DaskBlock>()
}

impl DaskConfig {
    /// Reads a `config:` block, checking it against its schema; missing keys get their
    /// defaults.
    pub fn from_value(config: &Value) -> Result<Self, ExecutorError> {
        parse_block::<DaskBlock>(config, &["execution", "dask", "config"])
            .map_err(|e| ExecutorError::Config(e.to_string()))?
            .into_config()
    }

    /// Checks that the TLS files named under `tls:` can be read here (the bridge reads
    /// them before it connects), naming the key and the file that cannot.
    pub fn check_tls_files(&self) -> Result<(), ExecutorError> {
        let Some(tls) = &self.tls else {
            return Ok(());
        };
        for (key, path) in [
            ("ca_file", &tls.ca_file),
            ("cert", &tls.cert),
            ("key", &tls.key),
        ] {
            let Some(path) = path else { continue };
            let problem = match std::fs::File::open(path) {
                Ok(_) if path.is_dir() => "it is a directory".to_string(),
                Ok(_) => continue,
                Err(e) => e.to_string(),
            };
            return Err(config_error(
                &format!("tls.{key}"),
                format!(
                    "cannot read the TLS file {} ({problem}); point `{key}` at a readable PEM file on this machine \
                     (relative paths are relative to the working directory, {})",
                    path.display(),
                    std::env::current_dir()
                        .map(|d| d.display().to_string())
                        .unwrap_or_else(|_| "unknown".into())
                ),
            ));
        }
        Ok(())
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
        for (bad, path) in [
            (json!({"timeout": 1e30}), "execution.dask.config.timeout"),
            (json!({"timeout": -5}), "execution.dask.config.timeout"),
            (json!({"n_workers": -1}), "execution.dask.config.n_workers"),
            (
                json!({"resources": {"GPU": -1}}),
                "execution.dask.config.resources.GPU",
            ),
            (
                json!({"cluster": {"slurmm": {}}}),
                "execution.dask.config.cluster.slurmm",
            ),
        ] {
            let err = DaskConfig::from_value(&bad).unwrap_err().to_string();
            assert!(err.contains(path), "{bad}: {err}");
        }
    }

    #[test]
    fn tls_files_that_cannot_be_read_are_named_with_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not checked for content here").unwrap();
        let missing = dir.path().join("client.pem");
        let c = DaskConfig::from_value(&json!({
            "address": "tls://127.0.0.1:8786",
            "tls": {"ca_file": ca, "cert": missing, "key": dir.path()},
        }))
        .unwrap();
        let err = c.check_tls_files().unwrap_err().to_string();
        assert!(
            err.contains("execution.dask.config.tls.cert")
                && err.contains(&missing.display().to_string())
                && err.contains("No such file"),
            "{err}"
        );
        let c =
            DaskConfig::from_value(&json!({"tls": {"ca_file": ca, "key": dir.path()}})).unwrap();
        let err = c.check_tls_files().unwrap_err().to_string();
        assert!(
            err.contains("execution.dask.config.tls.key") && err.contains("directory"),
            "{err}"
        );
        let c = DaskConfig::from_value(&json!({"tls": {"ca_file": ca}})).unwrap();
        c.check_tls_files().unwrap();
    }

    #[test]
    fn the_schema_lists_every_cluster_kind_once_with_its_docs() {
        let ConfigType::Shape { fields } = config_schema() else {
            panic!("the dask block is a shape")
        };
        let field = |name: &str| fields.iter().find(|f| f.name == name).unwrap().clone();
        let cluster = field("cluster");
        assert_eq!(
            cluster.ty.describe(),
            "a map with exactly one of: local, existing, slurm, pbs, sge, lsf, kube, ssh, yarn"
        );
        let ConfigType::Selector { fields: kinds } = &cluster.ty else {
            panic!("{cluster:?}")
        };
        assert_eq!(
            kinds[2].description,
            "dask_jobqueue.SLURMCluster(**options); needs dask-jobqueue."
        );
        let timeout = field("timeout");
        assert_eq!(timeout.ty.describe(), "a number from 0.1 to 86400");
        assert_eq!(timeout.default, Some(json!(30.0)));
        assert_eq!(DaskConfig::default().timeout, Duration::from_secs(30));
        assert!(
            DaskConfig::from_value(&json!({"address": "tcp://h:1", "cluster": {"local": {}}}))
                .is_err()
        );
    }
}
