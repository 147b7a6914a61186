//! `isolation: warm` for the multiprocess executor: a [`StepLauncher`] that hands each
//! attempt to a warm step server ([`crate::execution::step_server`]) instead of
//! starting a process.
//!
//! There is one server per slot (`max_concurrent`), started when its slot first gets a
//! step, each driven by one thread of this process. A server's steps write their stdout
//! and stderr to one pair of pipes that it keeps (`run_on_kept_pipes`): the parent makes
//! them when it starts the server, hands their write ends over with the first request
//! and keeps the read ends (non-blocking); later requests carry no descriptors. For an
//! attempt, `launch` sends the invocation, and the slot's thread reads the server's
//! replies and both pipes with one `poll` loop, reporting `Started`, the lines, and
//! `Exited` exactly as the process launcher does (stderr also to
//! `<home>/logs/<run>/<step>.log`). The server replies `exited` only once everything the
//! step and its processes wrote is in the pipes, so the step's output ends when the
//! pipes are read empty after that reply (with its last line, even without a line end).
//! So the step's process, its pid, crash reports, cancellation (SIGTERM to its group,
//! SIGKILL after the grace, the registry for a second Ctrl-C) are those of `isolation:
//! process`; only the start is warm. A server is replaced after `max_steps_per_server`
//! steps or when its resident memory passes `max_server_rss_mb`, and restarted if it
//! dies (the step it ran is then reported as killed with it; its pipes go with it).

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};
use serde_json::json;

use super::multiprocess::{
    DRAIN_TIMEOUT, PARENT_PID_ENV, StepLog, registry, signal_group, signal_live,
};
use crate::execution::event::{ErrorInfo, Level};
use crate::execution::launcher::attempt::describe_exit;
use crate::execution::launcher::{
    Launch, LaunchError, Place, ProcessExit, Report, Reporter, StepLauncher,
};
use crate::execution::step_server::{IN_SERVER_ENV, ServerMessage, ServerRequest, send_with_fds};

/// When a server is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Recycle {
    /// After this many steps (0: never).
    pub(super) max_steps: u64,
    /// When its resident memory exceeds this many MB (0: never).
    pub(super) max_rss_mb: u64,
}

/// A running attempt, for [`StepLauncher::terminate`]: its process group once the
/// server has started it.
#[derive(Debug, Default)]
pub(super) struct StepHandle(Mutex<HandleState>);

#[derive(Debug, Default)]
struct HandleState {
    pid: Option<i32>,
    canceled: bool,
}

impl StepHandle {
    fn lock(&self) -> std::sync::MutexGuard<'_, HandleState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One attempt handed to a slot's thread. The request was already written to the
/// server by `launch` (so the server forks while the thread wakes up).
struct Job {
    launch: Launch,
    handle: Arc<StepHandle>,
    /// When the request was sent.
    sent: Instant,
    /// Why the request could not be sent (the server is then replaced).
    request: Result<(), String>,
    /// A server started for this attempt: the slot's previous one is gone.
    new_server: Option<Server>,
}

struct Slot {
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    /// This process's end of the current server's socket (a duplicate of the one the
    /// slot's thread reads); `None`: start a server with the next attempt.
    writer: Option<UnixStream>,
    /// Set by the slot's thread when it stopped its server (lost or recycled).
    stale: Arc<AtomicBool>,
}

/// Where a slot's thread finds its settings.
#[derive(Clone)]
struct SlotContext {
    program: PathBuf,
    log_dir: PathBuf,
    recycle: Recycle,
    /// `isolation: in_server`: the servers run each step themselves.
    in_server: bool,
}

/// Runs attempts on warm step servers, one per slot. See the module docs.
pub(super) struct WarmLauncher {
    context: SlotContext,
    slots: usize,
    servers: Vec<Slot>,
    idle_tx: Sender<usize>,
    idle_rx: Receiver<usize>,
}

impl WarmLauncher {
    pub(super) fn new(
        program: PathBuf,
        log_dir: PathBuf,
        slots: usize,
        recycle: Recycle,
        in_server: bool,
    ) -> Self {
        let (idle_tx, idle_rx) = unbounded();
        Self {
            context: SlotContext {
                program,
                log_dir,
                recycle,
                in_server,
            },
            slots: slots.max(1),
            servers: Vec::new(),
            idle_tx,
            idle_rx,
        }
    }

