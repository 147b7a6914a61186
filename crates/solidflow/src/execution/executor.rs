//! The executor seam: what a run hands to the executor it selected, and what an executor
//! must do. [`run`](super::run) drives it; the implementations live in
//! [`crate::executor`], and the run-config choices that build them are
//! [`ExecutorDefinition`](crate::definition::executor::ExecutorDefinition)s.

use std::path::PathBuf;

use super::cancel::CancelToken;
use super::scheduler::Summary;
use super::step::StepEnvironment;

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
    /// chosen storage (e.g. out-of-process executors refuse `in_memory`). `plan` runs
    /// the same check, so a config that `plan` accepts is not refused by `execute`.
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
