//! Step bookkeeping shared by every executor: which steps are ready, which wait for
//! resources or a retry delay, and which are skipped because something upstream failed.
//!
//! An executor asks [`Scheduler::next`] for work, reports each attempt's outcome with
//! [`Scheduler::succeeded`] or [`Scheduler::failed`], and stops when
//! [`Scheduler::is_finished`]. Events for retries, failures and skips are emitted here,
//! so every executor reports them the same way.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::event::{ErrorInfo, EventKind, Level};
use super::sink::EventSink;
use crate::plan::ExecutionPlan;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Ready,
    Delayed,
    Running,
    Succeeded,
    Failed,
    Skipped,
}

/// Resources a machine (or executor) offers, e.g. `{GPU: 2}`.
pub type Resources = BTreeMap<String, f64>;

/// What the scheduler decided after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterFailure {
    /// The step will run again after the delay.
    Retry,
    /// The step failed for good; its dependents were skipped.
    Failed,
}

/// How a run ended, from the scheduler's view.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Steps that failed for good.
    pub failed: Vec<String>,
    /// Steps skipped because of an upstream failure.
    pub skipped: Vec<String>,
    /// Whether the run was canceled.
    pub canceled: bool,
}

/// Tracks the state of every step of one run.
pub(crate) struct Scheduler<'p> {
    plan: &'p ExecutionPlan,
    events: EventSink,
    state: Vec<State>,
    waiting_on: Vec<usize>,
    attempts: Vec<u32>,
    ready: VecDeque<usize>,
    delayed: Vec<(Instant, usize)>,
    capacity: Option<Resources>,
    in_use: Resources,
    running: usize,
    summary: Summary,
}

/// Checks that every step's requirements fit in `capacity`, naming each step that can
/// never run. With `capacity` `None` nothing is enforced.
pub(crate) fn check_resources(
    plan: &ExecutionPlan,
    capacity: Option<&Resources>,
) -> Result<(), String> {
    let Some(capacity) = capacity else {
        return Ok(());
    };
    let problems: Vec<String> = plan
        .steps
        .iter()
        .flat_map(|step| {
            step.required_resources.iter().filter_map(move |(name, need)| {
                let have = capacity.get(name).copied().unwrap_or(0.0);
                (*need > have).then(|| {
                    format!("step `{}` requires {name}={need} but the executor declares {name}={have}", step.key)
                })
            })
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}; declare what the machine has under `execution: {{<executor>: {{config: {{resources: {{...}}}}}}}}`",
            problems.join("; ")
        ))
    }
}

impl<'p> Scheduler<'p> {
    /// A scheduler for `plan`. With `capacity`, steps run only while their required
    /// resources fit; check them first with [`check_resources`].
    pub(crate) fn new(
        plan: &'p ExecutionPlan,
        events: EventSink,
        capacity: Option<Resources>,
    ) -> Self {
        let waiting_on: Vec<usize> = plan.steps.iter().map(|s| s.upstream.len()).collect();
        let mut state = vec![State::Waiting; plan.steps.len()];
        let mut ready = VecDeque::new();
        for (i, w) in waiting_on.iter().enumerate() {
            if *w == 0 {
                state[i] = State::Ready;
                ready.push_back(i);
            }
        }
        Self {
            plan,
            events,
            state,
            waiting_on,
            attempts: vec![0; plan.steps.len()],
            ready,
            delayed: Vec::new(),
            capacity,
            in_use: Resources::new(),
            running: 0,
            summary: Summary::default(),
        }
    }

    /// The next step to start and its attempt number, or `None` if nothing can start
    /// now (nothing ready, delays pending, or resources busy).
    #[allow(clippy::should_implement_trait)] // not an iterator: `None` means "not now", not "done"
    pub(crate) fn next(&mut self) -> Option<(usize, u32)> {
        let now = Instant::now();
        let mut i = 0;
        while i < self.delayed.len() {
            if self.delayed[i].0 <= now {
                let (_, step) = self.delayed.swap_remove(i);
                self.state[step] = State::Ready;
                self.ready.push_back(step);
            } else {
                i += 1;
            }
        }
        let pos = self.ready.iter().position(|&s| self.fits(s))?;
        let step = self.ready.remove(pos).expect("position is valid");
        for (name, need) in &self.plan.steps[step].required_resources {
            *self.in_use.entry(name.clone()).or_default() += need;
        }
        self.state[step] = State::Running;
        self.running += 1;
        self.attempts[step] += 1;
        let attempt = self.attempts[step];
        if attempt > 1 {
            let key = &self.plan.steps[step].key;
            self.events.emit(
                Some(key),
                Level::Info,
                format!("restarting {key} (attempt {attempt})"),
                EventKind::StepRestarted { attempt },
            );
        }
        Some((step, attempt))
    }

