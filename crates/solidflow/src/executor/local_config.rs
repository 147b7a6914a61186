//! The `config:` blocks of the local executors, `in_process` ([`LocalConfig`]) and
//! `multiprocess` ([`MultiprocessConfig`]: the same plus how steps are isolated): serde
//! types, from which their schemas, defaults and parsing all derive.

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

/// How the multiprocess executor runs a step.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// A new process of this binary per step (`<binary> step`): exec and repository
    /// build paid per step.
    #[default]
    Process,
    /// A warm step server per slot forks one process per step from a repository it
    /// built once: the same isolation (own process, own process group, crash
    /// containment, descendants killed), without the process start.
    Warm,
    /// A warm step server per slot runs each step itself, without a fork: a crash ends
    /// the server (reported with its signal; a new server runs the next step), what a
    /// step starts is killed when it returns, and a step that leaves threads running
    /// retires its server; but a solid's global state (statics, environment, leaked
    /// memory) carries over to the next steps of that server.
    InServer,
}

impl Isolation {
    /// Whether steps run on warm step servers.
    pub(crate) fn is_warm(self) -> bool {
        matches!(self, Self::Warm | Self::InServer)
    }

    /// The config value.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::Warm => "warm",
            Self::InServer => "in_server",
        }
    }
}

/// `execution: {multiprocess: {config: ...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MultiprocessConfig {
    /// Most steps running at once; 0 means one per core.
    #[schemars(range(max = 4096))]
    pub max_concurrent: u32,
    /// Resources this machine offers, e.g. {GPU: 1}; steps requiring them wait for a free unit.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "resources_schema")]
    pub resources: Option<Resources>,
    /// process: a new process per step; warm: one step server per slot forks each step
    /// from an already built repository (same isolation, no process start per step);
    /// in_server: the slot's step server runs each step itself (no fork; a crash restarts
    /// the server; global state carries over between its steps).
    pub isolation: Isolation,
    /// warm: a step server is replaced after this many steps (0: never).
    #[schemars(range(max = 1_000_000_000))]
    pub max_steps_per_server: u64,
    /// warm: a step server whose resident memory exceeds this many MB is replaced after
    /// its current step (0: no limit).
    #[schemars(range(max = 1_000_000_000))]
    pub max_server_rss_mb: u64,
}

impl Default for MultiprocessConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 0,
            resources: None,
            isolation: Isolation::Process,
            max_steps_per_server: 0,
            max_server_rss_mb: 1024,
        }
    }
}

impl MultiprocessConfig {
    /// Reads the `config:` block of `multiprocess`, checking it against the schema.
    pub fn from_value(config: &Value) -> Result<Self, ExecutorError> {
        parse_block(config, &["execution", "multiprocess", "config"])
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

    #[test]
    fn multiprocess_isolation_defaults_to_process_and_checks_its_values() {
        let c = MultiprocessConfig::from_value(&json!({})).unwrap();
        assert_eq!(c, MultiprocessConfig::default());
        assert_eq!(c.isolation, Isolation::Process);
        let c = MultiprocessConfig::from_value(
            &json!({"isolation": "warm", "max_steps_per_server": 3, "max_server_rss_mb": 0}),
        )
        .unwrap();
        assert_eq!(
            (c.isolation, c.max_steps_per_server, c.max_server_rss_mb),
            (Isolation::Warm, 3, 0)
        );
        let c = MultiprocessConfig::from_value(&json!({"isolation": "in_server"})).unwrap();
        assert!(c.isolation.is_warm() && c.isolation.name() == "in_server");
        let err = MultiprocessConfig::from_value(&json!({"isolation": "thread"}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("execution.multiprocess.config.isolation")
                && err.contains("process")
                && err.contains("warm"),
            "{err}"
        );
    }
}
