//! Intermediate storage: where step outputs live between steps.
//!
//! Every backend implements [`IntermediateStorage`], a byte-stream store keyed by
//! [`IntermediateKey`] (`<run_id>/intermediates/<step_key>/<output>`). Values are
//! encoded by their type's codec (see [`crate::definition::types`]) straight into the
//! writer, so large values stream instead of being buffered whole.
//!
//! Adding a backend is one new module plus one line in [`registry`]; nothing else changes.

mod error;
mod filesystem;
mod key;
mod memory;
pub mod registry;
pub mod run_history;
mod s3;

pub use error::StorageError;
pub use filesystem::{FilesystemConfig, FilesystemStorage};
pub use key::IntermediateKey;
pub use memory::InMemoryStorage;
pub use s3::{S3Config, S3Credentials, S3Storage};

use std::io::{Read, Write};

/// Callback that streams one value into the storage's writer.
pub type WriteFn<'a> = &'a mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>;

/// Whether a storage can be read by processes other than the one that wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reach {
    /// Only the writing process sees the data (`in_memory`).
    Process,
    /// Processes on the same machine see the data (`filesystem` on a local disk).
    Machine,
    /// Any machine with credentials sees the data (`s3`, or a filesystem declared shared).
    Cluster,
}

/// A place to persist step outputs.
///
/// Implementations must make [`write`](Self::write) atomic: a concurrent or later reader
/// either sees the whole value or no value at all, even if the writer crashes midway.
pub trait IntermediateStorage: Send + Sync + std::fmt::Debug {
    /// The config name of this storage (`in_memory`, `filesystem`, `s3`).
    fn kind(&self) -> &'static str;

    /// Who can read what this storage writes; executors check it before a run starts.
    fn reach(&self) -> Reach;

    /// A human-readable location for `key` (a path or `s3://bucket/key`), never containing secrets.
    fn location(&self, key: &IntermediateKey) -> String;

    /// Checks, before any step runs, that the storage is usable (directory writable,
    /// bucket exists, credentials accepted).
    fn preflight(&self) -> Result<(), StorageError> {
        Ok(())
    }

    /// Atomically stores the bytes produced by `write` under `key`, returning their length.
    fn write(&self, key: &IntermediateKey, write: WriteFn<'_>) -> Result<u64, StorageError>;

    /// Opens the value stored under `key` for streaming reads.
    fn read(&self, key: &IntermediateKey) -> Result<Box<dyn Read + Send>, StorageError>;

    /// Whether a value is stored under `key`.
    fn exists(&self, key: &IntermediateKey) -> Result<bool, StorageError>;

    /// Every intermediate stored for `run_id`, sorted by key.
    fn list_run(&self, run_id: &str) -> Result<Vec<IntermediateKey>, StorageError>;
}
