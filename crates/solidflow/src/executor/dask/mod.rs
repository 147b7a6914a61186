//! `dask`: every step attempt runs as one Dask task on a local or remote cluster.
//!
//! Dask's client protocol is pickled Python, so this executor drives a small Python
//! program, the bridge (`bridge/`), over JSON lines (see `docs/dask-bridge.md`). The
//! executor itself is the shared run loop of out-of-process executors
//! ([`run_steps`]) with a Dask [`StepLauncher`]: a step goes to Dask only once its
//! upstream steps succeeded, so dependents of a failure are never submitted, retries
//! and skips are decided (and reported) in one place, and Dask places every ready
//! step wherever there is room. (Passing upstream futures as Dask dependencies makes
//! Dask pile siblings onto the upstream's worker; see the probe in
//! `docs/dask-bridge.md`.)
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
//!
//! The code is split by concern: `config` reads the `config:` block, `run` prepares
//! one run (bridge, connect, binary), `launcher` submits attempts and turns bridge
//! messages into reports, `placement` decides resources and priorities, and
//! `address` reads scheduler addresses.
//!
//! [`run_steps`]: crate::execution::launcher::run_steps
//! [`StepLauncher`]: crate::execution::launcher::StepLauncher
//! [`StepInvocation`]: crate::execution::protocol::StepInvocation

mod address;
pub(crate) mod bridge;
mod config;
mod launcher;
mod placement;
mod run;

pub use self::bridge::{AdaptSpec, ClusterKind, ClusterSpec, TlsConfig};
pub use self::config::{DaskConfig, config_schema};
pub use self::placement::critical_path;

use std::sync::Arc;

use serde_json::Value;

use super::{ExecutionContext, Executor, ExecutorDefinition, ExecutorError};
use crate::execution::launcher::check_reach;
use crate::execution::scheduler::{Summary, check_resources};

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
        self.config.check_tls_files()?;
        let remote = self
            .config
            .is_remote()
            .then(|| format!("workers of {}", self.config.describe_cluster()));
        check_reach(&ctx.env, "dask", remote.as_deref()).map_err(ExecutorError::Config)?;
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
            // One worker thread for the bridge's I/O; the run loop blocks this one.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .map_err(|e| {
                    ExecutorError::Engine(format!(
                        "dask executor: cannot start its async runtime: {e}"
                    ))
                })?;
            self.run(ctx, &runtime)
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
