//! Step bookkeeping shared by every executor: which steps are ready, which wait for
//! resources or a retry delay, and which are skipped because something upstream failed.
//!
//! An executor asks [`Scheduler::next`] for work, reports each attempt's
//! [`StepOutcome`] with [`Scheduler::finished`], and stops when
//! [`Scheduler::is_finished`]. Events for retries, failures and skips are emitted here,
//! so every executor reports them the same way.
//!
//! Steps can be added while the run goes: a template step (the steps of a fan-out,
//! `double[?].compute`) whose upstreams succeeded is expanded into one step per item
//! of the dynamic output it maps over (`double[<key>].compute`), with the keys read by
//! the executor's resolver. Those steps are scheduled like any other (retries, resources,
//! cancel), keyed by their index after the plan's steps. The template succeeds when
//! they all did (a `STEP_SUCCESS` for the template key, so run history knows it is
//! done), and fails (skipping what is downstream, e.g. the collect) when one failed.
//!
//! A retry whose delay has passed goes to the front of the ready queue: it has waited
//! its delay already, and must not also wait behind every step that became ready
//! meanwhile.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::SolidError;
use super::event::{ErrorInfo, EventKind, Level};
use super::sink::{EventSink, Origin};
use crate::plan::{ExecutionPlan, ExecutionStep};

mod ahead;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Ready,
    Delayed,
    Running,
    Succeeded,
    Failed,
    Skipped,
    /// A template whose steps were added and have not all finished.
    Expanded,
    /// Handed out ahead of an upstream that is still running (see `ahead.rs`).
    Ahead,
}

/// Whether `state` counts as started for a dependent's ahead hand-out: launched (and
/// not itself ahead) or done.
fn started(state: State) -> bool {
    matches!(state, State::Running | State::Succeeded)
}

/// Reads the item keys of the dynamic output a template maps over.
pub(crate) type KeyResolver<'p> =
    Box<dyn FnMut(&ExecutionStep) -> Result<Vec<String>, ErrorInfo> + 'p>;

/// A template whose steps run: how many have not finished, and which failed.
struct FanOut {
    pending: usize,
    failed: Vec<String>,
}

/// Step `i` of the run: a plan step, or one added after them.
fn step_of<'a>(
    plan: &'a ExecutionPlan,
    added: &'a [Arc<ExecutionStep>],
    i: usize,
) -> &'a ExecutionStep {
    match i.checked_sub(plan.steps.len()) {
        None => &plan.steps[i],
        Some(a) => &added[a],
    }
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

/// How one attempt of a step ended: what every executor reports to the scheduler.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StepOutcome {
    /// The step stored its outputs.
    Succeeded,
    /// The attempt failed; the step's retry policy decides what happens next.
    Failed(ErrorInfo),
    /// The solid failed and asked for a retry (`SolidError::retry`), after `delay` if
    /// given, else after the policy's delay.
    RetryRequested {
        /// The failure.
        error: ErrorInfo,
        /// The delay the solid asked for.
        delay: Option<Duration>,
    },
}

impl StepOutcome {
    /// The outcome of an attempt whose solid returned `error`.
    pub(crate) fn from_error(error: &SolidError) -> Self {
        match error.retry_requested {
            Some(delay) => Self::RetryRequested {
                error: error.info(),
                delay,
            },
            None => Self::Failed(error.info()),
        }
    }

    /// The outcome of an attempt, from its result.
    pub(crate) fn of(result: Result<(), SolidError>) -> Self {
        match result {
            Ok(()) => Self::Succeeded,
            Err(e) => Self::from_error(&e),
        }
    }
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
    /// Steps added while the run goes (fan-outs): step `plan.steps.len() + i`.
    added: Vec<Arc<ExecutionStep>>,
    /// The template of each added step.
    template_of: Vec<usize>,
    /// Templates whose upstreams succeeded, to expand.
    expand: VecDeque<usize>,
    fanouts: HashMap<usize, FanOut>,
    /// The failed steps of each failed template, to name them in skips.
    failed_items: HashMap<usize, Vec<String>>,
    resolve: KeyResolver<'p>,
    /// Where each step's current attempt runs (a remote worker), for its events.
    origins: HashMap<usize, Origin>,
    /// With [`Scheduler::restarts_announced_when_placed`]: the last attempt of each
    /// step whose `STEP_RESTARTED` was emitted (1 when absent).
    announced: HashMap<usize, u32>,
    announce_when_placed: bool,
    /// Ahead-of-time hand-out (`ahead.rs`); `None` when the executor does not use it.
    ahead: Option<ahead::Ahead>,
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

/// ` on worker <address>`, for events of attempts on a remote worker.
fn on(origin: Option<&Origin>) -> String {
    origin
        .map(|o| format!(" on worker {}", o.worker))
        .unwrap_or_default()
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
        let mut expand = VecDeque::new();
        for (i, w) in waiting_on.iter().enumerate() {
            if *w == 0 {
                state[i] = State::Ready;
                if plan.steps[i].is_template() {
                    expand.push_back(i);
                } else {
                    ready.push_back(i);
                }
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
            added: Vec::new(),
            template_of: Vec::new(),
            expand,
            fanouts: HashMap::new(),
            failed_items: HashMap::new(),
            resolve: Box::new(|template| {
                Err(ErrorInfo {
                    message: format!(
                        "{}: this executor cannot read the keys of a dynamic output",
                        template.key
                    ),
                    causes: vec![],
                    kind: "error".into(),
                    location: None,
                })
            }),
            origins: HashMap::new(),
            announced: HashMap::new(),
            announce_when_placed: false,
            ahead: None,
        }
    }

    /// The dependents of step `i`. A step added while the run goes has none: what
    /// waits for a fan-out waits for its template.
    fn downstream_of(&self, i: usize) -> &'p [usize] {
        let plan: &'p ExecutionPlan = self.plan;
        plan.steps.get(i).map_or(&[], |s| s.downstream.as_slice())
    }

