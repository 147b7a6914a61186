//! Step outputs kept in memory, for in-process runs with `in_memory` storage.

use std::collections::HashMap;
use std::sync::RwLock;

use crate::definition::types::Value;

/// Output values by `(step key, output name)`.
#[derive(Default)]
pub(crate) struct ValueStore {
    values: RwLock<HashMap<(String, String), Value>>,
}

impl ValueStore {
    /// An empty store.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Stores an output.
    pub(crate) fn put(&self, step_key: &str, output: &str, value: Value) {
        self.values
            .write()
            .expect("value lock")
            .insert((step_key.to_string(), output.to_string()), value);
    }

    /// Fetches an output.
    pub(crate) fn get(&self, step_key: &str, output: &str) -> Option<Value> {
        self.values
            .read()
            .expect("value lock")
            .get(&(step_key.to_string(), output.to_string()))
            .cloned()
    }
}
