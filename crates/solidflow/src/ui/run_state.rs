//! What a run's events say about each step: its state, attempts, error, inputs,
//! outputs and materializations. The run page and its live stream both fold events
//! through [`RunState::apply`], so the page and its updates cannot disagree.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::execution::event::{ErrorInfo, Event, EventKind};

/// Where a step is, as the DAG colours it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// No event yet.
    Pending,
    /// An attempt is running.
    Running,
    /// Succeeded.
    Succeeded,
    /// Failed for good.
    Failed,
    /// Not run because something upstream failed.
    Skipped,
    /// Failed and waiting to be retried.
    UpForRetry,
}

impl StepState {
    /// The CSS class and label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
            Self::UpForRetry => "up_for_retry",
        }
    }
}

/// One attempt of one step: a bar in the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    /// The step.
    pub step: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When it started (ms since the epoch).
    pub start_ms: i64,
    /// When it ended (ms since the epoch), if it has.
    pub end_ms: Option<i64>,
    /// How it ended: `running`, `succeeded`, `failed`, `up_for_retry`.
    pub outcome: StepState,
    /// The worker or host it ran on.
    pub lane: String,
    /// The host.
    pub host: String,
    /// The process.
    pub pid: u32,
    /// The Dask worker, when known.
    pub worker: Option<String>,
}

/// An input or output as recorded.
#[derive(Debug, Clone, Serialize)]
pub struct Value {
    /// Input or output name.
    pub name: String,
    /// The Rust type.
    pub type_name: String,
    /// Where it came from (inputs) or where it is stored (outputs).
    pub location: Option<String>,
    /// Size in bytes, if stored.
    pub bytes: Option<u64>,
}

/// A materialization as recorded.
#[derive(Debug, Clone, Serialize)]
pub struct Materialization {
    /// The artifact's name.
    pub name: String,
    /// What it is.
    pub description: String,
    /// Its metadata.
    pub metadata: serde_json::Value,
}

/// Everything known about one step.
#[derive(Debug, Clone, Serialize)]
pub struct StepView {
    /// The state.
    pub state: StepState,
    /// Indices into [`RunState::attempts`].
    pub attempts: Vec<usize>,
    /// Errors of failed attempts, oldest first.
    pub errors: Vec<(u32, ErrorInfo)>,
    /// Inputs received.
    pub inputs: Vec<Value>,
    /// Outputs produced.
    pub outputs: Vec<Value>,
    /// Materializations.
    pub materializations: Vec<Materialization>,
    /// Upstream steps that made it skip.
    pub skipped_because: Vec<String>,
}

impl Default for StepView {
    fn default() -> Self {
        Self {
            state: StepState::Pending,
            attempts: Vec::new(),
            errors: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            materializations: Vec::new(),
            skipped_because: Vec::new(),
        }
    }
}

/// The fold of a run's events.
#[derive(Debug, Default, Clone)]
pub struct RunState {
    /// Steps by key.
    pub steps: HashMap<String, StepView>,
    /// Every attempt, in start order.
    pub attempts: Vec<Attempt>,
    /// The executor and storage from `PIPELINE_START`.
    pub executor: Option<(String, String)>,
    /// Host and pid of the process that runs the run (from `PIPELINE_START`).
    pub runner: Option<(String, u32)>,
    /// When the run started and ended, from its events (ms since the epoch).
    pub started_ms: Option<i64>,
    /// When the run ended.
    pub ended_ms: Option<i64>,
    /// An engine error that failed the run outside any step.
    pub engine_error: Option<ErrorInfo>,
    /// The id of the last event applied.
    pub last_event_id: i64,
}

/// What one event changed, for the live stream.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    /// The step's new state, when it changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<StepState>,
    /// The attempt (timeline bar) this event started or ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bar: Option<Attempt>,
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

impl RunState {
    /// Folds `events` (with their history ids).
    pub fn from_events(events: &[(i64, Event)]) -> Self {
        let mut state = Self::default();
        for (id, e) in events {
            state.apply(*id, e);
        }
        state
    }