    fn free_slot(&mut self) -> Result<usize, LaunchError> {
        if let Ok(index) = self.idle_rx.try_recv() {
            return Ok(index);
        }
        if self.servers.len() >= self.slots {
            return Err(LaunchError::Engine(format!(
                "all {} warm step servers are busy; this is a bug in the run loop",
                self.slots
            )));
        }
        let index = self.servers.len();
        let (jobs, rx) = unbounded();
        let stale = Arc::new(AtomicBool::new(false));
        let (context, idle, flag) = (self.context.clone(), self.idle_tx.clone(), stale.clone());
        let thread = std::thread::Builder::new()
            .name(format!("step-server-{index}"))
            .spawn(move || serve_slot(index, &context, &rx, &idle, &flag))
            .map_err(|e| LaunchError::Engine(format!("cannot start a step server thread: {e}")))?;
        self.servers.push(Slot {
            jobs: Some(jobs),
            thread: Some(thread),
            writer: None,
            stale,
        });
        Ok(index)
    }
}

impl StepLauncher for WarmLauncher {
    type Handle = Arc<StepHandle>;

    fn launch(&mut self, launch: Launch) -> Result<Arc<StepHandle>, LaunchError> {
        if registry().closed {
            return Err(LaunchError::Step(crash(
                "cannot start a step: the process is shutting down".into(),
            )));
        }
        let index = self.free_slot()?;
        let handle = Arc::new(StepHandle::default());
        let (program, in_server) = (self.context.program.clone(), self.context.in_server);
        let slot = &mut self.servers[index];
        if slot.stale.swap(false, Ordering::AcqRel) {
            slot.writer = None;
        }
        let mut new_server = None;
        let mut handover = None;
        if slot.writer.is_none() {
            match Server::start(&program, in_server) {
                Ok((server, pipes)) => {
                    slot.writer = server.socket.try_clone().ok();
                    new_server = Some(server);
                    handover = Some(pipes);
                }
                Err(e) => {
                    let _ = self.idle_tx.send(index);
                    return Err(LaunchError::Step(crash(format!(
                        "cannot start a step server ({} step-server): {e}",
                        program.display()
                    ))));
                }
            }
        }
        let request = slot
            .writer
            .as_ref()
            .ok_or_else(|| "the step server's socket cannot be duplicated".to_string())
            .and_then(|writer| send_request(writer, &launch.invocation, handover));
        if request.is_err() {
            slot.writer = None;
        }
        let job = Job {
            launch,
            handle: handle.clone(),
            sent: Instant::now(),
            request,
            new_server,
        };
        let sent = slot
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(job).is_ok());
        if !sent {
            return Err(LaunchError::Engine(format!(
                "the thread of step server {index} is gone"
            )));
        }
        Ok(handle)
    }

    fn terminate(&mut self, handles: &[&Arc<StepHandle>], grace: Duration) {
        let handles: Vec<Arc<StepHandle>> = handles.iter().map(|&h| h.clone()).collect();
        for handle in &handles {
            let mut state = handle.lock();
            state.canceled = true;
            if let Some(pid) = state.pid {
                signal_live(&[pid], libc::SIGTERM);
            }
        }
        std::thread::spawn(move || {
            std::thread::sleep(grace);
            for handle in &handles {
                if let Some(pid) = handle.lock().pid {
                    signal_live(&[pid], libc::SIGKILL);
                }
            }
        });
    }
}

