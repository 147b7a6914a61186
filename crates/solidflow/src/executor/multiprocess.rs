//! `multiprocess`: every step in its own child process (the step protocol).

use super::{ExecutorDefinition, ExecutorError};
use crate::config::schema::ConfigType;

/// The `multiprocess` executor definition.
pub fn definition() -> ExecutorDefinition {
    ExecutorDefinition {
        name: "multiprocess",
        description: "Run every step in its own child process of this binary.",
        config: || ConfigType::Any,
        build: |_| Err(ExecutorError::Config("the multiprocess executor is not yet available in this build".into())),
    }
}