    /// Moves `step` to `new`, keeping the ahead bookkeeping of its dependents.
    fn set_state(&mut self, step: usize, new: State) {
        let old = std::mem::replace(&mut self.state[step], new);
        if self.ahead.is_some() && started(old) != started(new) {
            self.upstream_started(step, started(new));
        }
    }

    /// Emits `STEP_RESTARTED` when the restarted attempt is placed
    /// ([`Scheduler::placed`]) rather than when it is handed out, so that the event
    /// names the worker it runs on, like `STEP_START`.
    pub(crate) fn restarts_announced_when_placed(mut self) -> Self {
        self.announce_when_placed = true;
        self
    }

    /// The current attempt of `step` runs at `origin` (`None`: this machine, or it
    /// could not be started). Emits a pending `STEP_RESTARTED`; the step's failure and
    /// retry events carry the origin from now on.
    pub(crate) fn placed(&mut self, step: usize, origin: Option<Origin>) {
        match origin {
            Some(origin) => self.origins.insert(step, origin),
            None => self.origins.remove(&step),
        };
        let attempt = self.attempts[step];
        let announced = self.announced.get(&step).copied().unwrap_or(1);
        if self.announce_when_placed && attempt > announced {
            self.announced.insert(step, attempt);
            let key = &step_of(self.plan, &self.added, step).key;
            let origin = self.origins.get(&step);
            self.events.emit_from(
                origin,
                Some(key),
                Level::Info,
                format!("restarting {key} (attempt {attempt}){}", on(origin)),
                EventKind::StepRestarted { attempt },
            );
        }
    }

    /// Reads the item keys of fan-outs with `resolve` (see the module docs).
    pub(crate) fn with_resolver(mut self, resolve: KeyResolver<'p>) -> Self {
        self.resolve = resolve;
        self
    }

    /// Step `i` of the run: a plan step, or one added while the run goes.
    pub(crate) fn step(&self, i: usize) -> &ExecutionStep {
        step_of(self.plan, &self.added, i)
    }

    /// Step `i`, shared, when it was added while the run goes (`None` for plan steps).
    pub(crate) fn added_step(&self, i: usize) -> Option<Arc<ExecutionStep>> {
        i.checked_sub(self.plan.steps.len())
            .map(|a| self.added[a].clone())
    }

    /// The plan step a run step stands for: itself, or the template it was added for.
    pub(crate) fn plan_index(&self, i: usize) -> usize {
        i.checked_sub(self.plan.steps.len())
            .map_or(i, |a| self.template_of[a])
    }

    /// Adds the steps of template `t`, one per item not reused from a parent run.
    fn expand_template(&mut self, t: usize) {
        let template = &self.plan.steps[t];
        let keys = match (self.resolve)(template) {
            Ok(keys) => keys,
            Err(error) => {
                self.events.emit(
                    Some(&template.key),
                    Level::Error,
                    format!("{} failed: {}", template.key, error.message),
                    EventKind::StepFailure { error, attempt: 1 },
                );
                self.set_state(t, State::Failed);
                self.summary.failed.push(template.key.clone());
                self.skip_downstream(t);
                return;
            }
        };
        let reused = template
            .dynamic
            .as_ref()
            .map(|d| &d.reused)
            .filter(|r| !r.is_empty());
        let runs = BTreeMap::new();
        let mut pending = 0;
        for key in &keys {
            if reused.is_some_and(|r| r.contains_key(key)) {
                continue;
            }
            let i = self.plan.steps.len() + self.added.len();
            self.added.push(Arc::new(template.instantiate(key, &runs)));
            self.template_of.push(t);
            self.state.push(State::Ready);
            self.waiting_on.push(0);
            if let Some(ahead) = &mut self.ahead {
                ahead.added_step();
            }
            self.attempts.push(0);
            self.ready.push_back(i);
            pending += 1;
        }
        let over = template.dynamic.as_ref().map(|d| &d.over);
        let over = over
            .map(|o| format!("{}.{}", o.step_key, o.output))
            .unwrap_or_default();
        let reused_count = keys.len() - pending;
        self.events.emit(
            Some(&template.key),
            Level::Info,
            format!(
                "{}: {} step(s) for the {} item(s) of {over}{}",
                template.key,
                pending,
                keys.len(),
                if reused_count > 0 {
                    format!(" ({reused_count} reused from the parent run)")
                } else {
                    String::new()
                }
            ),
            EventKind::EngineEvent {
                details: serde_json::json!({
                    "fan_out": template.key,
                    "over": over,
                    "items": keys.len(),
                    "reused": reused_count,
                }),
            },
        );
        if pending == 0 {
            self.template_succeeded(t);
        } else {
            self.set_state(t, State::Expanded);
            self.fanouts.insert(
                t,
                FanOut {
                    pending,
                    failed: Vec::new(),
                },
            );
        }
    }

