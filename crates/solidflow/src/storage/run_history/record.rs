//! What run history stores about one run, and how runs are filtered when listed.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::liveness::ProcessStart;

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunStatus {
    /// Running. A run whose process is gone is marked [`Failure`](Self::Failure) when
    /// history is next read, so this means "running as far as anyone can tell".
    Started,
    /// Every step succeeded.
    Success,
    /// A step or the engine failed, or the run's process died.
    Failure,
    /// Interrupted.
    Canceled,
}

impl RunStatus {
    /// Every status, in the order they are listed in help texts.
    pub const ALL: [RunStatus; 4] = [Self::Started, Self::Success, Self::Failure, Self::Canceled];

    /// The stored and printed name (`STARTED`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "STARTED",
            Self::Success => "SUCCESS",
            Self::Failure => "FAILURE",
            Self::Canceled => "CANCELED",
        }
    }

    /// Parses a status name in any case; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str().eq_ignore_ascii_case(s))
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One run as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// The run id.
    pub run_id: String,
    /// The pipeline.
    pub pipeline: String,
    /// The mode.
    pub mode: String,
    /// The status.
    pub status: RunStatus,
    /// The validated run config.
    pub config: serde_json::Value,
    /// The run this one re-executes, if any.
    pub parent_run_id: Option<String>,
    /// The first run of the re-execution lineage (the parent's root, or the parent);
    /// `None` for a run that re-executes nothing.
    #[serde(default)]
    pub root_run_id: Option<String>,
    /// The run's tags (`execute --tag team=ml`).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The host of the process that runs it (`None` in history written before 0.2).
    #[serde(default)]
    pub host: Option<String>,
    /// The pid of the process that runs it.
    #[serde(default)]
    pub pid: Option<u32>,
    /// When and in which boot that process started, to tell it from a later process
    /// that got the same pid.
    #[serde(default)]
    pub process_start: Option<ProcessStart>,
    /// The last time the run's process said it was alive.
    #[serde(default)]
    pub heartbeat_at: Option<DateTime<Utc>>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub ended_at: Option<DateTime<Utc>>,
}

impl RunRecord {
    /// A `STARTED` record of a run executed by this process, starting now.
    pub fn new(
        run_id: impl Into<String>,
        pipeline: impl Into<String>,
        mode: impl Into<String>,
        config: serde_json::Value,
    ) -> Self {
        Self {
            run_id: run_id.into(),
            pipeline: pipeline.into(),
            mode: mode.into(),
            status: RunStatus::Started,
            config,
            parent_run_id: None,
            root_run_id: None,
            tags: BTreeMap::new(),
            host: Some(crate::execution::sink::hostname()),
            pid: Some(std::process::id()),
            process_start: ProcessStart::current(),
            heartbeat_at: None,
            started_at: Utc::now(),
            ended_at: None,
        }
    }
}

/// Which runs [`RunHistory::list`](super::RunHistory::list) returns. The default lists
/// every run, newest first.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Only runs with one of these statuses (any status when empty).
    pub statuses: Vec<RunStatus>,
    /// Only runs of this pipeline.
    pub pipeline: Option<String>,
    /// Only runs that carry every one of these tags with these values.
    pub tags: BTreeMap<String, String>,
    /// Only runs started at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only runs of this re-execution lineage (the root run and its descendants).
    pub lineage: Option<String>,
    /// At most this many runs (the newest).
    pub limit: Option<usize>,
}