impl Drop for WarmLauncher {
    /// Stops every server (end of stream on its socket) and waits for them. A step
    /// still running (the run loop gave up on an engine error) loses its server, which
    /// takes it down (`PR_SET_PDEATHSIG`).
    fn drop(&mut self) {
        for slot in &mut self.servers {
            if let Some(writer) = slot.writer.take() {
                let _ = writer.shutdown(std::net::Shutdown::Both);
            }
            slot.jobs.take();
        }
        for slot in &mut self.servers {
            if let Some(thread) = slot.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// Sends `{"run_on_kept_pipes": invocation}`. `handover`, the write ends of a new
/// server's kept stdout and stderr, rides on its first request, and is closed here once
/// sent: from then on only the server (and the steps it runs) holds them.
fn send_request(
    writer: &UnixStream,
    invocation: &crate::execution::protocol::StepInvocation,
    handover: Option<[OwnedFd; 2]>,
) -> Result<(), String> {
    let mut line = serde_json::to_vec(&ServerRequest::RunOnKeptPipes(Box::new(invocation.clone())))
        .map_err(|e| e.to_string())?;
    line.push(b'\n');
    let fds: Vec<RawFd> = handover.iter().flatten().map(AsRawFd::as_raw_fd).collect();
    send_with_fds(writer, &line, &fds).map_err(|e| format!("cannot reach the step server: {e}"))
}

/// A slot's thread: follows its jobs one after another on its server, and stops the
/// server when it is lost or due for recycling (`stale` tells `launch`).
fn serve_slot(
    index: usize,
    context: &SlotContext,
    jobs: &Receiver<Job>,
    idle: &Sender<usize>,
    stale: &AtomicBool,
) {
    let mut server: Option<Server> = None;
    let free = |keep: bool| {
        if !keep {
            stale.store(true, Ordering::Release);
        }
        let _ = idle.send(index);
    };
    for mut job in jobs {
        if let Some(new) = job.new_server.take()
            && let Some(old) = server.replace(new)
        {
            old.stop();
        }
        let keep = match server.as_mut() {
            Some(s) => s.run(context, job, &free),
            None => {
                free(false);
                job.launch.reporter.send(Report::Failed(crash(
                    "the slot has no step server (this is a bug)".into(),
                )));
                false
            }
        };
        if !keep && let Some(done) = server.take() {
            done.stop();
        }
    }
    if let Some(s) = server {
        s.stop();
    }
}

/// One warm step server process, the parent's end of its socket, and the read ends of
/// the pipes it keeps for its steps' stdout and stderr.
struct Server {
    child: Child,
    socket: UnixStream,
    replies: Lines,
    /// The read ends (non-blocking) of the server's kept stdout and stderr pipes; their
    /// write ends went to the server with its first request.
    kept: [OwnedFd; 2],
    steps: u64,
    /// Its `/proc/<pid>/statm`, kept open for the memory check after every step.
    statm: Option<std::fs::File>,
}

impl Server {
    /// Starts `<program> step-server`; returns it and the write ends of the pipes it is
    /// to keep, for its first request.
    fn start(program: &Path, in_server: bool) -> std::io::Result<(Self, [OwnedFd; 2])> {
        let (kept, handover) = kept_pipes()?;
        let (ours, theirs) = UnixStream::pair()?;
        let mut command = Command::new(program);
        command
            .arg("step-server")
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0)
            .env(PARENT_PID_ENV, std::process::id().to_string());
        if in_server {
            command.env(IN_SERVER_ENV, "1");
        } else {
            command.env_remove(IN_SERVER_ENV);
        }
        let child = command.spawn()?;
        Ok((Self::new(child, ours, kept), handover))
    }

    /// The server `child`, on `socket`, whose steps write to the pipes read by `kept`.
    fn new(child: Child, socket: UnixStream, kept: [OwnedFd; 2]) -> Self {
        Self {
            child,
            socket,
            replies: Lines::default(),
            kept,
            steps: 0,
            statm: None,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Ends the server: end of stream on its socket, then a kill if it lingers.
    fn stop(mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// How it ended, once its socket closed.
    fn wait_lost(&mut self) -> ProcessExit {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => {
                    let _ = self.child.kill();
                    break self.child.wait().ok();
                }
            }
        };
        status.map_or_else(ProcessExit::default, |s| ProcessExit {
            code: s.code(),
            signal: s.signal(),
            core_dumped: s.core_dumped(),
            ..ProcessExit::default()
        })
    }

    fn due_for_recycling(&mut self, recycle: Recycle) -> Option<String> {
        if recycle.max_steps > 0 && self.steps >= recycle.max_steps {
            return Some(format!(
                "served {} steps (max_steps_per_server)",
                self.steps
            ));
        }
        if recycle.max_rss_mb > 0 {
            let pid = self.pid();
            if self.statm.is_none() {
                self.statm = std::fs::File::open(format!("/proc/{pid}/statm")).ok();
            }
            let rss = self.statm.as_ref().and_then(rss_mb);
            if rss.is_some_and(|mb| mb > recycle.max_rss_mb) {
                return Some(format!(
                    "uses {} MB of memory (max_server_rss_mb: {})",
                    rss.unwrap_or_default(),
                    recycle.max_rss_mb
                ));
            }
        }
        None
    }

    /// Follows one job on this server and reports it; `free(keep)` marks the slot free
    /// right before the last report. Returns whether the server can serve another step.
    fn run(&mut self, context: &SlotContext, job: Job, free: &dyn Fn(bool)) -> bool {
        let Job {
            launch,
            handle,
            sent,
            request,
            ..
        } = job;
        let Launch {
            invocation,
            reporter,
            ..
        } = launch;
        if handle.lock().canceled && request.is_err() {
            free(true);
            reporter.send(Report::Failed(ErrorInfo {
                message: format!("{} was canceled before it started", invocation.step_key),
                causes: vec![],
                kind: "error".into(),
                location: None,
            }));
            return true;
        }
        let (key, attempt) = (invocation.step_key.clone(), invocation.attempt);
        let log_path = context.log_dir.join(format!("{key}.log"));
        let mut step = StepRun {
            reporter: &reporter,
            handle: &handle,
            log_path,
            key: key.clone(),
            attempt,
            server: self.pid(),
            server_steps: self.steps,
            sent,
            pid: None,
            log: None,
            early: Vec::new(),
            exit: None,
            not_started: None,
            in_server: false,
            retire: false,
        };
        // The first request brought the pipes to keep.
        let first = self.steps == 0;
        let lost = match request.and_then(|()| self.follow(&mut step)) {
            Ok(lost) => lost,
            Err(e) => {
                step.not_started = Some(format!(
                    "cannot hand {key} to step server {}: {e}",
                    self.pid()
                ));
                true
            }
        };
        self.steps += 1;
        let recycle = if lost {
            None
        } else if step.retire {
            Some("retires: the step left threads running in it".to_string())
        } else if first && step.not_started.is_some() {
            // It may not have kept the pipes (a request it could not read): the next
            // step goes to a new server, which gets new ones.
            Some("did not start its first step".to_string())
        } else {
            self.due_for_recycling(context.recycle)
        };
        if let Some(why) = &recycle {
            reporter.send(Report::Note {
                level: Level::Debug,
                message: format!(
                    "step server {} {why}: a new one starts for the next step",
                    self.pid()
                ),
                details: json!({"server": self.pid(), "server_steps": self.steps, "recycled": true}),
            });
        }
        let lost_exit = lost.then(|| self.wait_lost());
        let how = lost_exit.as_ref().map(describe_exit);
        let keep = !lost && recycle.is_none();
        free(keep);
        match (step.exit.take(), step.not_started.take(), step.pid, how) {
            (Some(exit), _, _, _) => reporter.send(Report::Exited(exit)),
            (None, Some(message), _, _) => reporter.send(Report::Failed(crash(message))),
            (None, None, Some(pid), Some(_)) if step.in_server => {
                // The step ran in the server, so the server's end is the step's: a
                // crash is reported with its signal, as for a process of its own.
                signal_group(pid, libc::SIGKILL);
                registry().groups.remove(&pid);
                reporter.send(Report::Exited(lost_exit.unwrap_or_default()));
            }
            (None, None, Some(pid), how) => {
                // The server died under the step, whose process died with it
                // (PR_SET_PDEATHSIG); what its group left is killed here.
                signal_group(pid, libc::SIGKILL);
                registry().groups.remove(&pid);
                reporter.send(Report::Note {
                    level: Level::Error,
                    message: format!(
                        "step server {} {}; step process {pid} was killed with it; a new server starts for the next step",
                        self.pid(),
                        how.unwrap_or_default()
                    ),
                    details: json!({"server": self.pid(), "server_lost": true}),
                });
                reporter.send(Report::Exited(ProcessExit {
                    signal: Some(libc::SIGKILL),
                    ..ProcessExit::default()
                }));
            }
            (None, None, None, how) => reporter.send(Report::Failed(crash(format!(
                "step server {} {} before starting {key}",
                self.pid(),
                how.unwrap_or_else(|| "ended".into())
            )))),
        }
        keep
    }

    /// Reads the server's replies and the step's output on the kept pipes until the
    /// step is over: after the server's `exited` (or `not_started`), until the pipes are
    /// empty (everything the step wrote is in them before that reply); after the server
    /// was lost, until their end (their write ends die with the server and the step) or
    /// `DRAIN_TIMEOUT`. Returns whether the server was lost on the way.
    fn follow(&mut self, step: &mut StepRun<'_>) -> Result<bool, String> {
        // This step's partial lines: they end with the step.
        let mut streams = [Stream::default(), Stream::default()];
        let mut lost = false;
        let mut deadline: Option<Instant> = None;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if !lost && (step.exit.is_some() || step.not_started.is_some()) {
                for (i, s) in streams.iter_mut().enumerate() {
                    while s.read(&self.kept[i], &mut chunk, step, i == 1) {}
                }
                break;
            }
            if lost && streams.iter().all(|s| s.ended) {
                break;
            }
            if lost && deadline.is_none() {
                deadline = Some(Instant::now() + DRAIN_TIMEOUT);
            }
            let timeout = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    left.as_millis().min(i32::MAX as u128) as i32
                }
                None => -1,
            };
            let mut polled = Vec::with_capacity(3);
            if !lost {
                polled.push(pollfd(self.socket.as_raw_fd()));
            }
            for (s, fd) in streams.iter().zip(&self.kept) {
                if !s.ended {
                    polled.push(pollfd(fd.as_raw_fd()));
                }
            }
            // SAFETY: `polled` is a valid array of pollfd for the duration of the call.
            let n =
                unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll: {e}"));
            }
            let ready = |fd: i32| polled.iter().any(|p| p.fd == fd && p.revents != 0);
            // The server's replies first: `started` comes before the step's lines.
            if !lost && ready(self.socket.as_raw_fd()) {
                match (&self.socket).read(&mut chunk) {
                    Ok(0) | Err(_) => lost = true,
                    Ok(n) => {
                        for reply in self.replies.feed(&chunk[..n]) {
                            step.reply(&reply);
                        }
                    }
                }
            }
            for (i, s) in streams.iter_mut().enumerate() {
                if !s.ended && ready(self.kept[i].as_raw_fd()) {
                    s.read(&self.kept[i], &mut chunk, step, i == 1);
                }
            }
        }
        for (i, s) in streams.iter_mut().enumerate() {
            s.end(step, i == 1);
        }
        Ok(lost)
    }
}