    fn fits(&self, step: usize) -> bool {
        let Some(capacity) = &self.capacity else {
            return true;
        };
        self.plan.steps[step]
            .required_resources
            .iter()
            .all(|(name, need)| {
                self.in_use.get(name).copied().unwrap_or(0.0) + need
                    <= capacity.get(name).copied().unwrap_or(0.0) + 1e-9
            })
    }

    fn release(&mut self, step: usize) {
        self.running -= 1;
        for (name, need) in &self.plan.steps[step].required_resources {
            if let Some(v) = self.in_use.get_mut(name) {
                *v -= need;
            }
        }
    }

    /// Records a successful attempt; dependents whose inputs are all ready become ready.
    pub(crate) fn succeeded(&mut self, step: usize) {
        self.release(step);
        self.state[step] = State::Succeeded;
        for &d in &self.plan.steps[step].downstream {
            self.waiting_on[d] -= 1;
            if self.waiting_on[d] == 0 && self.state[d] == State::Waiting {
                self.state[d] = State::Ready;
                self.ready.push_back(d);
            }
        }
    }

    /// Records a failed attempt. Retries if the step's policy (or the solid's explicit
    /// request) allows, emitting `STEP_UP_FOR_RETRY`; otherwise emits `STEP_FAILURE`
    /// and skips everything downstream.
    pub(crate) fn failed(
        &mut self,
        step: usize,
        error: ErrorInfo,
        retry_requested: Option<Option<Duration>>,
    ) -> AfterFailure {
        self.release(step);
        let s = &self.plan.steps[step];
        let attempt = self.attempts[step];
        let policy = &s.retry_policy;
        let max_retries = if retry_requested.is_some() {
            policy.max_retries.max(1)
        } else {
            policy.max_retries
        };
        if attempt <= max_retries && error.kind != "interrupted" {
            let delay = retry_requested
                .flatten()
                .unwrap_or_else(|| policy.delay_before(attempt + 1, fastrand::f64()));
            self.events.emit(
                Some(&s.key),
                Level::Warning,
                format!(
                    "{} failed on attempt {attempt}, retrying in {:.1}s: {}",
                    s.key,
                    delay.as_secs_f64(),
                    error.message
                ),
                EventKind::StepUpForRetry {
                    error,
                    attempt,
                    delay_secs: delay.as_secs_f64(),
                },
            );
            self.state[step] = State::Delayed;
            self.delayed.push((Instant::now() + delay, step));
            return AfterFailure::Retry;
        }
        self.events.emit(
            Some(&s.key),
            Level::Error,
            format!("{} failed: {}", s.key, error.message),
            EventKind::StepFailure { error, attempt },
        );
        self.state[step] = State::Failed;
        self.summary.failed.push(s.key.clone());
        self.skip_downstream(step);
        AfterFailure::Failed
    }

    fn skip_downstream(&mut self, failed: usize) {
        let mut stack = vec![failed];
        while let Some(step) = stack.pop() {
            for &d in &self.plan.steps[step].downstream {
                if self.state[d] != State::Waiting {
                    continue;
                }
                self.state[d] = State::Skipped;
                let ds = &self.plan.steps[d];
                let upstream: Vec<String> = ds
                    .upstream
                    .iter()
                    .filter(|&&u| matches!(self.state[u], State::Failed | State::Skipped))
                    .map(|&u| self.plan.steps[u].key.clone())
                    .collect();
                self.events.emit(
                    Some(&ds.key),
                    Level::Warning,
                    format!(
                        "skipped {} because {} did not succeed",
                        ds.key,
                        upstream.join(", ")
                    ),
                    EventKind::StepSkipped { upstream },
                );
                self.summary.skipped.push(ds.key.clone());
                stack.push(d);
            }
        }
    }

    /// Marks the run canceled: running steps fail as interrupted; nothing else starts.
    pub(crate) fn cancel(&mut self, running: &[usize]) {
        self.summary.canceled = true;
        for &step in running {
            if self.state[step] == State::Running {
                let error = ErrorInfo {
                    message: "interrupted: the run was canceled".into(),
                    causes: vec![],
                    kind: "interrupted".into(),
                    location: None,
                };
                self.failed(step, error, None);
            }
        }
        self.ready.clear();
        self.delayed.clear();
    }

    /// How many steps are running.
    pub(crate) fn running(&self) -> usize {
        self.running
    }

    /// When the earliest delayed retry becomes ready.
    pub(crate) fn next_wakeup(&self) -> Option<Instant> {
        self.delayed.iter().map(|(t, _)| *t).min()
    }

    /// Whether a step is ready but waiting for resources or a free slot.
    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Whether nothing is running, ready or waiting for a retry.
    pub(crate) fn is_finished(&self) -> bool {
        self.running == 0 && self.ready.is_empty() && self.delayed.is_empty()
    }

    /// The outcome so far.
    pub(crate) fn summary(self) -> Summary {
        self.summary
    }
}
