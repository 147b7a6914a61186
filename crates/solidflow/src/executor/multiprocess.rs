//! `multiprocess`: every step attempt in its own child process, via the step protocol.
//!
//! The child is this very binary started as `<binary> step` (see
//! [`protocol`](crate::execution::protocol) and `docs/step-protocol.md`): it reads one
//! [`StepInvocation`] on stdin and writes events as JSON lines on stdout, then a final
//! result. Values travel between steps through intermediate storage, so `in_memory`
//! storage is refused up front.
//!
//! Scheduling, retries, cancellation and turning the child's output into events are the
//! shared run loop ([`run_steps`]); this module is only the [`StepLauncher`] that
//! spawns processes:
//!
//! - **Streams.** One thread per child forwards its stdout lines to the loop; another
//!   appends each stderr line to `<home>/logs/<run_id>/<step_key>.log` and forwards it.
//! - **Containment.** When the child exits, leftover processes of its process group
//!   are killed, so no step outlives its attempt, and the exit status is reported (a
//!   child without a `result` line is a crash).
//! - **Cancellation.** Each child leads its own process group, so a terminal's Ctrl-C
//!   reaches only the parent. [`StepLauncher::terminate`] sends SIGTERM to the groups
//!   and SIGKILL after the grace period. Live groups are kept in a process-wide
//!   registry so a second Ctrl-C can kill them at once ([`kill_step_processes`]). On
//!   Linux step mode also sets `PR_SET_PDEATHSIG` when started with
//!   [`PARENT_PID_ENV`], so children die with a parent that is killed outright
//!   (`kill -9`).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use serde_json::{Value, json};

use super::in_process::effective_concurrency;
use super::local_config::{Isolation, MultiprocessConfig};
use super::warm::{Recycle, WarmLauncher};
use super::{ExecutionContext, Executor, ExecutorDefinition, ExecutorError};
use crate::config::json_schema::config_type_of;
use crate::execution::event::{EventKind, Level};
use crate::execution::launcher::{
    Launch, LaunchError, Place, ProcessExit, Report, Reporter, RunOptions, StepLauncher,
    check_reach, run_steps,
};
use crate::execution::scheduler::{Resources, check_resources};

pub use crate::execution::protocol::PARENT_PID_ENV;

/// How long canceled steps get between SIGTERM and SIGKILL by default.
pub(crate) const DEFAULT_GRACE: Duration = Duration::from_secs(2);

/// How long to wait for a child's output pipes to drain after it exited.
pub(super) const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs every step attempt in a child process of the pipeline's own binary.
#[derive(Debug, Clone)]
pub struct MultiprocessExecutor {
    max_concurrent: usize,
    resources: Option<Resources>,
    program: Option<PathBuf>,
    grace: Duration,
    isolation: Isolation,
    recycle: Recycle,
}

impl MultiprocessExecutor {
    /// An executor running up to `max_concurrent` step processes at once (0 = one per core).
    pub fn new(max_concurrent: usize) -> Self {
        Self {
            max_concurrent: effective_concurrency(max_concurrent),
            resources: None,
            program: None,
            grace: DEFAULT_GRACE,
            isolation: Isolation::Process,
            recycle: Recycle {
                max_steps: 0,
                max_rss_mb: MultiprocessConfig::default().max_server_rss_mb,
            },
        }
    }

    /// How steps are isolated: a new process per step (the default), or forked by a
    /// warm step server per slot (see `docs/config.md`).
    pub fn with_isolation(mut self, isolation: Isolation) -> Self {
        self.isolation = isolation;
        self
    }

    /// Warm isolation: replace a step server after `max_steps` steps (0: never) or once
    /// its resident memory exceeds `max_rss_mb` MB (0: no limit).
    pub fn with_server_recycling(mut self, max_steps: u64, max_rss_mb: u64) -> Self {
        self.recycle = Recycle {
            max_steps,
            max_rss_mb,
        };
        self
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
        config: config_type_of::<MultiprocessConfig>,
        build: |config: &Value| {
            let config = MultiprocessConfig::from_value(config)?;
            let mut executor = MultiprocessExecutor::new(config.max_concurrent as usize)
                .with_isolation(config.isolation)
                .with_server_recycling(config.max_steps_per_server, config.max_server_rss_mb);
            executor.resources = config.resources;
            Ok(Arc::new(executor))
        },
    }
}

