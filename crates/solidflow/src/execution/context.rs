//! What a solid sees while it runs: run id, step key, config, attempt, logging and
//! materializations.

use serde::de::DeserializeOwned;

use super::error::SolidError;
use super::event::{EventKind, Level};
use super::sink::EventSink;

/// The context passed to every solid.
pub struct SolidContext<'a> {
    pub(crate) run_id: &'a str,
    pub(crate) step_key: &'a str,
    pub(crate) solid: &'a str,
    pub(crate) attempt: u32,
    pub(crate) config: &'a serde_json::Value,
    pub(crate) events: &'a EventSink,
}

impl<'a> SolidContext<'a> {
    /// A context for running a solid's compute directly (tests, custom runners).
    pub fn new(
        run_id: &'a str,
        step_key: &'a str,
        solid: &'a str,
        attempt: u32,
        config: &'a serde_json::Value,
        events: &'a EventSink,
    ) -> Self {
        Self {
            run_id,
            step_key,
            solid,
            attempt,
            config,
            events,
        }
    }

    /// The run id.
    pub fn run_id(&self) -> &str {
        self.run_id
    }

    /// The step key, `<alias>.compute`.
    pub fn step_key(&self) -> &str {
        self.step_key
    }

    /// The key of the item this step runs for, in a step of a fan-out
    /// (`double[part_3].compute` → `part_3`); `None` for other steps.
    pub fn mapping_key(&self) -> Option<&str> {
        let head = self.step_key.strip_suffix(crate::plan::StepKey::SUFFIX)?;
        head.strip_suffix(']')?.split_once('[').map(|(_, k)| k)
    }

    /// The solid's alias in the pipeline.
    pub fn solid_name(&self) -> &str {
        self.solid
    }

    /// The attempt number: 1 for the first try, 2 for the first retry, ...
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The raw `solids.<alias>.config` block (validated, defaults filled in).
    pub fn config_value(&self) -> &serde_json::Value {
        self.config
    }

    /// The solid's config as its typed struct.
    pub fn config<T: DeserializeOwned>(&self) -> Result<T, SolidError> {
        T::deserialize(self.config).map_err(|e| {
            SolidError::new(format!(
                "config of solid `{}` does not match its type: {e}",
                self.solid
            ))
        })
    }

    /// A logger whose lines become `LOG_MESSAGE` events of this step.
    pub fn log(&self) -> Log<'_> {
        Log { ctx: self }
    }

    /// Reports an artifact this step produced (a table, a file, a model) as a
    /// `MATERIALIZATION` event; `metadata` is free-form JSON.
    pub fn materialize(&self, name: &str, description: &str, metadata: serde_json::Value) {
        let kind = EventKind::Materialization {
            name: name.into(),
            description: description.into(),
            metadata,
        };
        self.events.emit(
            Some(self.step_key),
            Level::Info,
            format!("materialized {name}"),
            kind,
        );
    }
}

/// Logs through the event stream; see [`SolidContext::log`].
pub struct Log<'c> {
    ctx: &'c SolidContext<'c>,
}

impl Log<'_> {
    /// Logs at `level`.
    pub fn at(&self, level: Level, message: impl Into<String>) {
        self.ctx.events.emit(
            Some(self.ctx.step_key),
            level,
            message,
            EventKind::LogMessage,
        );
    }

    /// Logs a debug line.
    pub fn debug(&self, message: impl Into<String>) {
        self.at(Level::Debug, message)
    }

    /// Logs an info line.
    pub fn info(&self, message: impl Into<String>) {
        self.at(Level::Info, message)
    }

    /// Logs a warning.
    pub fn warning(&self, message: impl Into<String>) {
        self.at(Level::Warning, message)
    }

    /// Logs an error line (the step still succeeds unless it returns an error).
    pub fn error(&self, message: impl Into<String>) {
        self.at(Level::Error, message)
    }
}
