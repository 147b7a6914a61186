//! Events: the one record of what happened in a run.
//!
//! Console output, run history, `--json` output and live subscribers are all views of
//! this stream. Events are serialized as JSON, one per line, with `event_type` in
//! `SCREAMING_SNAKE_CASE` (`STEP_SUCCESS`) and type-specific fields under `data`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Severity of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Level {
    /// Detail for debugging.
    Debug,
    /// Normal progress.
    Info,
    /// Something worth attention.
    Warning,
    /// A failure.
    Error,
}

impl Level {
    /// Parses `DEBUG`/`INFO`/`WARNING`/`ERROR` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_uppercase().as_str() {
            "DEBUG" => Some(Self::Debug),
            "INFO" => Some(Self::Info),
            "WARNING" | "WARN" => Some(Self::Warning),
            "ERROR" => Some(Self::Error),
            _ => None,
        }
    }
}

/// A failure, with its cause chain and where it happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// What failed.
    pub message: String,
    /// The chain of causes, outermost first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<String>,
    /// `error`, `panic`, `crash` (the step process died), `interrupted` or `worker_lost`.
    pub kind: String,
    /// Source location of a panic, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

/// What happened. Serialized as `event_type` plus `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "event_type",
    content = "data",
    rename_all = "SCREAMING_SNAKE_CASE"
)]
pub enum EventKind {
    /// The run started.
    PipelineStart {
        /// The executor's config name.
        executor: String,
        /// The storage's config name.
        storage: String,
        /// Number of steps in the plan.
        steps: usize,
    },
    /// Every step succeeded.
    PipelineSuccess {
        /// Wall time in milliseconds.
        duration_ms: u64,
    },
    /// At least one step failed or the engine failed.
    PipelineFailure {
        /// Wall time in milliseconds.
        duration_ms: u64,
        /// Steps that failed.
        failed_steps: Vec<String>,
        /// An engine error, when the run failed outside any step.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<ErrorInfo>,
    },
    /// The run was interrupted (Ctrl-C, SIGTERM).
    PipelineCanceled {
        /// Wall time in milliseconds.
        duration_ms: u64,
    },
    /// A step started (attempt 1, or a retry).
    StepStart {
        /// 1 for the first attempt.
        attempt: u32,
    },
    /// A step received an input.
    StepInput {
        /// Input name.
        input: String,
        /// Input type.
        type_name: String,
        /// `<step>.<output>` or `config`.
        source: String,
        /// The run whose intermediates the value was read from, when it is not this run
        /// (a re-execution reading a step it did not re-run from its parent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source_run_id: Option<String>,
    },
    /// A step produced an output.
    StepOutput {
        /// Output name.
        output: String,
        /// Output type.
        type_name: String,
        /// Where it was stored, if storage was used.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        location: Option<String>,
        /// Its size in bytes, if stored.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bytes: Option<u64>,
    },
    /// A step succeeded.
    StepSuccess {
        /// Time in the step, milliseconds.
        duration_ms: u64,
        /// Which attempt succeeded.
        attempt: u32,
    },
    /// A step failed for good.
    StepFailure {
        /// Why.
        error: ErrorInfo,
        /// Which attempt failed last.
        attempt: u32,
    },
    /// A step was not run because something upstream failed.
    StepSkipped {
        /// The upstream steps that failed or were skipped.
        upstream: Vec<String>,
    },
    /// A step failed and will be retried.
    StepUpForRetry {
        /// Why it failed.
        error: ErrorInfo,
        /// The attempt that failed.
        attempt: u32,
        /// Seconds until the retry.
        delay_secs: f64,
    },
    /// A step is being retried.
    StepRestarted {
        /// The new attempt number.
        attempt: u32,
    },
    /// A line logged by user code through `ctx.log()`.
    LogMessage,
    /// Something the engine wants people to know (executor start, child output, ...).
    EngineEvent {
        /// Free-form details.
        #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
        details: serde_json::Value,
    },
    /// A solid reported an artifact it produced.
    Materialization {
        /// The artifact's name.
        name: String,
        /// What it is.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        description: String,
        /// Free-form metadata (paths, row counts, URLs).
        #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
        metadata: serde_json::Value,
    },
    /// Storage read or wrote an intermediate.
    ObjectStoreOperation {
        /// `get` or `put`.
        operation: String,
        /// The location.
        location: String,
        /// Bytes moved.
        bytes: u64,
    },
}

impl EventKind {
    /// The `event_type` string, e.g. `STEP_SUCCESS`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::PipelineStart { .. } => "PIPELINE_START",
            Self::PipelineSuccess { .. } => "PIPELINE_SUCCESS",
            Self::PipelineFailure { .. } => "PIPELINE_FAILURE",
            Self::PipelineCanceled { .. } => "PIPELINE_CANCELED",
            Self::StepStart { .. } => "STEP_START",
            Self::StepInput { .. } => "STEP_INPUT",
            Self::StepOutput { .. } => "STEP_OUTPUT",
            Self::StepSuccess { .. } => "STEP_SUCCESS",
            Self::StepFailure { .. } => "STEP_FAILURE",
            Self::StepSkipped { .. } => "STEP_SKIPPED",
            Self::StepUpForRetry { .. } => "STEP_UP_FOR_RETRY",
            Self::StepRestarted { .. } => "STEP_RESTARTED",
            Self::LogMessage => "LOG_MESSAGE",
            Self::EngineEvent { .. } => "ENGINE_EVENT",
            Self::Materialization { .. } => "MATERIALIZATION",
            Self::ObjectStoreOperation { .. } => "OBJECT_STORE_OPERATION",
        }
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The run.
    pub run_id: String,
    /// The pipeline.
    pub pipeline: String,
    /// The step, for step events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_key: Option<String>,
    /// When it happened (UTC).
    pub timestamp: DateTime<Utc>,
    /// Severity.
    pub level: Level,
    /// A one-line human message.
    pub message: String,
    /// The host that produced it.
    pub host: String,
    /// The process that produced it.
    pub pid: u32,
    /// The Dask worker (or other remote worker) that produced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

impl Event {
    /// The `event_type` string.
    pub fn event_type(&self) -> &'static str {
        self.kind.name()
    }

    /// Whether this event ends a run.
    pub fn is_pipeline_end(&self) -> bool {
        matches!(
            self.kind,
            EventKind::PipelineSuccess { .. }
                | EventKind::PipelineFailure { .. }
                | EventKind::PipelineCanceled { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_with_event_type_and_round_trips() {
        let e = Event {
            run_id: "r".into(),
            pipeline: "p".into(),
            step_key: Some("a.compute".into()),
            timestamp: Utc::now(),
            level: Level::Info,
            message: "ok".into(),
            host: "h".into(),
            pid: 1,
            worker: None,
            kind: EventKind::StepSuccess {
                duration_ms: 3,
                attempt: 1,
            },
        };
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["event_type"], "STEP_SUCCESS");
        assert_eq!(json["data"]["duration_ms"], 3);
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, e);
        let log: Event = serde_json::from_value(
            serde_json::to_value(Event {
                kind: EventKind::LogMessage,
                ..e
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(log.kind, EventKind::LogMessage);
    }
}
