//! Modes: the executors and storages a pipeline may run with.
//!
//! The seed's `ModeDefinition(executor_defs=default_executors + [dask_executor])` is
//! `Mode::new("default").executors(default_executors().with(dask_executor()))` here.
//!
//! This module knows the *definition* types only. [`Mode::new`] and `Mode::default()`,
//! which fill in the standard executors and storages, are implemented in
//! [`crate::executor`], next to the lists of built-in implementations, so that
//! definitions never depend on how steps are executed.

use super::executor::ExecutorDefinition;
use super::storage::StorageDefinition;

/// A named choice of executors and storages.
#[derive(Debug, Clone)]
pub struct Mode {
    /// The mode's name (`default` unless several are defined).
    pub name: String,
    /// The executors `execution:` may select; the first is the default.
    pub executors: Vec<ExecutorDefinition>,
    /// The storages `storage:` may select; the first is the default.
    pub storages: Vec<StorageDefinition>,
}

impl Mode {
    /// A mode with exactly these executors and storages (the first of each is the
    /// default choice).
    pub fn with_choices(
        name: impl Into<String>,
        executors: Vec<ExecutorDefinition>,
        storages: Vec<StorageDefinition>,
    ) -> Self {
        Self {
            name: name.into(),
            executors,
            storages,
        }
    }

    /// Replaces the executors.
    pub fn executors(mut self, executors: Vec<ExecutorDefinition>) -> Self {
        self.executors = executors;
        self
    }

    /// Replaces the storages.
    pub fn storages(mut self, storages: Vec<StorageDefinition>) -> Self {
        self.storages = storages;
        self
    }

    /// Looks up an executor by its config name.
    pub fn executor(&self, name: &str) -> Option<&ExecutorDefinition> {
        self.executors.iter().find(|e| e.name == name)
    }

    /// Looks up a storage by its config name.
    pub fn storage(&self, name: &str) -> Option<&StorageDefinition> {
        self.storages.iter().find(|s| s.name == name)
    }
}

/// Appending to a list of definitions reads like the seed's `default_executors + [dask_executor]`.
pub trait With<T> {
    /// This list with `item` appended.
    fn with(self, item: T) -> Self;
}

impl<T> With<T> for Vec<T> {
    fn with(mut self, item: T) -> Self {
        self.push(item);
        self
    }
}
