//! Executors: how the steps of a plan are run.
//!
//! Every executor implements [`Executor`] (the seam, in [`crate::execution::executor`])
//! and is offered to run config through an [`ExecutorDefinition`] (its config name,
//! schema and factory, in [`crate::definition::executor`]). Adding one is a new module
//! plus one line in [`default_executors`] or a public constructor like [`dask_executor`].
//! This module also gives [`Mode`] its standard choices: it is the one place that knows
//! every built-in executor and storage.

pub mod dask;
mod in_process;
mod local_config;
mod multiprocess;
mod warm;

pub use in_process::InProcessExecutor;
pub use local_config::{Isolation, LocalConfig, MultiprocessConfig};
pub use multiprocess::{MultiprocessExecutor, PARENT_PID_ENV, kill_step_processes};

pub use crate::definition::executor::{BuildExecutor, ExecutorDefinition};
pub use crate::execution::executor::{ExecutionContext, Executor, ExecutorError};

use crate::definition::mode::Mode;
use crate::storage::registry::default_storages;

/// The executors every mode has unless it says otherwise: `in_process` and `multiprocess`.
pub fn default_executors() -> Vec<ExecutorDefinition> {
    vec![in_process::definition(), multiprocess::definition()]
}

/// The Dask executor, to add to a mode like the seed's `default_executors + [dask_executor]`.
pub fn dask_executor() -> ExecutorDefinition {
    dask::definition()
}

impl Mode {
    /// A mode with [`default_executors`] and [`default_storages`].
    pub fn new(name: impl Into<String>) -> Self {
        Self::with_choices(name, default_executors(), default_storages())
    }
}

impl Default for Mode {
    /// The mode called `default`, with the standard executors and storages.
    fn default() -> Self {
        Self::new("default")
    }
}
