//! The one run loop of every out-of-process executor: hands the scheduler's ready
//! attempts to a [`StepLauncher`], turns its reports into events and outcomes, waits
//! for retries to become due, and on cancel terminates what runs.
//!
//! With a launcher that [`launches_ahead`](StepLauncher::launches_ahead), steps are
//! also handed out ahead of their running upstreams (see the scheduler's `ahead.rs`).
//! What such an attempt reports is held until the scheduler promotes it (every
//! upstream succeeded here), so the run's events keep their order (an upstream's
//! `STEP_SUCCESS` before its dependent's `STEP_START`); a launch the scheduler
//! withdrew is stopped and whatever it still reports is dropped.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};
use serde_json::json;

use super::attempt::Attempt;
use super::{AttemptId, Launch, LaunchError, Notice, Report, Reporter, StepLauncher};
use crate::execution::cancel::CancelToken;
use crate::execution::event::{EventKind, Level};
use crate::execution::protocol::StepInvocation;
use crate::execution::scheduler::{Resources, Scheduler, StepOutcome, Summary};
use crate::execution::step::StepEnvironment;

/// How long the loop waits at most before it looks at cancellation again.
const POLL: Duration = Duration::from_millis(50);

/// How long, after the grace period, canceled attempts get to report their end
/// (a process in uninterruptible sleep may never).
const CANCEL_MARGIN: Duration = Duration::from_secs(8);

/// How [`run_steps`] runs one plan.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Most attempts in flight at once; `None` hands out every ready attempt (the
    /// launcher's cluster places them).
    pub max_running: Option<usize>,
    /// Resources this machine offers; steps wait for them. `None`: not enforced here.
    pub resources: Option<Resources>,
    /// On cancel, how long attempts get between the request to stop and the kill.
    pub grace: Duration,
}

struct Running<H> {
    attempt: Attempt,
    handle: H,
    /// Launched ahead and not promoted yet: its reports so far, in order.
    held: Option<Vec<Report>>,
}

/// The loop's state: the scheduler and the attempts in flight.
struct Loop<'e, 'p, H> {
    env: &'e StepEnvironment,
    scheduler: Scheduler<'p>,
    running: HashMap<AttemptId, Running<H>>,
    /// The attempt in flight of each step.
    by_step: HashMap<usize, AttemptId>,
    /// Launches the scheduler withdrew, until they report their end.
    withdrawing: HashMap<AttemptId, H>,
    /// Per step: the attempt number whose launches were withdrawn, and how many.
    withdrawals: HashMap<usize, (u32, u32)>,
    tx: Sender<Notice>,
    next_id: u64,
    grace: Duration,
    /// While canceling: the steps whose attempts ended without success.
    interrupted: Option<Vec<usize>>,
}

/// Runs every step of `env`'s plan through `launcher` (see the module docs). Step
/// failures are events and part of the summary; `Err` is the launcher's machinery
/// failing, with a message for the person running the pipeline.
pub fn run_steps<L: StepLauncher>(
    env: &StepEnvironment,
    cancel: &CancelToken,
    home: &Path,
    launcher: &mut L,
    options: RunOptions,
) -> Result<Summary, String> {
    let plan = env.plan.clone();
    let mut scheduler = Scheduler::new(&plan, env.events.clone(), options.resources.clone())
        .with_resolver(env.key_resolver())
        .restarts_announced_when_placed();
    if launcher.launches_ahead() {
        scheduler = scheduler.with_ahead();
    }
    let (tx, rx) = unbounded::<Notice>();
    let mut lp = Loop {
        env,
        scheduler,
        running: HashMap::new(),
        by_step: HashMap::new(),
        withdrawing: HashMap::new(),
        withdrawals: HashMap::new(),
        tx,
        next_id: 0,
        grace: options.grace,
        interrupted: None,
    };
    loop {
        if cancel.is_canceled() {
            lp.cancel(launcher, &rx);
            break;
        }
        let failed_to_launch = lp.launch(launcher, home, options.max_running)?;
        if lp.scheduler.is_finished() && lp.withdrawing.is_empty() {
            break;
        }
        if failed_to_launch {
            continue; // a slot is free again, or a retry is due
        }
        let timeout = lp.scheduler.next_wakeup().map_or(POLL, |t| {
            t.saturating_duration_since(Instant::now()).min(POLL)
        });
        let first = match rx.recv_timeout(timeout) {
            Ok(notice) => Some(notice),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => unreachable!("the loop holds a sender"),
        };
        for notice in first
            .into_iter()
            .chain(std::iter::from_fn(|| rx.try_recv().ok()))
        {
            match notice {
                Notice::Attempt(id, report) => lp.on_report(launcher, id, report),
                Notice::EngineFailed(message) => return Err(message),
            }
        }
        launcher.idle();
    }
    launcher.idle();
    Ok(lp.scheduler.summary())
}