    /// Applies one event and says what it changed.
    pub fn apply(&mut self, id: i64, e: &Event) -> Change {
        self.last_event_id = self.last_event_id.max(id);
        let mut change = Change {
            state: None,
            bar: None,
        };
        let t = ms(e.timestamp);
        match &e.kind {
            EventKind::PipelineStart {
                executor, storage, ..
            } => {
                self.executor = Some((executor.clone(), storage.clone()));
                self.runner = Some((e.host.clone(), e.pid));
                self.started_ms = Some(t);
            }
            EventKind::PipelineSuccess { .. } | EventKind::PipelineCanceled { .. } => {
                self.ended_ms = Some(t);
            }
            EventKind::PipelineFailure { error, .. } => {
                self.ended_ms = Some(t);
                self.engine_error = error.clone();
            }
            _ => {}
        }
        let Some(key) = e.step_key.as_deref() else {
            return change;
        };
        let step = self.steps.entry(key.to_string()).or_default();
        let before = step.state;
        let mut end_attempt = |step: &mut StepView, outcome: StepState| {
            if let Some(&i) = step.attempts.last() {
                let a = &mut self.attempts[i];
                if a.end_ms.is_none() {
                    a.end_ms = Some(t);
                    a.outcome = outcome;
                    change.bar = Some(a.clone());
                }
            }
        };
        match &e.kind {
            EventKind::StepStart { attempt } => {
                step.state = StepState::Running;
                let lane = e.worker.clone().unwrap_or_else(|| e.host.clone());
                let a = Attempt {
                    step: key.to_string(),
                    attempt: *attempt,
                    start_ms: t,
                    end_ms: None,
                    outcome: StepState::Running,
                    lane,
                    host: e.host.clone(),
                    pid: e.pid,
                    worker: e.worker.clone(),
                };
                change.bar = Some(a.clone());
                step.attempts.push(self.attempts.len());
                self.attempts.push(a);
            }
            EventKind::StepRestarted { .. } => step.state = StepState::Running,
            EventKind::StepSuccess { .. } => {
                step.state = StepState::Succeeded;
                end_attempt(step, StepState::Succeeded);
            }
            EventKind::StepFailure { error, attempt } => {
                step.state = StepState::Failed;
                step.errors.push((*attempt, error.clone()));
                end_attempt(step, StepState::Failed);
            }
            EventKind::StepUpForRetry { error, attempt, .. } => {
                step.state = StepState::UpForRetry;
                step.errors.push((*attempt, error.clone()));
                end_attempt(step, StepState::UpForRetry);
            }
            EventKind::StepSkipped { upstream } => {
                step.state = StepState::Skipped;
                step.skipped_because = upstream.clone();
            }
            EventKind::StepInput {
                input,
                type_name,
                source,
                ..
            } => step.inputs.push(Value {
                name: input.clone(),
                type_name: type_name.clone(),
                location: Some(source.clone()),
                bytes: None,
            }),
            EventKind::StepOutput {
                output,
                type_name,
                location,
                bytes,
            } => step.outputs.push(Value {
                name: output.clone(),
                type_name: type_name.clone(),
                location: location.clone(),
                bytes: *bytes,
            }),
            EventKind::Materialization {
                name,
                description,
                metadata,
            } => step.materializations.push(Materialization {
                name: name.clone(),
                description: description.clone(),
                metadata: metadata.clone(),
            }),
            _ => {}
        }
        if step.state != before {
            change.state = Some(step.state);
        }
        change
    }

    /// The state of `key` (pending when nothing happened yet).
    pub fn state_of(&self, key: &str) -> StepState {
        self.steps
            .get(key)
            .map(|s| s.state)
            .unwrap_or(StepState::Pending)
    }

    /// How many steps are in each state, for `total` steps.
    pub fn counts(&self, total: usize) -> Vec<(StepState, usize)> {
        let mut counts: HashMap<StepState, usize> = HashMap::new();
        for s in self.steps.values() {
            *counts.entry(s.state).or_default() += 1;
        }
        let known: usize = counts.values().sum();
        *counts.entry(StepState::Pending).or_default() += total.saturating_sub(known);
        [
            StepState::Pending,
            StepState::Running,
            StepState::UpForRetry,
            StepState::Succeeded,
            StepState::Failed,
            StepState::Skipped,
        ]
        .into_iter()
        .map(|s| (s, counts.get(&s).copied().unwrap_or(0)))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::execution::event::Level;

    fn event(step: Option<&str>, kind: EventKind) -> Event {
        Event {
            run_id: "r".into(),
            pipeline: "p".into(),
            step_key: step.map(str::to_string),
            timestamp: Utc::now(),
            level: Level::Info,
            message: String::new(),
            host: "h".into(),
            pid: 7,
            worker: None,
            kind,
        }
    }

    #[test]
    fn a_retried_step_has_two_bars_and_ends_succeeded() {
        let err = ErrorInfo {
            message: "no".into(),
            causes: vec!["because".into()],
            kind: "error".into(),
            location: None,
        };
        let events = vec![
            event(Some("a.compute"), EventKind::StepStart { attempt: 1 }),
            event(
                Some("a.compute"),
                EventKind::StepUpForRetry {
                    error: err,
                    attempt: 1,
                    delay_secs: 0.0,
                },
            ),
            event(Some("a.compute"), EventKind::StepRestarted { attempt: 2 }),
            event(Some("a.compute"), EventKind::StepStart { attempt: 2 }),
            event(
                Some("a.compute"),
                EventKind::StepSuccess {
                    duration_ms: 1,
                    attempt: 2,
                },
            ),
        ];
        let indexed: Vec<_> = events
            .into_iter()
            .enumerate()
            .map(|(i, e)| (i as i64 + 1, e))
            .collect();
        let state = RunState::from_events(&indexed);
        assert_eq!(state.state_of("a.compute"), StepState::Succeeded);
        assert_eq!(state.attempts.len(), 2);
        assert_eq!(state.attempts[0].outcome, StepState::UpForRetry);
        assert_eq!(state.attempts[1].outcome, StepState::Succeeded);
        assert_eq!(state.steps["a.compute"].errors.len(), 1);
        assert_eq!(state.state_of("b.compute"), StepState::Pending);
        assert_eq!(state.last_event_id, 5);
    }
}
