//! `multiprocess`: every step attempt in its own child process, via the step protocol.
//!
//! The child is this very binary started as `<binary> step` (see
//! [`protocol`](crate::execution::protocol) and `docs/step-protocol.md`): it reads one
//! [`StepInvocation`] on stdin and writes events as JSON lines on stdout, then a final
//! result. Values travel between steps through intermediate storage, so `in_memory`
//! storage is refused up front.
//!
//! Scheduling (dependencies, `max_concurrent`, resources, retries, skips) is the shared
//! [`Scheduler`], exactly as for `in_process`. What this module adds:
//!
//! - **Live events.** One thread per child reads its stdout and forwards every event into
//!   the run's sink as it arrives; another turns each stderr line into a `LOG_MESSAGE`
//!   (`[stderr] ...`) and appends it to `<home>/logs/<run_id>/<step_key>.log`.
//! - **Containment.** A child that dies without reporting a result (abort, segfault,
//!   `kill -9`, the OOM killer) becomes a `STEP_FAILURE` of kind `crash` naming the exit
//!   status or signal. Leftover processes of a finished step (its process group) are
//!   killed, so no step outlives its attempt.
//! - **Cancellation.** Each child leads its own process group, so a terminal's Ctrl-C
//!   reaches only the parent. On cancel the parent sends SIGTERM to every group, SIGKILL
//!   after a grace period, and marks the running steps interrupted. Live groups are kept
//!   in a process-wide registry so a second Ctrl-C can kill them at once
//!   ([`kill_step_processes`]). On Linux step mode also sets `PR_SET_PDEATHSIG` when
//!   started with [`PARENT_PID_ENV`], so children die with a parent that is killed
//!   outright (`kill -9`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded, unbounded};
use serde_json::{Value, json};

use super::in_process::effective_concurrency;
use super::local_config::LocalConfig;
use super::{ExecutionContext, Executor, ExecutorDefinition, ExecutorError};
use crate::config::json_schema::config_type_of;
use crate::execution::event::{ErrorInfo, EventKind, Level};
use crate::execution::protocol::{PROTOCOL_VERSION, StepInvocation, StepMessage};
use crate::execution::scheduler::{Resources, Scheduler, Summary, check_resources};
use crate::storage::Reach;

/// Set on step processes to the parent's pid; step mode then dies with its parent.
pub const PARENT_PID_ENV: &str = "SOLIDFLOW_PARENT_PID";

/// How long canceled steps get between SIGTERM and SIGKILL by default.
pub(crate) const DEFAULT_GRACE: Duration = Duration::from_secs(2);

/// How many trailing stderr lines a crash report quotes.
const CRASH_TAIL_LINES: usize = 8;

/// How long to wait for a child's output pipes to drain after it exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs every step attempt in a child process of the pipeline's own binary.
#[derive(Debug, Clone)]
pub struct MultiprocessExecutor {
    max_concurrent: usize,
    resources: Option<Resources>,
    program: Option<PathBuf>,
    grace: Duration,
}

impl MultiprocessExecutor {
    /// An executor running up to `max_concurrent` step processes at once (0 = one per core).
    pub fn new(max_concurrent: usize) -> Self {
        Self {
            max_concurrent: effective_concurrency(max_concurrent),
            resources: None,
            program: None,
            grace: DEFAULT_GRACE,
        }
    }

    /// Declares the resources this machine has (`{GPU: 1}`); steps then wait for them.
    pub fn with_resources(mut self, resources: Resources) -> Self {
        self.resources = Some(resources);
        self
    }

    /// Runs steps with `program step` instead of the current executable. The program
    /// must serve the same repository (usually the same binary at another path).
    pub fn with_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = Some(program.into());
        self
    }

    /// How long canceled steps get between SIGTERM and SIGKILL (default 2 s).
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }
}

/// The `multiprocess` executor definition.
pub(crate) fn definition() -> ExecutorDefinition {
    ExecutorDefinition {
        name: "multiprocess",
        description: "Run every step in its own child process of this binary (needs filesystem or s3 storage).",
        config: config_type_of::<LocalConfig>,
        build: |config: &Value| {
            let config = LocalConfig::from_value("multiprocess", config)?;
            let mut executor = MultiprocessExecutor::new(config.max_concurrent as usize);
            executor.resources = config.resources;
            Ok(Arc::new(executor))
        },
    }
}

