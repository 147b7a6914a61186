//! The `config:` block shared by the local executors, `in_process` and `multiprocess`:
//! one serde type, from which its schema, defaults and parsing all derive.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ExecutorError;
use crate::config::json_schema::{parse_block, resources_schema};
use crate::execution::scheduler::Resources;

/// `execution: {in_process | multiprocess: {config: ...}}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LocalConfig {
    /// Most steps running at once; 0 means one per core.
    #[schemars(range(max = 4096))]
    pub max_concurrent: u32,
    /// Resources this machine offers, e.g. {GPU: 1}; steps requiring them wait for a free unit.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "resources_schema")]
    pub resources: Option<Resources>,
}

impl LocalConfig {
    /// Reads the `config:` block of executor `executor`, checking it against the schema.
    pub fn from_value(executor: &str, config: &Value) -> Result<Self, ExecutorError> {
        parse_block(config, &["execution", executor, "config"])
            .map_err(|e| ExecutorError::Config(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_and_ranges_come_from_the_type() {
        let c = LocalConfig::from_value("in_process", &json!({})).unwrap();
        assert_eq!(c, LocalConfig::default());
        let c = LocalConfig::from_value("in_process", &json!({"resources": {"GPU": 2}})).unwrap();
        assert_eq!(c.resources.unwrap()["GPU"], 2.0);
        let err = LocalConfig::from_value(
            "multiprocess",
            &json!({"max_concurrent": -1, "resources": {"GPU": -1}}),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("execution.multiprocess.config.max_concurrent"),
            "{err}"
        );
        assert!(
            err.contains("execution.multiprocess.config.resources.GPU"),
            "{err}"
        );
    }
}
