//! The storages every mode offers unless it says otherwise. Their definition type is
//! [`StorageDefinition`]; adding a backend is one module plus one line here.

pub use crate::definition::storage::{BuildStorage, StorageContext, StorageDefinition};

/// The storages every mode offers unless it says otherwise: `in_memory`, `filesystem` and `s3`.
pub fn default_storages() -> Vec<StorageDefinition> {
    vec![
        super::memory::definition(),
        super::filesystem::definition(),
        super::s3::definition(),
    ]
}
