//! What a case runs against: the [`Target`] (a pipeline binary and the executor config
//! under test) and, per case, a [`Harness`] (a private home and work directory).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Group;
use super::live_run::LiveRun;
use super::outcome::Outcome;
use super::pipelines::DIR_VAR;

/// The executor config snippets (the value of `execution.<executor>.config`, as YAML)
/// that the [`Group::Resources`] cases merge over the base config. Both steps of the
/// `pair` pipeline need `GPU: 1`.
#[derive(Clone, Debug)]
pub struct ResourceConfigs {
    /// Room for both steps at once, but one GPU: the steps must not overlap.
    pub one_gpu: String,
    /// Room for both steps and two GPUs: they must run at the same time.
    pub two_gpus: String,
    /// No GPU anywhere: the run must be refused before any step starts, with an error
    /// saying `requires GPU=1`.
    pub no_gpu: String,
}

impl ResourceConfigs {
    /// For an executor with `max_concurrent` and one `resources:` pool for the whole run
    /// (`in_process`, `multiprocess`).
    pub fn run_pool() -> Self {
        Self {
            one_gpu: "{max_concurrent: 4, resources: {GPU: 1}}".into(),
            two_gpus: "{max_concurrent: 2, resources: {GPU: 2}}".into(),
            no_gpu: "{resources: {CPU: 8}}".into(),
        }
    }
}

/// An executor under test: the pipeline binary that serves
/// [`repository`](super::repository) (or [`repository_with`](super::repository_with)),
/// the executor's config key, the base run config selecting it, and the groups of cases
/// it claims.
#[derive(Clone, Debug)]
pub struct Target {
    binary: PathBuf,
    executor: String,
    base_config: String,
    env: Vec<(String, String)>,
    groups: Vec<Group>,
    resources: Option<ResourceConfigs>,
}

impl Target {
    /// `binary` runs the conformance repository; `executor` is the key under
    /// `execution:` (`multiprocess`); `base_config` is the run config every case starts
    /// from (`"execution: {multiprocess: {}}\nstorage: {filesystem: {}}\n"`). The target
    /// claims the [`Group::Core`] cases; add more with [`Target::with_groups`] and
    /// [`Target::with_resources`].
    pub fn new(binary: impl Into<PathBuf>, executor: &str, base_config: &str) -> Self {
        Self {
            binary: binary.into(),
            executor: executor.into(),
            base_config: base_config.into(),
            env: Vec::new(),
            groups: vec![Group::Core],
            resources: None,
        }
    }

    /// Also claims `groups` (in this order, after those claimed so far). Claim
    /// [`Group::Resources`] with [`Target::with_resources`] instead.
    pub fn with_groups(mut self, groups: impl IntoIterator<Item = Group>) -> Self {
        for group in groups {
            assert!(
                group != Group::Resources,
                "claim Group::Resources with Target::with_resources, which says how"
            );
            self.claim(group);
        }
        self
    }

    /// Claims the [`Group::Resources`] cases, with the configs they use.
    pub fn with_resources(mut self, configs: ResourceConfigs) -> Self {
        self.resources = Some(configs);
        self.claim(Group::Resources);
        self
    }

    fn claim(&mut self, group: Group) {
        if !self.groups.contains(&group) {
            self.groups.push(group);
        }
    }

    /// Sets an environment variable for the pipeline process (and so its step processes).
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The same target with another base run config.
    pub fn with_base_config(mut self, base_config: &str) -> Self {
        self.base_config = base_config.into();
        self
    }

    /// The groups of cases this target claims, [`Group::Core`] first.
    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// The executor's config key.
    pub fn executor(&self) -> &str {
        &self.executor
    }

    /// The configs of the [`Group::Resources`] cases; panics if the target does not
    /// claim them.
    pub fn resources(&self) -> &ResourceConfigs {
        self.resources.as_ref().unwrap_or_else(|| {
            panic!(
                "the `{}` target does not claim the resource cases (Target::with_resources)",
                self.executor
            )
        })
    }
}

/// One case's private world: a home, a work directory shared with the solids
/// (`$SF_CONFORMANCE_DIR`), and the base config selecting the executor under test.
/// Dropping it deletes both directories.
pub struct Harness {
    _tmp: tempfile::TempDir,
    home: PathBuf,
    work: PathBuf,
    base: PathBuf,
    target: Target,
}

impl Harness {
    /// A fresh home and work directory for one case on `target`.
    pub fn new(target: &Target) -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let home = tmp.path().join("home");
        let work = tmp.path().join("work");
        std::fs::create_dir_all(&work).expect("work dir");
        let base = tmp.path().join("base.yaml");
        std::fs::write(&base, &target.base_config).expect("write base config");
        Self {
            _tmp: tmp,
            home,
            work,
            base,
            target: target.clone(),
        }
    }

    /// The target this harness runs.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// `execution: {<executor>: {config: <yaml>}}`, to merge over the base config.
    pub fn executor_config(&self, yaml: &str) -> String {
        format!(
            "execution: {{{}: {{config: {yaml}}}}}\n",
            self.target.executor
        )
    }

    /// The pipeline binary with this harness's home, work directory and environment,
    /// and no arguments yet (for `runs`, `logs`, ...).
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.target.binary);
        command
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("SOLIDFLOW_HOME", &self.home)
            .env(DIR_VAR, &self.work);
        for (k, v) in &self.target.env {
            command.env(k, v);
        }
        command
    }

    /// Starts `execute <pipeline> --json` with the base config and `extra` (run config
    /// YAML) merged over it.
    pub fn start(&self, pipeline: &str, extra: &str) -> LiveRun {
        static EXTRA: AtomicU64 = AtomicU64::new(0);
        let n = EXTRA.fetch_add(1, Ordering::Relaxed);
        let extra_path = self.work.join(format!("extra-{pipeline}-{n}.yaml"));
        std::fs::write(&extra_path, extra).expect("write extra config");
        let mut command = self.command();
        command
            .args(["execute", pipeline, "--json", "-c"])
            .arg(&self.base)
            .arg("-c")
            .arg(&extra_path);
        LiveRun::start(command)
    }

    /// Runs `pipeline` to completion (see [`Harness::start`]).
    pub fn run(&self, pipeline: &str, extra: &str) -> Outcome {
        self.start(pipeline, extra).finish()
    }

    /// A file in the work directory.
    pub fn work(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    /// The `SOLIDFLOW_HOME` of the runs.
    pub fn home(&self) -> &Path {
        &self.home
    }
}
