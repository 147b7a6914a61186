//! The step-launcher seam: where a step attempt runs, apart from everything else.
//!
//! An out-of-process executor (multiprocess, Dask, later a warm step server or a batch
//! system) implements [`StepLauncher`]: it starts a [`Launch`] somewhere and reports
//! what the step process does through the launch's [`Reporter`], and it terminates a
//! set of running attempts with a grace period. Everything else is written once, in
//! [`run_steps`]: the `Scheduler` (dependencies, retries with their delays, skips,
//! local resource limits), the number of attempts in flight, waiting, cancellation,
//! and the translation of what a step process reported into events and a
//! `StepOutcome` (the step protocol's stdout parsed, stderr turned into log
//! messages, a crash described; see [`attempt`]). [`check_reach`] refuses storage
//! the step processes cannot see.
//!
//! Adding an executor is one module implementing the trait plus one registration line
//! (an [`ExecutorDefinition`](crate::executor::ExecutorDefinition)).
//!
//! The loop hands out work one attempt at a time from `Scheduler::next`, keyed by
//! [`AttemptId`], never by a fixed list of steps, so a scheduler that grows while the
//! run goes (dynamic fan-out) needs no new loop; a launcher that keeps processes warm
//! only changes what `launch` does.

pub mod attempt;
mod run_loop;

pub use self::run_loop::{RunOptions, run_steps};

use std::path::PathBuf;
use std::time::Duration;

use crossbeam_channel::Sender;
use serde_json::Value;

use super::event::{ErrorInfo, Level};
use super::protocol::StepInvocation;
use super::step::StepEnvironment;
use crate::storage::Reach;

/// Identifies one launched attempt within a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttemptId(pub u64);

/// One step attempt to start.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The attempt, for [`Reporter`] messages.
    pub id: AttemptId,
    /// The step's index in the plan; for a step of a fan-out (added while the run
    /// goes), the index of its template, whose resources and tags it has. Its own key
    /// is `invocation.step_key`.
    pub step: usize,
    /// What to feed `<binary> step` on stdin.
    pub invocation: StepInvocation,
    /// Where to report what the step process does.
    pub reporter: Reporter,
    /// Launched ahead (only by a launcher whose [`StepLauncher::launches_ahead`]): the
    /// running attempts, launched by this launcher, that this one must wait for. It
    /// starts once they all ended, and only if they all succeeded; otherwise the
    /// launcher reports [`Report::Withdrawn`] without starting it.
    pub after: Vec<AttemptId>,
    /// How many earlier launches of this same attempt were withdrawn (a launcher whose
    /// names must be unique per launch counts them in).
    pub withdrawn: u32,
}

/// Where a step process runs, for its events and crash reports.
#[derive(Debug, Clone, Default)]
pub struct Place {
    /// The step process's pid.
    pub pid: u32,
    /// The remote worker (e.g. a Dask worker address); `None` for this machine.
    pub worker: Option<String>,
    /// The file on this machine that keeps the step's stderr, if any.
    pub stderr_log: Option<PathBuf>,
    /// Launcher-specific details for the "started" `ENGINE_EVENT`.
    pub details: serde_json::Map<String, Value>,
}

/// How a step process ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessExit {
    /// Exit status, when it exited.
    pub code: Option<i32>,
    /// The signal that killed it.
    pub signal: Option<i32>,
    /// Whether it dumped core.
    pub core_dumped: bool,
    /// The last stderr lines, when the launcher has them and they did not arrive as
    /// [`Report::Stderr`] lines.
    pub stderr_tail: Vec<String>,
    /// What to do when the binary could not be run there (exit 126/127).
    pub not_runnable_hint: Option<String>,
}

/// What a launcher reports about one attempt, in order: `Started`, then lines and
/// notes, then exactly one of `Exited` or `Failed`.
#[derive(Debug, Clone)]
pub enum Report {
    /// The step process started (again, if the transport re-ran it elsewhere).
    Started(Place),
    /// One line of the step's stdout: a step protocol message.
    Stdout(String),
    /// One line of the step's stderr.
    Stderr(String),
    /// Something the transport wants on record for this attempt (an `ENGINE_EVENT`).
    Note {
        /// Severity.
        level: Level,
        /// The message.
        message: String,
        /// Details.
        details: Value,
    },
    /// The step process ended; its `result` line (or its absence) decides the outcome.
    Exited(ProcessExit),
    /// The attempt ended without a process result (could not start, worker lost,
    /// canceled); the error says why.
    Failed(ErrorInfo),
    /// A launch ahead ([`Launch::after`]) did not start because an attempt it waited
    /// for did not succeed: the step goes back to the scheduler as not launched.
    Withdrawn,
}