/// One attempt on a server, while it runs.
struct StepRun<'a> {
    reporter: &'a Reporter,
    handle: &'a StepHandle,
    log_path: PathBuf,
    key: String,
    attempt: u32,
    server: u32,
    server_steps: u64,
    sent: Instant,
    pid: Option<i32>,
    log: Option<StepLog>,
    /// Lines that came before `started` was read.
    early: Vec<(bool, String)>,
    exit: Option<ProcessExit>,
    not_started: Option<String>,
    /// The step runs in the server process itself.
    in_server: bool,
    /// The server ends after this step.
    retire: bool,
}

impl StepRun<'_> {
    fn reply(&mut self, line: &str) {
        match serde_json::from_str::<ServerMessage>(line) {
            Ok(ServerMessage::Started {
                pid,
                forked,
                in_server,
            }) => {
                self.in_server = in_server;
                self.started(pid as i32, forked)
            }
            Ok(ServerMessage::Exited {
                pid,
                code,
                signal,
                core_dumped,
                retire,
            }) => {
                self.retire = retire;
                registry().groups.remove(&(pid as i32));
                self.exit = Some(ProcessExit {
                    code,
                    signal,
                    core_dumped,
                    ..ProcessExit::default()
                });
            }
            Ok(ServerMessage::NotStarted { message }) => self.not_started = Some(message),
            Err(e) => {
                self.not_started = Some(format!(
                    "step server {} sent a reply this binary cannot read ({e}): {line}",
                    self.server
                ))
            }
        }
    }

    fn started(&mut self, pid: i32, forked: bool) {
        let mut canceled = false;
        {
            let mut registry = registry();
            let mut state = self.handle.lock();
            state.pid = Some(pid);
            registry.groups.insert(pid);
            if registry.closed || state.canceled {
                // Canceled (or the process is going away) before it started.
                signal_group(pid, libc::SIGKILL);
                canceled = true;
            }
        }
        self.pid = Some(pid);
        self.log = Some(StepLog::open(&self.log_path, &self.key, self.attempt, pid));
        let mut details = json!({
            "spawn_us": self.sent.elapsed().as_micros() as u64,
            "isolation": if self.in_server { "in_server" } else { "warm" },
            "server": self.server,
            "server_steps": self.server_steps,
            "forked": forked,
        });
        if canceled {
            details["canceled"] = true.into();
        }
        self.reporter.send(Report::Started(Place {
            pid: pid as u32,
            worker: None,
            stderr_log: Some(self.log_path.clone()),
            details: details.as_object().cloned().unwrap_or_default(),
        }));
        for (stderr, line) in std::mem::take(&mut self.early) {
            self.output(stderr, line);
        }
    }

    fn output(&mut self, stderr: bool, line: String) {
        if self.pid.is_none() {
            self.early.push((stderr, line));
            return;
        }
        match (stderr, self.log.as_mut()) {
            (true, Some(log)) => log.line(self.reporter, &line),
            _ => self.reporter.send(Report::Stdout(line)),
        }
    }
}