impl<H> Loop<'_, '_, H> {
    /// Hands out what the scheduler has (ready steps first, then steps ahead when the
    /// launcher takes them) and launches it. Returns whether a launch failed.
    fn launch<L: StepLauncher<Handle = H>>(
        &mut self,
        launcher: &mut L,
        home: &Path,
        max_running: Option<usize>,
    ) -> Result<bool, String> {
        let ahead = launcher.launches_ahead();
        let mut launches = Vec::new();
        let mut attempts = Vec::new();
        while max_running.is_none_or(|max| self.running.len() + launches.len() < max.max(1)) {
            let (step, number, after) = match self.scheduler.next() {
                Some((step, number)) => (step, number, None),
                None => match ahead.then(|| self.scheduler.next_ahead()).flatten() {
                    Some((step, number, after)) => (step, number, Some(after)),
                    None => break,
                },
            };
            self.next_id += 1;
            let id = AttemptId(self.next_id);
            self.by_step.insert(step, id);
            let after_ids = after.as_deref().unwrap_or_default();
            let after_ids = after_ids
                .iter()
                .map(|u| self.by_step[u])
                .collect::<Vec<_>>();
            let withdrawn = self
                .withdrawals
                .get(&step)
                .filter(|(n, _)| *n == number)
                .map_or(0, |(_, count)| *count);
            let planned = self.scheduler.step(step);
            launches.push(Launch {
                id,
                step: self.scheduler.plan_index(step),
                invocation: StepInvocation::for_attempt(self.env, home, planned, number),
                reporter: Reporter::new(id, self.tx.clone()),
                after: after_ids,
                withdrawn,
            });
            let held = after.map(|_| Vec::new());
            attempts.push((id, Attempt::new(step, &planned.key, number), held));
        }
        if launches.is_empty() {
            return Ok(false);
        }
        let results = launcher.launch_all(launches);
        let mut failures = Vec::new();
        for ((id, attempt, held), result) in attempts.into_iter().zip(results) {
            match result {
                Ok(handle) => {
                    self.running.insert(
                        id,
                        Running {
                            attempt,
                            handle,
                            held,
                        },
                    );
                }
                Err(LaunchError::Step(error)) => failures.push((attempt.step, error)),
                Err(LaunchError::Engine(message)) => return Err(message),
            }
        }
        let failed_to_launch = !failures.is_empty();
        for (step, error) in failures {
            self.by_step.remove(&step);
            self.scheduler.placed(step, None);
            self.scheduler.finished(step, StepOutcome::Failed(error));
        }
        self.settle(launcher);
        Ok(failed_to_launch)
    }

    /// One report about attempt `id`.
    fn on_report<L: StepLauncher<Handle = H>>(
        &mut self,
        launcher: &mut L,
        id: AttemptId,
        report: Report,
    ) {
        if self.withdrawing.contains_key(&id) {
            if report.is_final() {
                self.withdrawing.remove(&id);
            }
            return;
        }
        let Some(r) = self.running.get_mut(&id) else {
            return;
        };
        let step = r.attempt.step;
        let ahead_ended = r.held.is_some() && report.is_final() && self.interrupted.is_some();
        if matches!(report, Report::Withdrawn) || ahead_ended {
            // Not launched after all (or, while canceling, an ahead launch that ended).
            let number = r.attempt.number;
            self.running.remove(&id);
            self.by_step.remove(&step);
            self.count_withdrawal(step, number);
            self.scheduler.withdrawn(step);
        } else if let Some(held) = &mut r.held {
            held.push(report);
            return;
        } else {
            self.handle(id, report);
        }
        self.settle(launcher);
    }

