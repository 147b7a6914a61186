//! Modes: the executors and storages a pipeline may run with.
//!
//! The seed's `ModeDefinition(executor_defs=default_executors + [dask_executor])` is
//! `Mode::new("default").executors(default_executors().with(dask_executor()))` here.

use crate::executor::{ExecutorDefinition, default_executors};
use crate::storage::registry::{StorageDefinition, default_storages};

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

impl Default for Mode {
    fn default() -> Self {
        Self::new("default")
    }
}

impl Mode {
    /// A mode with [`default_executors`] and [`default_storages`].
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            executors: default_executors(),
            storages: default_storages(),
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