    /// An added step of template `t` finished for good (`failed`: its key, if it failed).
    fn fan_out_step_done(&mut self, step: usize, failed: bool) {
        let Some(a) = step.checked_sub(self.plan.steps.len()) else {
            return;
        };
        let t = self.template_of[a];
        let Some(f) = self.fanouts.get_mut(&t) else {
            return;
        };
        f.pending -= 1;
        if failed {
            f.failed.push(self.added[a].key.clone());
        }
        if f.pending > 0 {
            return;
        }
        let f = self.fanouts.remove(&t).expect("fan-out is tracked");
        if f.failed.is_empty() {
            self.template_succeeded(t);
        } else {
            self.set_state(t, State::Failed);
            self.failed_items.insert(t, f.failed);
            self.skip_downstream(t);
        }
    }

    fn template_succeeded(&mut self, t: usize) {
        let key = &self.plan.steps[t].key;
        self.events.emit(
            Some(key),
            Level::Info,
            format!("{key}: every step of the fan-out succeeded"),
            EventKind::StepSuccess {
                duration_ms: 0,
                attempt: 1,
            },
        );
        self.set_state(t, State::Succeeded);
        self.unblock_downstream(t);
    }

    /// The next step to start and its attempt number, or `None` if nothing can start
    /// now (nothing ready, delays pending, or resources busy).
    #[allow(clippy::should_implement_trait)] // not an iterator: `None` means "not now", not "done"
    pub(crate) fn next(&mut self) -> Option<(usize, u32)> {
        while let Some(t) = self.expand.pop_front() {
            self.expand_template(t);
        }
        self.promote_due_retries();
        let pos = self.ready.iter().position(|&s| self.fits(s))?;
        let step = self.ready.remove(pos).expect("position is valid");
        for (name, need) in &step_of(self.plan, &self.added, step).required_resources {
            *self.in_use.entry(name.clone()).or_default() += need;
        }
        self.set_state(step, State::Running);
        self.running += 1;
        self.attempts[step] += 1;
        let attempt = self.attempts[step];
        self.origins.remove(&step);
        if attempt > 1 && !self.announce_when_placed {
            let key = &step_of(self.plan, &self.added, step).key;
            self.events.emit(
                Some(key),
                Level::Info,
                format!("restarting {key} (attempt {attempt})"),
                EventKind::StepRestarted { attempt },
            );
        }
        Some((step, attempt))
    }

    /// Moves retries whose delay has passed to the front of the ready queue, earliest
    /// due first.
    fn promote_due_retries(&mut self) {
        let now = Instant::now();
        if !self.delayed.iter().any(|(due, _)| *due <= now) {
            return;
        }
        let mut due: Vec<(Instant, usize)> = Vec::new();
        self.delayed.retain(|&(at, step)| {
            let is_due = at <= now;
            if is_due {
                due.push((at, step));
            }
            !is_due
        });
        due.sort();
        for &(_, step) in due.iter().rev() {
            self.set_state(step, State::Ready);
            self.ready.push_front(step);
        }
    }

    fn fits(&self, step: usize) -> bool {
        let Some(capacity) = &self.capacity else {
            return true;
        };
        self.step(step)
            .required_resources
            .iter()
            .all(|(name, need)| {
                self.in_use.get(name).copied().unwrap_or(0.0) + need
                    <= capacity.get(name).copied().unwrap_or(0.0) + 1e-9
            })
    }

    fn release(&mut self, step: usize) {
        self.running -= 1;
        for (name, need) in &step_of(self.plan, &self.added, step).required_resources {
            if let Some(v) = self.in_use.get_mut(name) {
                *v -= need;
            }
        }
    }

    /// Records how an attempt of `step` ended. On success, dependents whose inputs are
    /// all ready become ready. On failure the step is retried if its policy (or the
    /// solid's explicit request) allows, emitting `STEP_UP_FOR_RETRY`; otherwise
    /// `STEP_FAILURE` is emitted and everything downstream is skipped.
    pub(crate) fn finished(&mut self, step: usize, outcome: StepOutcome) -> Option<AfterFailure> {
        match outcome {
            StepOutcome::Succeeded => {
                self.succeeded(step);
                None
            }
            StepOutcome::Failed(error) => Some(self.failed(step, error, None)),
            StepOutcome::RetryRequested { error, delay } => {
                Some(self.failed(step, error, Some(delay)))
            }
        }
    }