    /// Turns a report of a running (not ahead) attempt into events and its outcome.
    fn handle(&mut self, id: AttemptId, report: Report) {
        let Some(r) = self.running.get_mut(&id) else {
            return;
        };
        let started = matches!(report, Report::Started(_));
        let outcome = r.attempt.report(self.env, report);
        if started {
            self.scheduler.placed(r.attempt.step, r.attempt.origin());
        }
        let Some(outcome) = outcome else {
            return;
        };
        let step = r.attempt.step;
        self.running.remove(&id);
        self.by_step.remove(&step);
        match &mut self.interrupted {
            Some(interrupted) if outcome != StepOutcome::Succeeded => interrupted.push(step),
            _ => {
                self.scheduler.finished(step, outcome);
            }
        }
    }

    fn count_withdrawal(&mut self, step: usize, number: u32) {
        let entry = self.withdrawals.entry(step).or_insert((number, 0));
        if entry.0 != number {
            *entry = (number, 0);
        }
        entry.1 += 1;
    }

    /// Applies what the scheduler decided about ahead launches: those it withdrew are
    /// stopped, those it promoted get their held reports handled.
    fn settle<L: StepLauncher<Handle = H>>(&mut self, launcher: &mut L) {
        loop {
            let withdrawn = self.scheduler.take_withdrawn();
            let promoted = self.scheduler.take_promoted();
            if withdrawn.is_empty() && promoted.is_empty() {
                return;
            }
            let mut stop = Vec::new();
            for step in withdrawn {
                let Some(id) = self.by_step.remove(&step) else {
                    continue;
                };
                if let Some(r) = self.running.remove(&id) {
                    self.count_withdrawal(step, r.attempt.number);
                    self.withdrawing.insert(id, r.handle);
                    stop.push(id);
                }
            }
            if !stop.is_empty() {
                let handles: Vec<&H> = stop.iter().map(|id| &self.withdrawing[id]).collect();
                launcher.terminate(&handles, self.grace);
            }
            for step in promoted {
                let Some(&id) = self.by_step.get(&step) else {
                    continue;
                };
                let held = self
                    .running
                    .get_mut(&id)
                    .and_then(|r| r.held.take())
                    .unwrap_or_default();
                for report in held {
                    self.handle(id, report);
                }
            }
        }
    }

    /// Cancel: ask every running attempt to stop, wait for them (grace, then the
    /// launcher kills them), and mark the unfinished steps interrupted. An attempt that
    /// succeeded in time keeps its success; launches ahead are withdrawn.
    fn cancel<L: StepLauncher<Handle = H>>(&mut self, launcher: &mut L, rx: &Receiver<Notice>) {
        let grace = self.grace;
        let mut steps: Vec<&str> = self
            .running
            .values()
            .filter(|r| r.held.is_none())
            .map(|r| r.attempt.key())
            .collect();
        if !steps.is_empty() {
            steps.sort_unstable();
            self.env.events.emit(
                None,
                Level::Warning,
                format!(
                    "canceling: stopping {} running step(s), killing them after {:.1}s",
                    steps.len(),
                    grace.as_secs_f64()
                ),
                EventKind::EngineEvent {
                    details: json!({"steps": steps, "grace_secs": grace.as_secs_f64()}),
                },
            );
        }
        let handles: Vec<&H> = self
            .running
            .values()
            .map(|r| &r.handle)
            .chain(self.withdrawing.values())
            .collect();
        if !handles.is_empty() {
            launcher.terminate(&handles, grace);
        }
        self.interrupted = Some(Vec::new());
        let deadline = Instant::now() + grace + CANCEL_MARGIN;
        while !self.running.is_empty() || !self.withdrawing.is_empty() {
            let Ok(Notice::Attempt(id, report)) = rx.recv_deadline(deadline) else {
                break;
            };
            self.on_report(launcher, id, report);
        }
        // Anything still running could not be stopped; report it anyway.
        let mut interrupted = self.interrupted.take().unwrap_or_default();
        interrupted.extend(self.running.drain().map(|(_, r)| r.attempt.step));
        self.scheduler.cancel(&interrupted);
    }
}
