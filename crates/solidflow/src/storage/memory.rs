//! `in_memory` storage: values live in this process only.
//!
//! The in-process executor passes values between steps without touching storage at all
//! when this storage is selected; this byte store exists so that the storage conformance
//! suite and tools that read intermediates work the same on every backend.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::sync::{Arc, Mutex};

use super::{IntermediateKey, IntermediateStorage, Reach, StorageError, WriteFn};
use crate::config::schema::ConfigType;
use crate::definition::storage::StorageDefinition;

/// Intermediates kept in a map inside the current process.
#[derive(Debug, Default)]
pub struct InMemoryStorage {
    values: Mutex<BTreeMap<IntermediateKey, Arc<Vec<u8>>>>,
}

impl InMemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

/// The `in_memory` storage definition.
pub(crate) fn definition() -> StorageDefinition {
    StorageDefinition {
        name: "in_memory",
        description: "Keep intermediates in the parent process; only for the in_process executor.",
        config: ConfigType::empty,
        build: |_, _| Ok(Arc::new(InMemoryStorage::new())),
    }
}

impl IntermediateStorage for InMemoryStorage {
    fn kind(&self) -> &'static str {
        "in_memory"
    }

    fn reach(&self) -> Reach {
        Reach::Process
    }

    fn location(&self, key: &IntermediateKey) -> String {
        format!("memory://{key}")
    }

    fn write(&self, key: &IntermediateKey, write: WriteFn<'_>) -> Result<u64, StorageError> {
        let mut buf = Vec::new();
        write(&mut buf).map_err(|source| StorageError::Io {
            operation: "write",
            location: self.location(key),
            source,
        })?;
        let len = buf.len() as u64;
        // Inserted only once fully encoded: readers never see a partial value.
        self.values
            .lock()
            .expect("storage lock")
            .insert(key.clone(), Arc::new(buf));
        Ok(len)
    }

    fn read(&self, key: &IntermediateKey) -> Result<Box<dyn Read + Send>, StorageError> {
        let values = self.values.lock().expect("storage lock");
        let bytes = values.get(key).ok_or_else(|| StorageError::NotFound {
            location: self.location(key),
        })?;
        Ok(Box::new(Cursor::new(SharedBytes(bytes.clone()))))
    }

    fn exists(&self, key: &IntermediateKey) -> Result<bool, StorageError> {
        Ok(self.values.lock().expect("storage lock").contains_key(key))
    }

    fn list_run(&self, run_id: &str) -> Result<Vec<IntermediateKey>, StorageError> {
        let values = self.values.lock().expect("storage lock");
        Ok(values
            .keys()
            .filter(|k| k.run_id == run_id)
            .cloned()
            .collect())
    }
}

struct SharedBytes(Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}