impl Report {
    /// Whether this is the last report of its attempt.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Exited(_) | Self::Failed(_) | Self::Withdrawn)
    }
}

/// What reaches the run loop.
#[derive(Debug)]
pub(crate) enum Notice {
    Attempt(AttemptId, Report),
    EngineFailed(String),
}

/// The channel a launcher reports on, bound to one attempt. Cheap to clone; reports
/// may come from any thread.
#[derive(Debug, Clone)]
pub struct Reporter {
    id: AttemptId,
    tx: Sender<Notice>,
}

impl Reporter {
    pub(crate) fn new(id: AttemptId, tx: Sender<Notice>) -> Self {
        Self { id, tx }
    }

    /// Reports about this attempt.
    pub fn send(&self, report: Report) {
        let _ = self.tx.send(Notice::Attempt(self.id, report));
    }

    /// Reports that the launcher's machinery failed (a bridge died): the run stops
    /// with this error.
    pub fn engine_failed(&self, message: String) {
        let _ = self.tx.send(Notice::EngineFailed(message));
    }
}

/// Why a launch did not start.
#[derive(Debug)]
pub enum LaunchError {
    /// This attempt failed to start (a `STEP_FAILURE`; the retry policy applies).
    Step(ErrorInfo),
    /// The launcher itself is broken: the run stops.
    Engine(String),
}

/// Where step attempts run. See the module docs.
pub trait StepLauncher {
    /// A running attempt, as the launcher needs it to terminate it.
    type Handle;

    /// Starts one attempt and reports on `launch.reporter`.
    fn launch(&mut self, launch: Launch) -> Result<Self::Handle, LaunchError>;

    /// Starts several attempts that became ready together (a launcher with a round
    /// trip per launch overrides this to batch them). One result per launch, in order.
    fn launch_all(&mut self, launches: Vec<Launch>) -> Vec<Result<Self::Handle, LaunchError>> {
        launches.into_iter().map(|l| self.launch(l)).collect()
    }

    /// Asks running attempts to stop (SIGTERM), and kills what is left after `grace`.
    /// Returns at once; each attempt still reports how it ended.
    fn terminate(&mut self, handles: &[&Self::Handle], grace: Duration);

    /// Called after each batch of reports was handled and before the loop waits.
    fn idle(&mut self) {}

    /// Whether this launcher can launch a step ahead of the attempts it waits for
    /// ([`Launch::after`]): its cluster starts it when they ended, where their
    /// results are, and withdraws it when one did not succeed. Saves the round trip
    /// through the parent per dependency (a chain on Dask). Local launchers have no
    /// ordering of their own and keep the default, `false`.
    fn launches_ahead(&self) -> bool {
        false
    }
}

/// Refuses storage that step processes of `executor` cannot reach: `Process` storage
/// (`in_memory`) always, and storage on this machine's disk when `remote` names the
/// other machines steps run on.
pub fn check_reach(
    env: &StepEnvironment,
    executor: &str,
    remote: Option<&str>,
) -> Result<(), String> {
    let storage = &env.storage;
    match storage.reach() {
        Reach::Process => Err(format!(
            "the {executor} executor runs every step in its own process, but `{}` storage lives inside one \
             process, so steps could not see each other's outputs; choose `storage: {{filesystem: {{}}}}` \
             (this machine) or `storage: {{s3: {{config: {{...}}}}}}`",
            storage.kind()
        )),
        Reach::Machine if remote.is_some() => Err(format!(
            "`{}` storage on this machine's disk cannot be read by {} on other machines; use \
             `storage: {{s3: {{config: {{...}}}}}}`, or, if base_dir is a shared mount (NFS) at the same path on every \
             worker, declare it with `storage: {{filesystem: {{config: {{base_dir: ..., shared: true}}}}}}`",
            storage.kind(),
            remote.unwrap_or_default()
        )),
        _ => Ok(()),
    }
}