/// What one step read from one of its server's kept pipes: its partial line, and
/// whether the pipe ended (only a lost server's pipes end).
#[derive(Default)]
struct Stream {
    lines: Lines,
    ended: bool,
}

impl Stream {
    /// Reads once from `fd` (non-blocking) and reports the complete lines as the step's
    /// stdout or `stderr`; false when there was nothing (more) to read.
    fn read(
        &mut self,
        fd: &OwnedFd,
        chunk: &mut [u8],
        step: &mut StepRun<'_>,
        stderr: bool,
    ) -> bool {
        // SAFETY: read(2) into our own buffer from a descriptor we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len()) };
        if n > 0 {
            for line in self.lines.feed(&chunk[..n as usize]) {
                step.output(stderr, line);
            }
            return true;
        }
        if n < 0 {
            match std::io::Error::last_os_error().kind() {
                std::io::ErrorKind::Interrupted => return true,
                std::io::ErrorKind::WouldBlock => return false,
                _ => {}
            }
        }
        self.ended = true;
        false
    }

    /// The step is over: its last line, if it had no line end, is reported with it.
    fn end(&mut self, step: &mut StepRun<'_>, stderr: bool) {
        for line in self.lines.rest() {
            step.output(stderr, line);
        }
    }
}

/// Splits bytes into lines (without their line ends; invalid UTF-8 replaced).
#[derive(Default)]
struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut lines = Vec::new();
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..end]);
            lines.push(text.trim_end_matches('\r').to_string());
        }
        lines
    }

    /// The last line, if it had no line end.
    fn rest(&mut self) -> Vec<String> {
        if self.buf.is_empty() {
            return Vec::new();
        }
        let text = String::from_utf8_lossy(&self.buf).into_owned();
        self.buf.clear();
        vec![text]
    }
}