// ---------------------------------------------------------------------------------------
// The registry of live step process groups.

pub(super) struct Registry {
    pub(super) groups: BTreeSet<i32>,
    /// Set by [`kill_step_processes`]: the process is going away, start nothing new.
    pub(super) closed: bool,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    groups: BTreeSet::new(),
    closed: false,
});

pub(super) fn registry() -> std::sync::MutexGuard<'static, Registry> {
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

pub(super) fn signal_group(pgid: i32, signal: i32) {
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
// The launcher.

/// Starts step attempts as child processes of `program`.
struct ProcessLauncher {
    program: PathBuf,
    log_dir: PathBuf,
}

impl StepLauncher for ProcessLauncher {
    /// The child's pid, also its process group id.
    type Handle = i32;

    fn launch(&mut self, launch: Launch) -> Result<i32, LaunchError> {
        self.spawn(launch).map_err(|e| {
            LaunchError::Step(crate::execution::event::ErrorInfo {
                message: format!(
                    "cannot start a step process ({} step): {e}",
                    self.program.display()
                ),
                causes: vec![],
                kind: "crash".into(),
                location: None,
            })
        })
    }

    fn terminate(&mut self, handles: &[&i32], grace: Duration) {
        let groups: Vec<i32> = handles.iter().map(|&&pid| pid).collect();
        signal_live(&groups, libc::SIGTERM);
        std::thread::spawn(move || {
            std::thread::sleep(grace);
            signal_live(&groups, libc::SIGKILL);
        });
    }
}

impl ProcessLauncher {
    fn spawn(&self, launch: Launch) -> std::io::Result<i32> {
        let Launch {
            invocation,
            reporter,
            ..
        } = launch;
        let (key, attempt) = (invocation.step_key.clone(), invocation.attempt);
        let input = serde_json::to_vec(&invocation).map_err(std::io::Error::other)?;
        let log_path = self.log_dir.join(format!("{key}.log"));
        let mut command = Command::new(&self.program);
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
        reporter.send(Report::Started(Place {
            pid: pid as u32,
            worker: None,
            stderr_log: Some(log_path.clone()),
            details: json!({"spawn_us": spawn_us})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        }));

        let mut stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (drained_tx, drained_rx) = bounded::<()>(2);
        let (out, out_done) = (reporter.clone(), drained_tx.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                out.send(Report::Stdout(line));
            }
            let _ = out_done.send(());
        });
        let err = reporter.clone();
        std::thread::spawn(move || {
            forward_stderr(stderr, &err, &log_path, &key, attempt, pid);
            let _ = drained_tx.send(());
        });
        std::thread::spawn(move || {
            // A child that dies before reading its invocation is reported as a crash.
            let _ = stdin.write_all(&input).and_then(|()| stdin.flush());
            drop(stdin);
            let exit = reap(&mut child, pid);
            // Lines come before the exit: wait (briefly) for both readers to finish.
            let deadline = Instant::now() + DRAIN_TIMEOUT;
            for _ in 0..2 {
                if drained_rx.recv_deadline(deadline).is_err() {
                    break;
                }
            }
            reporter.send(Report::Exited(exit));
        });
        Ok(pid)
    }
}

/// Waits for the child to exit, kills what is left of its process group, and reaps it.
fn reap(child: &mut Child, pid: i32) -> ProcessExit {
    wait_exited_no_reap(pid);
    {
        // Leftovers of the step (processes it started in its group) die with it; that
        // also closes the pipes they inherited so the readers finish.
        let mut registry = registry();
        signal_group(pid, libc::SIGKILL);
        registry.groups.remove(&pid);
    }
    match child.wait() {
        Ok(status) => ProcessExit {
            code: status.code(),
            signal: status.signal(),
            core_dumped: status.core_dumped(),
            ..ProcessExit::default()
        },
        Err(e) => ProcessExit {
            stderr_tail: vec![format!("the step process could not be waited for: {e}")],
            ..ProcessExit::default()
        },
    }
}

