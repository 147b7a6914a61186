//! Executor definitions: the `execution:` choices a mode offers, each with its config
//! schema and factory. The executors themselves live in [`crate::executor`]; the
//! [`Executor`] trait they implement is part of [`crate::execution`].

use std::sync::Arc;

use serde_json::Value;

use crate::config::schema::ConfigType;
use crate::execution::executor::{Executor, ExecutorError};

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