    fn succeeded(&mut self, step: usize) {
        self.release(step);
        self.set_state(step, State::Succeeded);
        self.unblock_downstream(step);
        self.fan_out_step_done(step, false);
    }

    /// Dependents of `step` whose upstreams all succeeded become ready (a template:
    /// due for expansion).
    fn unblock_downstream(&mut self, step: usize) {
        for &d in self.downstream_of(step) {
            self.waiting_on[d] -= 1;
            if self.waiting_on[d] == 0 && self.state[d] == State::Ahead {
                self.promote(d);
            } else if self.waiting_on[d] == 0 && self.state[d] == State::Waiting {
                self.set_state(d, State::Ready);
                if self.plan.steps[d].is_template() {
                    self.expand.push_back(d);
                } else {
                    self.ready.push_back(d);
                }
            }
        }
    }

    fn failed(
        &mut self,
        step: usize,
        error: ErrorInfo,
        retry_requested: Option<Option<Duration>>,
    ) -> AfterFailure {
        self.release(step);
        self.withdraw_dependents(step);
        let s = step_of(self.plan, &self.added, step);
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
            let origin = self.origins.get(&step);
            self.events.emit_from(
                origin,
                Some(&s.key),
                Level::Warning,
                format!(
                    "{} failed on attempt {attempt}{}, retrying in {:.1}s: {}",
                    s.key,
                    on(origin),
                    delay.as_secs_f64(),
                    error.message
                ),
                EventKind::StepUpForRetry {
                    error,
                    attempt,
                    delay_secs: delay.as_secs_f64(),
                },
            );
            self.set_state(step, State::Delayed);
            self.delayed.push((Instant::now() + delay, step));
            return AfterFailure::Retry;
        }
        let origin = self.origins.get(&step);
        self.events.emit_from(
            origin,
            Some(&s.key),
            Level::Error,
            format!("{} failed{}: {}", s.key, on(origin), error.message),
            EventKind::StepFailure { error, attempt },
        );
        let key = s.key.clone();
        self.set_state(step, State::Failed);
        self.summary.failed.push(key);
        self.skip_downstream(step);
        self.fan_out_step_done(step, true);
        AfterFailure::Failed
    }

    fn skip_downstream(&mut self, failed: usize) {
        let mut stack = vec![failed];
        while let Some(step) = stack.pop() {
            for &d in self.downstream_of(step) {
                if self.state[d] != State::Waiting {
                    continue;
                }
                self.set_state(d, State::Skipped);
                let ds = step_of(self.plan, &self.added, d);
                let upstream: Vec<String> = ds
                    .upstream
                    .iter()
                    .filter(|&&u| matches!(self.state[u], State::Failed | State::Skipped))
                    .flat_map(|&u| match self.failed_items.get(&u) {
                        Some(items) => items.clone(),
                        None => vec![step_of(self.plan, &self.added, u).key.clone()],
                    })
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
    /// Steps handed out ahead go back to waiting (their launches are withdrawn by the
    /// executor), so they are skipped with what waits.
    pub(crate) fn cancel(&mut self, running: &[usize]) {
        self.summary.canceled = true;
        self.withdraw_all_ahead();
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
        self.expand.clear();
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
        !self.ready.is_empty() || !self.expand.is_empty()
    }

    /// Whether nothing is running, ready or waiting for a retry.
    pub(crate) fn is_finished(&self) -> bool {
        self.running == 0
            && self.ready.is_empty()
            && self.delayed.is_empty()
            && self.expand.is_empty()
    }

    /// The outcome so far.
    pub(crate) fn summary(self) -> Summary {
        self.summary
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::retry::RetryPolicy;
    use crate::execution::sink::EventCollector;
    use crate::plan::ExecutionStep;
    use std::sync::Arc;

    /// `(name, upstream names, retry policy, resources)`.
    type StepSpec<'a> = (&'a str, &'a [&'a str], RetryPolicy, &'a [(&'a str, f64)]);

    fn plan(steps: &[StepSpec<'_>]) -> ExecutionPlan {
        let index = |name: &str| steps.iter().position(|s| s.0 == name).unwrap();
        let mut plan = ExecutionPlan {
            pipeline: "p".into(),
            steps: steps
                .iter()
                .map(|(name, up, retry, res)| ExecutionStep {
                    key: format!("{name}.compute"),
                    solid: name.to_string(),
                    solid_definition: name.to_string(),
                    inputs: vec![],
                    outputs: vec![],
                    required_resources: res.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                    tags: Default::default(),
                    retry_policy: retry.clone(),
                    level: 0,
                    dynamic: None,
                    invocation: 0,
                    upstream: up.iter().map(|u| index(u)).collect(),
                    downstream: vec![],
                })
                .collect(),
        };
        for i in 0..plan.steps.len() {
            for u in plan.steps[i].upstream.clone() {
                plan.steps[u].downstream.push(i);
            }
        }
        plan
    }

    fn sink() -> (EventSink, EventCollector) {
        let collector = EventCollector::default();
        let sink = EventSink::new("run", "p", vec![Arc::new(collector.clone())]);
        (sink, collector)
    }

    fn error(message: &str) -> ErrorInfo {
        ErrorInfo {
            message: message.into(),
            causes: vec![],
            kind: "error".into(),
            location: None,
        }
    }

    fn types(collector: &EventCollector) -> Vec<String> {
        collector
            .events()
            .iter()
            .map(|e| format!("{} {}", e.kind.name(), e.step_key.as_deref().unwrap_or("")))
            .collect()
    }

    const NONE: RetryPolicy = RetryPolicy {
        max_retries: 0,
        delay: 0.0,
        backoff: 1.0,
        jitter: 0.0,
    };

    #[test]
    fn steps_become_ready_in_plan_order_once_their_upstreams_succeeded() {
        let plan = plan(&[
            ("a", &[], NONE, &[]),
            ("b", &[], NONE, &[]),
            ("c", &["a", "b"], NONE, &[]),
        ]);
        let (events, _) = sink();
        let mut s = Scheduler::new(&plan, events, None);
        assert_eq!(s.next(), Some((0, 1)));
        assert_eq!(s.next(), Some((1, 1)));
        assert_eq!(s.next(), None, "c waits for a and b");
        s.finished(0, StepOutcome::Succeeded);
        assert_eq!(s.next(), None, "c still waits for b");
        s.finished(1, StepOutcome::Succeeded);
        assert_eq!(s.next(), Some((2, 1)));
        assert!(!s.is_finished());
        s.finished(2, StepOutcome::Succeeded);
        assert!(s.is_finished());
        let summary = s.summary();
        assert!(summary.failed.is_empty() && summary.skipped.is_empty() && !summary.canceled);
    }

    /// The events and summary of `a` failing for good and `b`, `c` (after it) skipped.
    fn expect_a_failed_b_and_c_skipped(s: Scheduler<'_>, collector: &EventCollector) {
        assert_eq!(
            types(collector),
            [
                "STEP_FAILURE a.compute",
                "STEP_SKIPPED b.compute",
                "STEP_SKIPPED c.compute"
            ]
        );
        let summary = s.summary();
        assert_eq!(summary.failed, ["a.compute"]);
        assert_eq!(summary.skipped, ["b.compute", "c.compute"]);
    }

    #[test]
    fn a_failure_skips_everything_downstream_and_nothing_else() {
        let plan = plan(&[
            ("a", &[], NONE, &[]),
            ("b", &["a"], NONE, &[]),
            ("c", &["b"], NONE, &[]),
            ("d", &[], NONE, &[]),
        ]);
        let (events, collector) = sink();
        let mut s = Scheduler::new(&plan, events, None);
        assert_eq!(s.next(), Some((0, 1)));
        assert_eq!(s.next(), Some((3, 1)));
        assert_eq!(
            s.finished(0, StepOutcome::Failed(error("boom"))),
            Some(AfterFailure::Failed)
        );
        s.finished(3, StepOutcome::Succeeded);
        assert_eq!(s.next(), None);
        assert!(s.is_finished());
        expect_a_failed_b_and_c_skipped(s, &collector);
    }

    #[test]
    fn a_retry_waits_its_delay_then_goes_before_steps_that_became_ready_meanwhile() {
        let retry = RetryPolicy::new(1).delay(0.05);
        let plan = plan(&[
            ("flaky", &[], retry, &[]),
            ("x", &[], NONE, &[]),
            ("y", &[], NONE, &[]),
        ]);
        let (events, collector) = sink();
        let mut s = Scheduler::new(&plan, events, None);
        assert_eq!(s.next(), Some((0, 1)));
        let failed_at = Instant::now();
        assert_eq!(
            s.finished(0, StepOutcome::Failed(error("flake"))),
            Some(AfterFailure::Retry)
        );
        let due = s.next_wakeup().expect("a retry is pending");
        assert!(due >= failed_at + Duration::from_millis(50));
        // Before the delay: the other ready steps run, the retry does not.
        assert_eq!(s.next(), Some((1, 1)));
        while Instant::now() < due {
            std::thread::sleep(due - Instant::now());
        }
        // Due now: it goes before `y`, which has been ready all along.
        assert_eq!(s.next(), Some((0, 2)));
        assert_eq!(s.next(), Some((2, 1)));
        assert_eq!(
            types(&collector),
            [
                "STEP_UP_FOR_RETRY flaky.compute",
                "STEP_RESTARTED flaky.compute"
            ]
        );
        // The second failure is final: max_retries is 1.
        assert_eq!(
            s.finished(0, StepOutcome::Failed(error("again"))),
            Some(AfterFailure::Failed)
        );
    }

    #[test]
    fn a_requested_retry_uses_its_own_delay_and_retries_once_without_a_policy() {
        let plan = plan(&[("a", &[], NONE, &[])]);
        let (events, collector) = sink();
        let mut s = Scheduler::new(&plan, events, None);
        assert_eq!(s.next(), Some((0, 1)));
        let outcome = StepOutcome::RetryRequested {
            error: error("not yet"),
            delay: Some(Duration::ZERO),
        };
        assert_eq!(s.finished(0, outcome.clone()), Some(AfterFailure::Retry));
        assert_eq!(s.next(), Some((0, 2)));
        assert_eq!(s.finished(0, outcome), Some(AfterFailure::Failed));
        let up = collector
            .events()
            .into_iter()
            .find(|e| e.kind.name() == "STEP_UP_FOR_RETRY")
            .unwrap();
        assert!(
            matches!(up.kind, EventKind::StepUpForRetry { delay_secs, .. } if delay_secs == 0.0)
        );
    }

    #[test]
    fn steps_wait_while_their_resources_are_in_use() {
        let plan = plan(&[
            ("gpu1", &[], NONE, &[("GPU", 1.0)]),
            ("gpu2", &[], NONE, &[("GPU", 1.0)]),
            ("cpu", &[], NONE, &[]),
        ]);
        let capacity = Resources::from([("GPU".to_string(), 1.0)]);
        assert!(check_resources(&plan, Some(&capacity)).is_ok());
        let (events, _) = sink();
        let mut s = Scheduler::new(&plan, events, Some(capacity));
        assert_eq!(s.next(), Some((0, 1)));
        assert_eq!(s.next(), Some((2, 1)), "gpu2 waits; cpu needs nothing");
        assert_eq!(s.next(), None);
        assert!(s.has_ready());
        s.finished(0, StepOutcome::Succeeded);
        assert_eq!(s.next(), Some((1, 1)));
    }

    #[test]
    fn resources_no_machine_offers_are_named_up_front() {
        let plan = plan(&[("big", &[], NONE, &[("GPU", 2.0)])]);
        let capacity = Resources::from([("GPU".to_string(), 1.0)]);
        let message = check_resources(&plan, Some(&capacity)).unwrap_err();
        assert!(
            message.contains("step `big.compute` requires GPU=2 but the executor declares GPU=1"),
            "{message}"
        );
        assert!(check_resources(&plan, None).is_ok());
    }

    #[test]
    fn cancel_interrupts_running_steps_without_retrying_and_starts_nothing() {
        let plan = plan(&[
            ("a", &[], RetryPolicy::new(3), &[]),
            ("b", &[], NONE, &[]),
            ("c", &["a"], NONE, &[]),
        ]);
        let (events, collector) = sink();
        let mut s = Scheduler::new(&plan, events, None);
        assert_eq!(s.next(), Some((0, 1)));
        s.cancel(&[0]);
        assert_eq!(s.next(), None, "nothing starts after cancel");
        assert!(s.is_finished());
        let failure = collector
            .events()
            .into_iter()
            .find(|e| e.kind.name() == "STEP_FAILURE")
            .unwrap();
        assert!(
            matches!(&failure.kind, EventKind::StepFailure { error, .. } if error.kind == "interrupted"),
            "{failure:?}"
        );
        let summary = s.summary();
        assert!(summary.canceled);
        assert_eq!(summary.failed, ["a.compute"]);
        assert_eq!(summary.skipped, ["c.compute"]);
    }

    /// `src` → `map[?]` (a template over `src.result`) → `join`.
    fn fan_out_plan() -> ExecutionPlan {
        let mut plan = plan(&[
            ("src", &[], NONE, &[]),
            ("map", &["src"], RetryPolicy::new(1), &[]),
            ("join", &["map"], NONE, &[]),
        ]);
        plan.steps[1].key = "map[?].compute".into();
        plan.steps[1].dynamic = Some(crate::plan::DynamicStep {
            over: crate::plan::StepOutputRef {
                step_key: "src.compute".into(),
                output: "result".into(),
            },
            over_run_id: None,
            mapping_key: None,
            reused: Default::default(),
        });
        plan
    }

    fn keys(keys: &'static [&'static str]) -> KeyResolver<'static> {
        Box::new(move |_| Ok(keys.iter().map(|k| k.to_string()).collect()))
    }

    #[test]
    fn a_template_becomes_one_step_per_key_and_its_dependents_wait_for_all() {
        let plan = fan_out_plan();
        let (events, collector) = sink();
        let mut s = Scheduler::new(&plan, events, None).with_resolver(keys(&["a", "b"]));
        assert_eq!(s.next(), Some((0, 1)));
        assert_eq!(s.next(), None);
        s.finished(0, StepOutcome::Succeeded);
        assert_eq!(s.next(), Some((3, 1)));
        assert_eq!(s.next(), Some((4, 1)));
        assert_eq!(s.step(3).key, "map[a].compute");
        assert_eq!(s.step(4).key, "map[b].compute");
        assert_eq!(s.plan_index(4), 1);
        s.finished(4, StepOutcome::Succeeded);
        assert_eq!(s.next(), None, "join waits for map[a] too");
        // A step of a fan-out retries with its template's policy.
        s.finished(3, StepOutcome::Failed(error("flake")));
        while s.next_wakeup().is_some_and(|t| t > Instant::now()) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(s.next(), Some((3, 2)));
        s.finished(3, StepOutcome::Succeeded);
        assert_eq!(s.next(), Some((2, 1)));
        s.finished(2, StepOutcome::Succeeded);
        assert!(s.is_finished());
        let kinds = types(&collector);
        assert!(
            kinds.contains(&"STEP_SUCCESS map[?].compute".to_string()),
            "{kinds:?}"
        );
    }

    #[test]
    fn no_keys_means_no_steps_and_dependents_run() {
        let plan = fan_out_plan();
        let (events, _) = sink();
        let mut s = Scheduler::new(&plan, events, None).with_resolver(keys(&[]));
        assert_eq!(s.next(), Some((0, 1)));
        s.finished(0, StepOutcome::Succeeded);
        assert_eq!(s.next(), Some((2, 1)), "join runs on an empty collect");
    }

    #[test]
    fn a_failed_step_of_a_fan_out_skips_the_dependents_naming_it() {
        let mut plan = fan_out_plan();
        plan.steps[1].retry_policy = NONE;
        let (events, collector) = sink();
        let mut s = Scheduler::new(&plan, events, None).with_resolver(keys(&["a", "b"]));
        s.next();
        s.finished(0, StepOutcome::Succeeded);
        assert_eq!(s.next(), Some((3, 1)));
        assert_eq!(s.next(), Some((4, 1)));
        s.finished(3, StepOutcome::Failed(error("boom")));
        s.finished(4, StepOutcome::Succeeded);
        assert!(s.is_finished());
        let skipped = collector
            .events()
            .into_iter()
            .find(|e| e.kind.name() == "STEP_SKIPPED")
            .unwrap();
        assert!(
            matches!(&skipped.kind, EventKind::StepSkipped { upstream } if upstream == &["map[a].compute"]),
            "{skipped:?}"
        );
        let summary = s.summary();
        assert_eq!(summary.failed, ["map[a].compute"]);
        assert_eq!(summary.skipped, ["join.compute"]);
    }

    #[test]
    fn keys_that_cannot_be_read_fail_the_template() {
        let plan = fan_out_plan();
        let (events, _) = sink();
        let mut s = Scheduler::new(&plan, events, None);
        s.next();
        s.finished(0, StepOutcome::Succeeded);
        assert_eq!(s.next(), None);
        assert!(s.is_finished());
        let summary = s.summary();
        assert_eq!(summary.failed, ["map[?].compute"]);
        assert_eq!(summary.skipped, ["join.compute"]);
    }

    /// `a` → `b` → `c`, `a` with `retry`, handing out ahead.
    fn chain(retry: RetryPolicy) -> ExecutionPlan {
        plan(&[
            ("a", &[], retry, &[]),
            ("b", &["a"], NONE, &[]),
            ("c", &["b"], NONE, &[]),
        ])
    }

    fn ahead(plan: &ExecutionPlan) -> (Scheduler<'_>, EventCollector) {
        let (events, collector) = sink();
        let s = Scheduler::new(plan, events, None)
            .restarts_announced_when_placed()
            .with_ahead();
        (s, collector)
    }

    #[test]
    fn a_step_is_handed_out_ahead_of_its_running_upstream_one_level_deep() {
        let plan = chain(NONE);
        let (mut s, collector) = ahead(&plan);
        assert_eq!(s.next(), Some((0, 1)));
        assert_eq!(s.next(), None, "b waits for a");
        assert_eq!(s.next_ahead(), Some((1, 1, vec![0])));
        assert!(s.is_ahead(1));
        assert_eq!(s.next_ahead(), None, "c would be two levels ahead");
        assert_eq!(s.running(), 2, "an ahead step counts as running");
        s.finished(0, StepOutcome::Succeeded);
        assert_eq!(s.take_promoted(), [1], "b runs now");
        assert!(!s.is_ahead(1));
        assert_eq!(s.next(), None);
        assert_eq!(s.next_ahead(), Some((2, 1, vec![1])));
        s.finished(1, StepOutcome::Succeeded);
        assert_eq!(s.take_promoted(), [2]);
        s.finished(2, StepOutcome::Succeeded);
        assert!(s.is_finished());
        assert!(s.take_withdrawn().is_empty());
        assert!(types(&collector).is_empty(), "{:?}", types(&collector));
    }

    #[test]
    fn an_upstream_retry_withdraws_the_ahead_step_which_goes_again_after_the_retry() {
        let plan = chain(RetryPolicy::new(1));
        let (mut s, collector) = ahead(&plan);
        assert_eq!(s.next(), Some((0, 1)));
        assert_eq!(s.next_ahead(), Some((1, 1, vec![0])));
        assert_eq!(
            s.finished(0, StepOutcome::Failed(error("flake"))),
            Some(AfterFailure::Retry)
        );
        assert_eq!(
            s.take_withdrawn(),
            [1],
            "b cannot run on a's failed attempt"
        );
        assert_eq!(
            s.next_ahead(),
            None,
            "a is not running: nothing to go ahead of"
        );
        while s.next_wakeup().is_some_and(|t| t > Instant::now()) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(s.next(), Some((0, 2)));
        assert_eq!(
            s.next_ahead(),
            Some((1, 1, vec![0])),
            "b goes ahead of the retry, still its first attempt"
        );
        s.finished(0, StepOutcome::Succeeded);
        assert_eq!(s.take_promoted(), [1]);
        assert_eq!(types(&collector), ["STEP_UP_FOR_RETRY a.compute"]);
    }

    #[test]
    fn a_final_upstream_failure_withdraws_and_skips_the_ahead_step() {
        let plan = chain(NONE);
        let (mut s, collector) = ahead(&plan);
        s.next();
        assert_eq!(s.next_ahead(), Some((1, 1, vec![0])));
        assert_eq!(
            s.finished(0, StepOutcome::Failed(error("boom"))),
            Some(AfterFailure::Failed)
        );
        assert_eq!(s.take_withdrawn(), [1]);
        assert!(s.is_finished());
        expect_a_failed_b_and_c_skipped(s, &collector);
    }

    #[test]
    fn a_launch_withdrawn_where_it_ran_waits_for_the_upstream_outcome_here() {
        let plan = chain(NONE);
        let (mut s, _) = ahead(&plan);
        s.next();
        assert_eq!(s.next_ahead(), Some((1, 1, vec![0])));
        // The cluster saw a's attempt fail before this scheduler heard of it.
        s.withdrawn(1);
        assert!(s.take_withdrawn().is_empty(), "the launch ended already");
        assert_eq!(s.running(), 1);
        assert_eq!(s.next_ahead(), None, "not ahead of the same attempt again");
        // Here a succeeded after all: b is ready, and keeps its attempt number.
        s.finished(0, StepOutcome::Succeeded);
        assert!(s.take_promoted().is_empty());
        assert_eq!(s.next(), Some((1, 1)));
        // A promoted step withdrawn where it ran goes back to the front of the queue.
        assert_eq!(s.next_ahead(), Some((2, 1, vec![1])));
        s.finished(1, StepOutcome::Succeeded);
        assert_eq!(s.take_promoted(), [2]);
        s.withdrawn(2);
        assert_eq!(s.next(), Some((2, 1)));
    }

    #[test]
    fn cancel_withdraws_ahead_steps_and_skips_them() {
        let plan = chain(RetryPolicy::new(3));
        let (mut s, collector) = ahead(&plan);
        s.next();
        assert_eq!(s.next_ahead(), Some((1, 1, vec![0])));
        s.cancel(&[0, 1]);
        assert!(s.is_finished());
        expect_a_failed_b_and_c_skipped(s, &collector);
    }

    #[test]
    fn only_the_sole_dependent_of_a_running_step_goes_ahead_of_it() {
        // a → b, a → c (a fan-out: b and c wait), b → d, c → d (a fan-in: d goes ahead).
        let plan = plan(&[
            ("a", &[], NONE, &[]),
            ("b", &["a"], NONE, &[]),
            ("c", &["a"], NONE, &[]),
            ("d", &["b", "c"], NONE, &[]),
        ]);
        let (mut s, _) = ahead(&plan);
        assert_eq!(s.next(), Some((0, 1)));
        assert_eq!(s.next_ahead(), None, "a has two dependents");
        s.finished(0, StepOutcome::Succeeded);
        assert_eq!(s.next(), Some((1, 1)));
        assert_eq!(s.next(), Some((2, 1)));
        assert_eq!(s.next_ahead(), Some((3, 1, vec![1, 2])));
    }

    #[test]
    fn ahead_steps_hold_their_resources_and_fan_outs_never_go_ahead() {
        let plan = plan(&[
            ("a", &[], NONE, &[("GPU", 1.0)]),
            ("b", &["a"], NONE, &[("GPU", 1.0)]),
            ("c", &[], NONE, &[]),
            ("d", &["c"], NONE, &[]),
        ]);
        let (events, _) = sink();
        let capacity = Resources::from([("GPU".to_string(), 1.0)]);
        let mut s = Scheduler::new(&plan, events, Some(capacity)).with_ahead();
        assert_eq!(s.next(), Some((0, 1)));
        assert_eq!(s.next(), Some((2, 1)));
        assert_eq!(s.next_ahead(), Some((3, 1, vec![2])), "b's GPU is in use");
        assert_eq!(s.next_ahead(), None);
        s.finished(0, StepOutcome::Succeeded);
        assert_eq!(s.next(), Some((1, 1)));

        let plan = fan_out_plan();
        let (events, _) = sink();
        let mut s = Scheduler::new(&plan, events, None)
            .with_resolver(keys(&["x"]))
            .with_ahead();
        assert_eq!(s.next(), Some((0, 1)));
        assert_eq!(
            s.next_ahead(),
            None,
            "a template's steps are known only later"
        );
        s.finished(0, StepOutcome::Succeeded);
        assert_eq!(s.next(), Some((3, 1)));
        assert_eq!(s.next_ahead(), None, "the collect waits for the template");
    }
}