/// Appends a child's stderr to its log file and forwards every line.
fn forward_stderr(
    stderr: impl std::io::Read,
    reporter: &Reporter,
    log_path: &Path,
    key: &str,
    attempt: u32,
    pid: i32,
) {
    let mut log = StepLog::open(log_path, key, attempt, pid);
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        log.line(reporter, &String::from_utf8_lossy(&buf));
    }
}

/// A step's stderr log file, `<home>/logs/<run_id>/<step_key>.log`: each attempt's
/// lines are appended under a header naming the attempt and its pid. The file is
/// opened (created) with the attempt's first stderr line: a step that writes nothing to
/// stderr costs no file (creating one costs an inode, and on some filesystems that is
/// most of a warm step's time).
pub(super) struct StepLog {
    path: PathBuf,
    /// `None` until the first line; then the file, or `None` if it cannot be opened.
    file: Option<Option<File>>,
    header: String,
}

impl StepLog {
    /// The log of attempt `attempt` (process `pid`) of `key`, opened with its first line.
    pub(super) fn open(path: &Path, key: &str, attempt: u32, pid: i32) -> Self {
        Self {
            path: path.to_path_buf(),
            file: None,
            header: format!("--- {key} attempt {attempt} (pid {pid}) ---"),
        }
    }

    /// Keeps one stderr line (its line end is dropped) and reports it. A log that
    /// cannot be opened is skipped.
    pub(super) fn line(&mut self, reporter: &Reporter, line: &str) {
        let line = line.trim_end_matches(['\n', '\r']);
        let (path, header) = (&self.path, &self.header);
        let file = self.file.get_or_insert_with(|| {
            let mut file = File::options().create(true).append(true).open(path).ok()?;
            writeln!(file, "{header}").ok()?;
            Some(file)
        });
        if let Some(f) = file.as_mut() {
            let _ = writeln!(f, "{line}");
        }
        reporter.send(Report::Stderr(line.to_string()));
    }
}

/// Signals the groups that have not been reaped yet (a reaped pid may already belong
/// to someone else).
pub(super) fn signal_live(groups: &[i32], signal: i32) {
    let registry = registry();
    for pid in groups {
        if registry.groups.contains(pid) {
            signal_group(*pid, signal);
        }
    }
}

impl Executor for MultiprocessExecutor {
    fn check(&self, ctx: &ExecutionContext) -> Result<(), ExecutorError> {
        if self.isolation.is_warm() && !cfg!(target_os = "linux") {
            return Err(ExecutorError::Config(
                "execution.multiprocess.config.isolation: warm step servers need Linux; use `isolation: process`".into(),
            ));
        }
        check_reach(&ctx.env, "multiprocess", None).map_err(ExecutorError::Config)?;
        check_resources(&ctx.env.plan, self.resources.as_ref()).map_err(ExecutorError::Config)
    }

    fn execute(
        &self,
        ctx: &ExecutionContext,
    ) -> Result<crate::execution::scheduler::Summary, ExecutorError> {
        let env = &ctx.env;
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
        let isolation = self.isolation.name();
        env.events.emit(
            None,
            Level::Debug,
            format!("multiprocess executor: up to {slots} step processes of {} (isolation: {isolation}); step logs in {}", program.display(), log_dir.display()),
            EventKind::EngineEvent {
                details: json!({"max_concurrent": slots, "program": program, "log_dir": log_dir, "resources": self.resources, "isolation": isolation}),
            },
        );
        let options = RunOptions {
            max_running: Some(slots),
            resources: self.resources.clone(),
            grace: self.grace,
        };
        match self.isolation {
            Isolation::Process => {
                let mut launcher = ProcessLauncher { program, log_dir };
                run_steps(env, &ctx.cancel, &ctx.home, &mut launcher, options)
            }
            Isolation::Warm | Isolation::InServer => {
                let in_server = self.isolation == Isolation::InServer;
                let mut launcher =
                    WarmLauncher::new(program, log_dir, slots, self.recycle, in_server);
                run_steps(env, &ctx.cancel, &ctx.home, &mut launcher, options)
            }
        }
        .map_err(ExecutorError::Engine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
