//! Storage definitions: the `storage:` choices a mode offers, each with its config
//! schema and factory. The backends themselves live in [`crate::storage`].

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;

use crate::config::schema::ConfigType;
use crate::storage::{IntermediateStorage, StorageError};

/// What a storage factory may need besides its own config block.
#[derive(Debug, Clone)]
pub struct StorageContext {
    /// The solidflow home (`$SOLIDFLOW_HOME`), the default root for filesystem storage.
    pub home: PathBuf,
}

/// Builds a storage from its validated `config:` block (defaults filled in).
pub type BuildStorage =
    fn(&Value, &StorageContext) -> Result<Arc<dyn IntermediateStorage>, StorageError>;

/// One `storage:` choice: its name, config schema and factory.
#[derive(Clone)]
pub struct StorageDefinition {
    /// The selector key in run config (`filesystem`).
    pub name: &'static str,
    /// One line for `config-schema`.
    pub description: &'static str,
    /// The schema of the `config:` block.
    pub config: fn() -> ConfigType,
    /// The factory.
    pub build: BuildStorage,
}

impl std::fmt::Debug for StorageDefinition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageDefinition")
            .field("name", &self.name)
            .finish()
    }
}