// ---------------------------------------------------------------------------------------
// The registry of live step process groups.

struct Registry {
    groups: BTreeSet<i32>,
    /// Set by [`kill_step_processes`]: the process is going away, start nothing new.
    closed: bool,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    groups: BTreeSet::new(),
    closed: false,
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends SIGKILL to the process group of every step process this process started and
/// has not reaped yet, and refuses to start new ones. Returns how many groups were
/// signaled. The CLI calls this on a second Ctrl-C, right before exiting.
pub fn kill_step_processes() -> usize {
    let mut registry = registry();
    registry.closed = true;
    for &pgid in &registry.groups {
        signal_group(pgid, libc::SIGKILL);
    }
    registry.groups.len()
}

fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory involved.
    // `pgid` is a child we have not reaped, so the group id cannot have been reused.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// Blocks until child `pid` has exited, without reaping it: the zombie keeps the pid
/// (and so the process group id) reserved while we clean up its group.
fn wait_exited_no_reap(pid: i32) {
    loop {
        // SAFETY: waitid(2) writes into the zeroed siginfo we own.
        let rc = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// One child.

/// How an attempt ended, as seen by the parent.
struct Finished {
    step: usize,
    outcome: Result<(), (ErrorInfo, Option<Option<Duration>>)>,
}

/// What the stdout reader saw.
#[derive(Default)]
struct Reported {
    result: Option<(bool, Option<ErrorInfo>, Option<Option<f64>>)>,
}

/// Describes an exit status for a crash report.
fn describe_exit(status: ExitStatus) -> String {
    if let Some(signal) = status.signal() {
        // SAFETY: strsignal returns a pointer to a static (or thread-local) C string.
        let name = unsafe {
            let p = libc::strsignal(signal);
            if p.is_null() {
                String::from("unknown signal")
            } else {
                std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        let core = if status.core_dumped() {
            ", core dumped"
        } else {
            ""
        };
        let hint = if signal == libc::SIGKILL {
            "; out of memory, or killed by another process"
        } else {
            ""
        };
        format!("was killed by signal {signal} ({name}{core}{hint})")
    } else {
        format!("exited with status {}", status.code().unwrap_or(-1))
    }
}

struct Launch<'a> {
    ctx: &'a ExecutionContext,
    program: &'a Path,
    log_dir: &'a Path,
    step: usize,
    attempt: u32,
}

impl MultiprocessExecutor {
    /// Starts one attempt of one step and a monitor thread that reports its end on
    /// `done`. Returns the child's pid (also its process group id).
    fn launch(&self, launch: Launch<'_>, done: Sender<Finished>) -> std::io::Result<i32> {
        let Launch {
            ctx,
            program,
            log_dir,
            step,
            attempt,
        } = launch;
        let env = &ctx.env;
        let key = env.plan.steps[step].key.clone();
        let invocation = StepInvocation {
            protocol: PROTOCOL_VERSION,
            run_id: env.run_id.clone(),
            pipeline: env.pipeline.name().to_string(),
            mode: env.config.mode.clone(),
            step_key: key.clone(),
            attempt,
            run_config: env.config.value.clone(),
            home: ctx.home.clone(),
            input_runs: env.plan.steps[step].input_runs(),
        };
        let input = serde_json::to_vec(&invocation).map_err(std::io::Error::other)?;
        let log_path = log_dir.join(format!("{key}.log"));

        let mut command = Command::new(program);
        command
            .arg("step")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // Step mode asks the kernel to kill the child if this process dies (see
        // `cli::step_mode`); doing it here with `pre_exec` would force fork+exec instead
        // of posix_spawn, which costs ~2 ms per step for a large parent.
        command.env(PARENT_PID_ENV, std::process::id().to_string());
        let spawn_started = Instant::now();
        let mut child = {
            // Hold the registry while spawning so a concurrent kill_step_processes()
            // either sees this child or prevents it.
            let mut registry = registry();
            if registry.closed {
                return Err(std::io::Error::other("the process is shutting down"));
            }
            let child = command.spawn()?;
            registry.groups.insert(child.id() as i32);
            child
        };
        let spawn_us = spawn_started.elapsed().as_micros() as u64;
        let pid = child.id() as i32;
        env.events.emit(
            Some(&key),
            Level::Debug,
            format!("started step process {pid} for {key} (attempt {attempt}); its stderr is kept in {}", log_path.display()),
            EventKind::EngineEvent {
                details: json!({"pid": pid, "attempt": attempt, "log_file": log_path, "spawn_us": spawn_us}),
            },
        );

        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (events, events2) = (env.events.clone(), env.events.clone());
        let (out_tx, out_rx) = bounded::<Reported>(1);
        let (err_tx, err_rx) = bounded::<VecDeque<String>>(1);
        let key2 = key.clone();
        std::thread::spawn(move || {
            let _ = out_tx.send(read_messages(stdout, &events, &key2));
        });
        let key3 = key.clone();
        let log_path2 = log_path.clone();
        std::thread::spawn(move || {
            let _ = err_tx.send(read_stderr(
                stderr, &events2, &key3, &log_path2, attempt, pid,
            ));
        });
        std::thread::spawn(move || {
            let mut stdin = stdin;
            // A child that dies before reading its invocation is reported as a crash below.
            let _ = stdin.write_all(&input).and_then(|()| stdin.flush());
            drop(stdin);
            let outcome = monitor(&mut child, pid, out_rx, err_rx, &key, &log_path);
            let _ = done.send(Finished { step, outcome });
        });
        Ok(pid)
    }
}

/// Waits for the child to exit, cleans up its process group, reaps it and turns what
/// it reported (or failed to report) into an outcome.
fn monitor(
    child: &mut Child,
    pid: i32,
    out_rx: Receiver<Reported>,
    err_rx: Receiver<VecDeque<String>>,
    key: &str,
    log_path: &Path,
) -> Result<(), (ErrorInfo, Option<Option<Duration>>)> {
    wait_exited_no_reap(pid);
    {
        // Leftovers of the step (processes it started in its group) die with it; that
        // also closes the pipes they inherited so the readers below finish.
        let mut registry = registry();
        signal_group(pid, libc::SIGKILL);
        registry.groups.remove(&pid);
    }
    let status = child.wait();
    let reported = out_rx.recv_timeout(DRAIN_TIMEOUT).unwrap_or_default();
    let tail = err_rx.recv_timeout(DRAIN_TIMEOUT).unwrap_or_default();
    match reported.result {
        Some((true, _, _)) => Ok(()),
        Some((false, error, retry)) => {
            let error = error.unwrap_or_else(|| ErrorInfo {
                message: format!("step process {pid} reported a failure without details"),
                causes: vec![],
                kind: "error".into(),
                location: None,
            });
            Err((
                error,
                retry.map(|d| d.map(|s| Duration::from_secs_f64(s.max(0.0)))),
            ))
        }
        None => {
            let how = match status {
                Ok(status) => describe_exit(status),
                Err(e) => format!("could not be waited for ({e})"),
            };
            let message = format!(
                "step process {pid} for {key} {how} without reporting a result; its stderr is in {}",
                log_path.display()
            );
            let error = ErrorInfo {
                message,
                causes: tail.into_iter().collect(),
                kind: "crash".into(),
                location: None,
            };
            Err((error, None))
        }
    }
}

/// Reads protocol messages from a child's stdout, forwarding events live.
fn read_messages(
    stdout: ChildStdout,
    events: &crate::execution::sink::EventSink,
    key: &str,
) -> Reported {
    let mut reported = Reported::default();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<StepMessage>(&line) {
            Ok(StepMessage::Event { event }) => events.forward(*event),
            Ok(StepMessage::Result {
                ok,
                error,
                retry_requested,
            }) => reported.result = Some((ok, error, retry_requested)),
            Err(e) => events.emit(
                Some(key),
                Level::Warning,
                format!("[stdout] {line}"),
                EventKind::EngineEvent {
                    details: json!({"stream": "stdout", "unparsed": e.to_string()}),
                },
            ),
        }
    }
    reported
}

/// Turns a child's stderr into `LOG_MESSAGE`s and the per-step log file; returns the
/// last lines for crash reports.
fn read_stderr(
    stderr: ChildStderr,
    events: &crate::execution::sink::EventSink,
    key: &str,
    log_path: &Path,
    attempt: u32,
    pid: i32,
) -> VecDeque<String> {
    let mut log = File::options()
        .create(true)
        .append(true)
        .open(log_path)
        .ok();
    let mut tail = VecDeque::with_capacity(CRASH_TAIL_LINES);
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    let mut header_written = false;
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\n', '\r']);
        if let Some(f) = log.as_mut() {
            if !header_written {
                let _ = writeln!(f, "--- {key} attempt {attempt} (pid {pid}) ---");
                header_written = true;
            }
            let _ = writeln!(f, "{line}");
        }
        events.emit(
            Some(key),
            Level::Info,
            format!("[stderr] {line}"),
            EventKind::LogMessage,
        );
        if tail.len() == CRASH_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.to_string());
    }
    tail
}

// ---------------------------------------------------------------------------------------
// The scheduling loop.

impl Executor for MultiprocessExecutor {
    fn check(&self, ctx: &ExecutionContext) -> Result<(), ExecutorError> {
        if ctx.env.storage.reach() == Reach::Process {
            return Err(ExecutorError::Config(format!(
                "the multiprocess executor runs every step in its own process, but `{}` storage lives inside one \
                 process, so steps could not see each other's outputs; choose `storage: {{filesystem: {{}}}}` \
                 (this machine) or `storage: {{s3: {{config: {{...}}}}}}`",
                ctx.env.storage.kind()
            )));
        }
        check_resources(&ctx.env.plan, self.resources.as_ref()).map_err(ExecutorError::Config)
    }

