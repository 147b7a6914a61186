//! The one run loop of every out-of-process executor: hands the scheduler's ready
//! attempts to a [`StepLauncher`], turns its reports into events and outcomes, waits
//! for retries to become due, and on cancel terminates what runs.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, unbounded};
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
    let (tx, rx) = unbounded::<Notice>();
    let mut running: HashMap<AttemptId, Running<L::Handle>> = HashMap::new();
    let mut next_id = 0u64;
    loop {
        if cancel.is_canceled() {
            terminate(
                env,
                &mut scheduler,
                launcher,
                &mut running,
                &rx,
                options.grace,
            );
            break;
        }
        let mut launches = Vec::new();
        let mut attempts = Vec::new();
        while options
            .max_running
            .is_none_or(|max| running.len() + launches.len() < max.max(1))
        {
            let Some((step, number)) = scheduler.next() else {
                break;
            };
            next_id += 1;
            let id = AttemptId(next_id);
            let planned = scheduler.step(step);
            launches.push(Launch {
                id,
                step: scheduler.plan_index(step),
                invocation: StepInvocation::for_attempt(env, home, planned, number),
                reporter: Reporter::new(id, tx.clone()),
            });
            attempts.push((id, Attempt::new(step, &planned.key, number)));
        }
        let mut failed_to_launch = false;
        if !launches.is_empty() {
            let results = launcher.launch_all(launches);
            for ((id, attempt), result) in attempts.into_iter().zip(results) {
                match result {
                    Ok(handle) => {
                        running.insert(id, Running { attempt, handle });
                    }
                    Err(LaunchError::Step(error)) => {
                        failed_to_launch = true;
                        scheduler.placed(attempt.step, None);
                        scheduler.finished(attempt.step, StepOutcome::Failed(error));
                    }
                    Err(LaunchError::Engine(message)) => return Err(message),
                }
            }
        }
        if scheduler.is_finished() {
            break;
        }
        if failed_to_launch {
            continue; // a slot is free again, or a retry is due
        }
        let timeout = scheduler.next_wakeup().map_or(POLL, |t| {
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
                Notice::Attempt(id, report) => {
                    let Some(r) = running.get_mut(&id) else {
                        continue;
                    };
                    let started = matches!(report, Report::Started(_));
                    let outcome = r.attempt.report(env, report);
                    if started {
                        scheduler.placed(r.attempt.step, r.attempt.origin());
                    }
                    if let Some(outcome) = outcome {
                        let step = r.attempt.step;
                        running.remove(&id);
                        scheduler.finished(step, outcome);
                    }
                }
                Notice::EngineFailed(message) => return Err(message),
            }
        }
        launcher.idle();
    }
    launcher.idle();
    Ok(scheduler.summary())
}

/// Cancel: ask every running attempt to stop, wait for them (grace, then the
/// launcher kills them), and mark the unfinished steps interrupted. An attempt that
/// succeeded in time keeps its success.
fn terminate<L: StepLauncher>(
    env: &StepEnvironment,
    scheduler: &mut Scheduler<'_>,
    launcher: &mut L,
    running: &mut HashMap<AttemptId, Running<L::Handle>>,
    rx: &Receiver<Notice>,
    grace: Duration,
) {
    if !running.is_empty() {
        let mut steps: Vec<&str> = running.values().map(|r| r.attempt.key()).collect();
        steps.sort_unstable();
        env.events.emit(
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
        let handles: Vec<&L::Handle> = running.values().map(|r| &r.handle).collect();
        launcher.terminate(&handles, grace);
    }
    let deadline = Instant::now() + grace + CANCEL_MARGIN;
    let mut interrupted = Vec::new();
    while !running.is_empty() {
        let Ok(Notice::Attempt(id, report)) = rx.recv_deadline(deadline) else {
            break;
        };
        let Some(r) = running.get_mut(&id) else {
            continue;
        };
        if let Some(outcome) = r.attempt.report(env, report) {
            let step = r.attempt.step;
            running.remove(&id);
            match outcome {
                StepOutcome::Succeeded => {
                    scheduler.finished(step, outcome);
                }
                _ => interrupted.push(step),
            }
        }
    }
    // Anything still running could not be stopped; report it anyway.
    interrupted.extend(running.drain().map(|(_, r)| r.attempt.step));
    scheduler.cancel(&interrupted);
}