/// A pair of pipes for a server to keep: the read ends (non-blocking, close-on-exec)
/// and the write ends (close-on-exec), each as (stdout, stderr).
fn kept_pipes() -> std::io::Result<([OwnedFd; 2], [OwnedFd; 2])> {
    let (out_r, out_w) = std::io::pipe()?;
    let (err_r, err_w) = std::io::pipe()?;
    let read = [OwnedFd::from(out_r), OwnedFd::from(err_r)];
    for fd in &read {
        // SAFETY: fcntl(2) on a descriptor we own.
        let ok = unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
        };
        if !ok {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((read, [OwnedFd::from(out_w), OwnedFd::from(err_w)]))
}

fn pollfd(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

fn crash(message: String) -> ErrorInfo {
    ErrorInfo {
        message,
        causes: vec![],
        kind: "crash".into(),
        location: None,
    }
}

/// Resident memory in MB of the process whose `/proc/<pid>/statm` is `statm` (read
/// again from its start on every call).
fn rss_mb(statm: &std::fs::File) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 256];
    let n = statm.read_at(&mut buf, 0).ok()?;
    let statm = std::str::from_utf8(&buf[..n]).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf(3) has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    Some(pages * page / (1024 * 1024))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    use crate::execution::launcher::{AttemptId, Notice};
    use crate::execution::protocol::{PROTOCOL_VERSION, StepInvocation};
    use crate::execution::step_server::recv_with_fds;

    /// What one step writes to its server's kept pipes.
    #[derive(Clone)]
    struct FakeStep {
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        /// Written, with both replies, before the parent starts to follow the step, on
        /// pipes grown to 1 MiB: the parent reads the `exited` reply with more than
        /// one read's worth of output still in the pipes.
        ahead: bool,
    }

    impl FakeStep {
        fn new(stdout: impl Into<Vec<u8>>, stderr: impl Into<Vec<u8>>) -> Self {
            Self {
                stdout: stdout.into(),
                stderr: stderr.into(),
                ahead: false,
            }
        }
    }

    /// Plays `<binary> step-server` on `socket` for `steps`, as the real one does with
    /// kept pipes: takes the pipes from the request that brings them, replies `started`,
    /// writes the step's output (blocking: a parent that does not read while the step
    /// runs never gets `exited`), then replies `exited`, and says so on `written`.
    /// Returns how many descriptors came with each request.
    fn fake_server(
        socket: UnixStream,
        steps: Vec<FakeStep>,
        pid: u32,
        written: Sender<()>,
    ) -> Vec<usize> {
        let reply = |message: &ServerMessage| {
            let mut line = serde_json::to_vec(message).unwrap();
            line.push(b'\n');
            (&socket).write_all(&line).unwrap();
        };
        let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 64 * 1024]);
        let mut kept: Option<Vec<std::fs::File>> = None;
        let mut descriptors = Vec::new();
        for step in steps {
            let mut fds = Vec::new();
            while !buf.contains(&b'\n') {
                let n = recv_with_fds(&socket, &mut chunk, &mut fds).unwrap();
                assert!(n > 0, "the parent closed the socket");
                buf.extend_from_slice(&chunk[..n]);
            }
            let end = buf.iter().position(|&b| b == b'\n').unwrap();
            let line: Vec<u8> = buf.drain(..=end).collect();
            let request: ServerRequest = serde_json::from_slice(&line).unwrap();
            assert!(matches!(request, ServerRequest::RunOnKeptPipes(_)));
            descriptors.push(fds.len());
            if !fds.is_empty() {
                kept = Some(fds.into_iter().map(std::fs::File::from).collect());
            }
            let pipes = kept.as_mut().expect("pipes came with the first request");
            if step.ahead {
                for pipe in pipes.iter() {
                    // SAFETY: fcntl(2) on a descriptor this thread owns.
                    let size =
                        unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
                    assert!(size >= 1 << 20, "{}", std::io::Error::last_os_error());
                }
            }
            reply(&ServerMessage::Started {
                pid,
                forked: true,
                in_server: false,
            });
            pipes[0].write_all(&step.stdout).unwrap();
            pipes[1].write_all(&step.stderr).unwrap();
            reply(&ServerMessage::Exited {
                pid,
                code: Some(0),
                signal: None,
                core_dumped: false,
                retire: false,
            });
            let _ = written.send(());
        }
        descriptors
    }

    fn invocation(key: &str) -> StepInvocation {
        StepInvocation {
            protocol: PROTOCOL_VERSION,
            run_id: "r".into(),
            pipeline: "p".into(),
            mode: "default".into(),
            step_key: key.into(),
            attempt: 1,
            run_config: json!({}),
            home: PathBuf::new(),
            input_runs: Default::default(),
        }
    }

    /// Runs `steps` one after another on one server (the fake above) as a slot's
    /// thread does; returns each step's reports and the descriptors of each request.
    fn run_on_one_server(steps: &[FakeStep], log_dir: &Path) -> (Vec<Vec<Report>>, Vec<usize>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let stand_in = Command::new("true").spawn().unwrap();
        let pid = stand_in.id();
        let (kept, handover) = kept_pipes().unwrap();
        let mut server = Server::new(stand_in, ours, kept);
        let (written_tx, written) = unbounded();
        let fake = {
            let steps = steps.to_vec();
            std::thread::spawn(move || fake_server(theirs, steps, pid, written_tx))
        };
        let context = SlotContext {
            program: PathBuf::from("unused"),
            log_dir: log_dir.to_path_buf(),
            recycle: Recycle {
                max_steps: 0,
                max_rss_mb: 0,
            },
            in_server: false,
        };
        let mut handover = Some(handover);
        let mut reports = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            let (tx, rx) = unbounded();
            let id = AttemptId(i as u64);
            let launch = Launch {
                id,
                step: i,
                invocation: invocation(&format!("step{i}.compute")),
                reporter: Reporter::new(id, tx),
                after: Vec::new(),
                withdrawn: 0,
            };
            let request = send_request(&server.socket, &launch.invocation, handover.take());
            if step.ahead {
                written.recv().unwrap();
            }
            let job = Job {
                launch,
                handle: Arc::default(),
                sent: Instant::now(),
                request,
                new_server: None,
            };
            assert!(server.run(&context, job, &|keep| assert!(keep)));
            if !step.ahead {
                written.recv().unwrap();
            }
            reports.push(
                rx.try_iter()
                    .map(|notice| match notice {
                        Notice::Attempt(_, report) => report,
                        Notice::EngineFailed(e) => panic!("engine failed: {e}"),
                    })
                    .collect(),
            );
        }
        server.stop();
        (reports, fake.join().unwrap())
    }

    /// Asserts that `got` are the lines of `written`, naming the first difference.
    fn same_lines(what: &str, got: &[String], written: &[u8]) {
        let want: Vec<String> = String::from_utf8_lossy(written)
            .lines()
            .map(String::from)
            .collect();
        let first = got.iter().zip(&want).position(|(g, w)| g != w);
        assert!(
            first.is_none() && got.len() == want.len(),
            "{what}: {} lines, {} written; first difference at {first:?}: {:?} for {:?}",
            got.len(),
            want.len(),
            first.map(|i| &got[i]),
            first.map(|i| &want[i]),
        );
    }

    /// One server's kept pipes carry the output of step after step: each step gets
    /// exactly its own lines (none leaks into the next, also when the `exited` reply is
    /// read before the step's output), a last line without a line end ends with its
    /// step, and a step that writes more than a pipe holds completes.
    #[test]
    fn kept_pipes_carry_each_steps_own_output() {
        let big = |tag: &str| -> String {
            (0..3000)
                .map(|i| format!("{tag} line {i:05} {}\n", "x".repeat(40)))
                .collect()
        };
        assert!(big("big").len() > 128 * 1024, "more than a pipe holds");
        let steps = vec![
            FakeStep::new("one out\n", "one err\n"),
            FakeStep::new(
                "two out\ntwo, no line end",
                "two err\ntwo's last stderr line, no line end",
            ),
            FakeStep::new(big("big"), "three err\n"),
            FakeStep {
                ahead: true,
                ..FakeStep::new(big("ahead"), big("ahead err"))
            },
            FakeStep::new("five out\n", "five err\n"),
        ];
        let tmp = tempfile::tempdir().unwrap();
        let (done_tx, done_rx) = unbounded();
        let (steps_run, log_dir) = (steps.clone(), tmp.path().to_path_buf());
        // On its own thread: a parent that stops reading would wait forever.
        std::thread::spawn(move || {
            let _ = done_tx.send(run_on_one_server(&steps_run, &log_dir));
        });
        let (reports, descriptors) = done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the steps on kept pipes ended within a minute");
        assert_eq!(
            descriptors,
            [2, 0, 0, 0, 0],
            "the pipes come with the first request only"
        );
        for (i, (step, reports)) in steps.iter().zip(&reports).enumerate() {
            assert!(
                matches!(reports.first(), Some(Report::Started(_))),
                "step {i} starts with Started"
            );
            assert!(
                matches!(reports.last(), Some(Report::Exited(e)) if e.code == Some(0)),
                "step {i} ends with Exited: {:?}",
                reports.last()
            );
            let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
            for report in &reports[1..reports.len() - 1] {
                match report {
                    Report::Stdout(line) => stdout.push(line.clone()),
                    Report::Stderr(line) => stderr.push(line.clone()),
                    other => panic!("step {i}: unexpected {other:?}"),
                }
            }
            same_lines(&format!("step {i}'s stdout"), &stdout, &step.stdout);
            same_lines(&format!("step {i}'s stderr"), &stderr, &step.stderr);
        }
        let log = std::fs::read_to_string(tmp.path().join("step1.compute.log")).unwrap();
        assert!(
            log.ends_with("two err\ntwo's last stderr line, no line end\n"),
            "{log}"
        );
    }

    #[test]
    fn lines_split_across_reads_and_keep_a_last_partial_line() {
        let mut lines = Lines::default();
        assert!(lines.feed(b"ab").is_empty());
        assert_eq!(lines.feed(b"c\r\nd\ne"), ["abc", "d"]);
        assert_eq!(lines.rest(), ["e"]);
        assert!(lines.rest().is_empty());
    }

    #[test]
    fn this_process_has_a_resident_size() {
        let statm = std::fs::File::open(format!("/proc/{}/statm", std::process::id())).unwrap();
        assert!(rss_mb(&statm).is_some_and(|mb| mb > 0));
        // Read again from the start, as after every step.
        assert!(rss_mb(&statm).is_some_and(|mb| mb > 0));
    }
}