    fn execute(&self, ctx: &ExecutionContext) -> Result<Summary, ExecutorError> {
        let env = &ctx.env;
        let plan = env.plan.clone();
        let program = match &self.program {
            Some(p) => p.clone(),
            None => std::env::current_exe().map_err(|e| {
                ExecutorError::Engine(format!(
                    "cannot locate this binary to start step processes: {e}"
                ))
            })?,
        };
        let log_dir = ctx.home.join("logs").join(&env.run_id);
        std::fs::create_dir_all(&log_dir).map_err(|e| {
            ExecutorError::Engine(format!(
                "cannot create the step log directory {}: {e}",
                log_dir.display()
            ))
        })?;
        let slots = self.max_concurrent.max(1);
        env.events.emit(
            None,
            Level::Debug,
            format!("multiprocess executor: up to {slots} step processes of {}; step logs in {}", program.display(), log_dir.display()),
            EventKind::EngineEvent {
                details: json!({"max_concurrent": slots, "program": program, "log_dir": log_dir, "resources": self.resources}),
            },
        );
        let mut scheduler = Scheduler::new(&plan, env.events.clone(), self.resources.clone());
        let (done_tx, done_rx) = unbounded::<Finished>();
        // step -> pid of its running attempt
        let mut running: BTreeMap<usize, i32> = BTreeMap::new();
        let handle = |scheduler: &mut Scheduler, finished: Finished| match finished.outcome {
            Ok(()) => scheduler.succeeded(finished.step),
            Err((error, retry)) => {
                scheduler.failed(finished.step, error, retry);
            }
        };
        loop {
            if ctx.cancel.is_canceled() {
                self.cancel(ctx, &mut scheduler, &mut running, &done_rx);
                break;
            }
            while running.len() < slots {
                let Some((step, attempt)) = scheduler.next() else {
                    break;
                };
                let launch = Launch {
                    ctx,
                    program: &program,
                    log_dir: &log_dir,
                    step,
                    attempt,
                };
                match self.launch(launch, done_tx.clone()) {
                    Ok(pid) => {
                        running.insert(step, pid);
                    }
                    Err(e) => {
                        let message = format!(
                            "cannot start a step process ({} step): {e}",
                            program.display()
                        );
                        let error = ErrorInfo {
                            message,
                            causes: vec![],
                            kind: "crash".into(),
                            location: None,
                        };
                        scheduler.failed(step, error, None);
                    }
                }
            }
            if scheduler.is_finished() {
                break;
            }
            let timeout = scheduler
                .next_wakeup()
                .map_or(Duration::from_millis(50), |t| {
                    t.saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(50))
                });
            match done_rx.recv_timeout(timeout) {
                Ok(finished) => {
                    running.remove(&finished.step);
                    handle(&mut scheduler, finished);
                    while let Ok(finished) = done_rx.try_recv() {
                        running.remove(&finished.step);
                        handle(&mut scheduler, finished);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => unreachable!("the executor holds a sender"),
            }
        }
        Ok(scheduler.summary())
    }
}

impl MultiprocessExecutor {
    /// SIGTERM every running step's group, SIGKILL what is left after the grace period,
    /// wait for the monitors to reap them, and mark the unfinished steps interrupted.
    fn cancel(
        &self,
        ctx: &ExecutionContext,
        scheduler: &mut Scheduler,
        running: &mut BTreeMap<usize, i32>,
        done_rx: &Receiver<Finished>,
    ) {
        if !running.is_empty() {
            let pids: Vec<i32> = running.values().copied().collect();
            ctx.env.events.emit(
                None,
                Level::Warning,
                format!(
                    "canceling: sending SIGTERM to {} step process group(s), SIGKILL after {:.1}s",
                    pids.len(),
                    self.grace.as_secs_f64()
                ),
                EventKind::EngineEvent {
                    details: json!({"pids": pids, "grace_secs": self.grace.as_secs_f64()}),
                },
            );
        }
        signal_running(running, libc::SIGTERM);
        let mut interrupted = Vec::new();
        let mut collect = |deadline: Instant, running: &mut BTreeMap<usize, i32>| {
            while !running.is_empty() {
                let Ok(finished) = done_rx.recv_deadline(deadline) else {
                    break;
                };
                running.remove(&finished.step);
                match finished.outcome {
                    // Finished in time: keep the success.
                    Ok(()) => scheduler.succeeded(finished.step),
                    Err(_) => interrupted.push(finished.step),
                }
            }
        };
        collect(Instant::now() + self.grace, running);
        signal_running(running, libc::SIGKILL);
        collect(Instant::now() + Duration::from_secs(5), running);
        // Anything still running could not be killed (uninterruptible sleep); report it anyway.
        interrupted.extend(running.keys().copied());
        scheduler.cancel(&interrupted);
    }
}

/// Signals the groups of running steps that have not been reaped yet (a reaped pid may
/// already belong to someone else).
fn signal_running(running: &BTreeMap<usize, i32>, signal: i32) {
    let registry = registry();
    for pid in running.values() {
        if registry.groups.contains(pid) {
            signal_group(*pid, signal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_are_described_for_crash_reports() {
        // Raw wait statuses: low 7 bits = signal (0x80 = core dumped), else code << 8.
        assert_eq!(
            describe_exit(ExitStatus::from_raw(3 << 8)),
            "exited with status 3"
        );
        let killed = describe_exit(ExitStatus::from_raw(libc::SIGKILL));
        assert!(
            killed.starts_with("was killed by signal 9 (") && killed.contains("out of memory"),
            "{killed}"
        );
        let aborted = describe_exit(ExitStatus::from_raw(libc::SIGABRT | 0x80));
        assert!(
            aborted.starts_with("was killed by signal 6 (") && aborted.contains("core dumped"),
            "{aborted}"
        );
    }

    #[test]
    fn in_memory_storage_is_refused_and_resources_are_checked() {
        use crate::definition::pipeline::Pipeline;
        use crate::definition::solid::{Outputs, SolidDefinition};
        use crate::definition::types::TypeInfo;

        let gpu = SolidDefinition::new("gpu", |_, _| Ok(Outputs::result(1i64)))
            .output("result", TypeInfo::of::<i64>())
            .requires("GPU", 1.0);
        let pipeline = Pipeline::build("p", |p| p.add("gpu", gpu, vec![])).unwrap();
        let result = crate::execution::run::execute_pipeline(
            &pipeline,
            json!({"storage": {"in_memory": {}}, "execution": {"multiprocess": {}}}),
        );
        let message = result.err().expect("refused").to_string();
        assert!(
            message.contains("`in_memory` storage") && message.contains("filesystem"),
            "{message}"
        );

        let home = tempfile::tempdir().unwrap();
        let options = crate::execution::run::RunOptions {
            home: Some(home.path().into()),
            ..Default::default()
        };
        let config = json!({"storage": {"filesystem": {}}, "execution": {"multiprocess": {"config": {"resources": {"GPU": 0}}}}});
        let result = crate::execution::run::execute_pipeline_with(
            &pipeline,
            &crate::config::ConfigSources::from_value(config),
            options,
        );
        let message = result.err().expect("refused").to_string();
        assert!(message.contains("requires GPU=1"), "{message}");
    }
}
