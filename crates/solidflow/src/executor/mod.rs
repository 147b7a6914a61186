//! Executors: how the steps of a plan are run.
//!
//! Every executor implements [`Executor`] and is offered to run config through an
//! [`ExecutorDefinition`] (its config name, schema and factory). Adding one is a new
//! module plus one line in [`default_executors`] or a public constructor like
//! [`dask_executor`].

pub mod dask;
mod in_process;
mod multiprocess;

pub use in_process::InProcessExecutor;
pub use multiprocess::{MultiprocessExecutor, PARENT_PID_ENV, kill_step_processes};

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;

use crate::config::schema::ConfigType;
use crate::execution::cancel::CancelToken;
use crate::execution::scheduler::Summary;
use crate::execution::step::StepEnvironment;

/// Why an executor could not run (as opposed to a step failing, which is an event).
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The executor cannot run this plan with this config (checked before the run).
    #[error("{0}")]
    Config(String),
    /// The executor's machinery failed (a bridge died, a cluster was unreachable).
    #[error("{0}")]
    Engine(String),
}

/// What an executor needs to run one plan.
#[derive(Clone)]
pub struct ExecutionContext {
    /// Steps, storage, config and events.
    pub env: StepEnvironment,
    /// Set when the run should stop.
    pub cancel: CancelToken,
    /// The solidflow home of this run (storage defaults, per-step logs under `logs/`);
    /// out-of-process executors pass it on in the step invocation.
    pub home: PathBuf,
}

/// Runs the steps of a plan, respecting dependencies, resources and retries, and
/// emitting step events through `ctx.env.events`.
pub trait Executor: Send + Sync {
    /// Checks, before the run is recorded, that this executor can run the plan with the
    /// chosen storage (e.g. out-of-process executors refuse `in_memory`).
    fn check(&self, ctx: &ExecutionContext) -> Result<(), ExecutorError> {
        let _ = ctx;
        Ok(())
    }

    /// Whether values can stay in this process's memory between steps.
    fn in_process(&self) -> bool {
        false
    }

    /// Runs every step. Step failures are events and part of the summary; `Err` is for
    /// the executor itself failing.
    fn execute(&self, ctx: &ExecutionContext) -> Result<Summary, ExecutorError>;
}

/// Builds an executor from its validated `config:` block.
pub type BuildExecutor = fn(&Value) -> Result<Arc<dyn Executor>, ExecutorError>;

/// One `execution:` choice: its config name, schema and factory.
#[derive(Clone)]
pub struct ExecutorDefinition {
    /// The selector key in run config (`in_process`).
    pub name: &'static str,
    /// One line for `config-schema`.
    pub description: &'static str,
    /// The schema of the `config:` block.
    pub config: fn() -> ConfigType,
    /// The factory.
    pub build: BuildExecutor,
}

impl std::fmt::Debug for ExecutorDefinition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutorDefinition")
            .field("name", &self.name)
            .finish()
    }
}

/// The executors every mode has unless it says otherwise: `in_process` and `multiprocess`.
pub fn default_executors() -> Vec<ExecutorDefinition> {
    vec![in_process::definition(), multiprocess::definition()]
}

/// The Dask executor, to add to a mode like the seed's `default_executors + [dask_executor]`.
pub fn dask_executor() -> ExecutorDefinition {
    dask::definition()
}

/// Reads `config.resources` (`{GPU: 2}`) into a resource map, if declared.
pub fn declared_resources(config: &Value) -> Option<crate::execution::scheduler::Resources> {
    config.get("resources").and_then(Value::as_object).map(|m| {
        m.iter()
            .map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(0.0)))
            .collect()
    })
}
