//! `in_process`: the embedded default. Steps run on a pool of threads in this process.
//!
//! When only one step can run and nothing else is in flight (a chain), the step runs on
//! the scheduling thread itself, which saves two thread hand-offs per step.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, unbounded};
use serde_json::Value;

use super::local_config::LocalConfig;
use super::{ExecutionContext, Executor, ExecutorDefinition, ExecutorError};
use crate::config::json_schema::config_type_of;
use crate::execution::error::SolidError;
use crate::execution::scheduler::{Resources, Scheduler, StepOutcome, Summary, check_resources};
use crate::execution::step::StepEnvironment;
use crate::plan::ExecutionStep;

fn run_job(env: &StepEnvironment, (step, attempt, added): &Job) -> Result<(), SolidError> {
    match added {
        Some(s) => env.run(s, *attempt),
        None => env.run_step(*step, *attempt),
    }
}

/// Runs steps on up to `max_concurrent` threads of the current process.
#[derive(Debug, Clone)]
pub struct InProcessExecutor {
    max_concurrent: usize,
    resources: Option<Resources>,
}

impl InProcessExecutor {
    /// An executor running up to `max_concurrent` steps at once (0 = one per core).
    pub fn new(max_concurrent: usize) -> Self {
        Self {
            max_concurrent: effective_concurrency(max_concurrent),
            resources: None,
        }
    }

    /// Declares the resources this machine has (`{GPU: 1}`); steps then wait for them.
    pub fn with_resources(mut self, resources: Resources) -> Self {
        self.resources = Some(resources);
        self
    }
}

/// `0` means one per core.
pub(crate) fn effective_concurrency(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// The `in_process` executor definition.
pub(crate) fn definition() -> ExecutorDefinition {
    ExecutorDefinition {
        name: "in_process",
        description: "Run steps on threads of the current process (the embedded default).",
        config: config_type_of::<LocalConfig>,
        build: |config: &Value| {
            let config = LocalConfig::from_value("in_process", config)?;
            let mut executor = InProcessExecutor::new(config.max_concurrent as usize);
            executor.resources = config.resources;
            Ok(Arc::new(executor))
        },
    }
}

type Done = (usize, Result<(), SolidError>);

/// A step to run: its index, attempt, and the step itself when it was added while the
/// run goes (a step of a fan-out; plan steps are looked up by index).
type Job = (usize, u32, Option<Arc<ExecutionStep>>);

impl Executor for InProcessExecutor {
    fn in_process(&self) -> bool {
        true
    }

    fn check(&self, ctx: &ExecutionContext) -> Result<(), ExecutorError> {
        check_resources(&ctx.env.plan, self.resources.as_ref()).map_err(ExecutorError::Config)
    }

    fn execute(&self, ctx: &ExecutionContext) -> Result<Summary, ExecutorError> {
        let env = &ctx.env;
        let plan = env.plan.clone();
        let mut scheduler = Scheduler::new(&plan, env.events.clone(), self.resources.clone())
            .with_resolver(env.key_resolver());
        // A fan-out adds steps while the run goes: the plan's size does not bound them.
        let fans_out = plan.steps.iter().any(|s| s.is_template());
        let width = if fans_out {
            usize::MAX
        } else {
            plan.steps.len()
        };
        let threads = self.max_concurrent.min(width).max(1);
        let (job_tx, job_rx) = unbounded::<Job>();
        let (done_tx, done_rx) = unbounded::<Done>();
        // Workers are detached: on cancel the run returns without waiting for steps
        // that cannot be interrupted; the process exits right after.
        for _ in 0..threads {
            let (jobs, done, env) = (job_rx.clone(), done_tx.clone(), env.clone());
            std::thread::spawn(move || {
                for job in jobs {
                    let result = run_job(&env, &job);
                    if done.send((job.0, result)).is_err() {
                        break;
                    }
                }
            });
        }
        let mut in_flight: Vec<usize> = Vec::new();
        let handle = |scheduler: &mut Scheduler, (step, result): Done| {
            scheduler.finished(step, StepOutcome::of(result));
        };
        loop {
            if ctx.cancel.is_canceled() {
                scheduler.cancel(&in_flight);
                break;
            }
            while scheduler.running() < threads {
                let Some((step, attempt)) = scheduler.next() else {
                    break;
                };
                let job = (step, attempt, scheduler.added_step(step));
                if threads == 1 || (in_flight.is_empty() && !scheduler.has_ready()) {
                    let result = run_job(env, &job);
                    handle(&mut scheduler, (step, result));
                } else {
                    in_flight.push(step);
                    job_tx.send(job).expect("worker pool alive");
                }
            }
            if scheduler.is_finished() {
                break;
            }
            if in_flight.is_empty() && !scheduler.has_ready() {
                // Only delayed retries remain: sleep until the first is due (or cancel).
                let wait = scheduler.next_wakeup().map_or(Duration::ZERO, |t| {
                    t.saturating_duration_since(Instant::now())
                });
                std::thread::sleep(wait.min(Duration::from_millis(100)));
                continue;
            }
            let timeout = scheduler
                .next_wakeup()
                .map_or(Duration::from_millis(100), |t| {
                    t.saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(100))
                });
            match done_rx.recv_timeout(timeout) {
                Ok(done) => {
                    in_flight.retain(|&s| s != done.0);
                    handle(&mut scheduler, done);
                    while let Ok(done) = done_rx.try_recv() {
                        in_flight.retain(|&s| s != done.0);
                        handle(&mut scheduler, done);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(ExecutorError::Engine(
                        "in-process worker threads stopped unexpectedly".into(),
                    ));
                }
            }
        }
        Ok(scheduler.summary())
    }
}
