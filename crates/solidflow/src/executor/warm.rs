//! `isolation: warm` for the multiprocess executor: a [`StepLauncher`] that hands each
//! attempt to a warm step server ([`crate::execution::step_server`]) instead of
//! starting a process.
//!
//! There is one server per slot (`max_concurrent`), started when its slot first gets a
//! step, each driven by one thread of this process. For an attempt the thread makes two
//! pipes (the step's stdout and stderr), sends the invocation with their write ends to
//! its server, and reads the server's replies and both pipes with one `poll` loop,
//! reporting `Started`, the lines, and `Exited` exactly as the process launcher does
//! (stderr also to `<home>/logs/<run>/<step>.log`). So the step's process, its pid,
//! crash reports, cancellation (SIGTERM to its group, SIGKILL after the grace, the
//! registry for a second Ctrl-C) are those of `isolation: process`; only the start is
//! warm. A server is replaced after `max_steps_per_server` steps or when its resident
//! memory passes `max_server_rss_mb`, and restarted if it dies (the step it ran is then
//! reported as killed with it).

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
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
    /// The read ends of the step's stdout and stderr, or why the request could not be
    /// sent (the server is then replaced).
    pipes: Result<[OwnedFd; 2], String>,
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
        if slot.writer.is_none() {
            match Server::start(&program, in_server) {
                Ok(server) => {
                    slot.writer = server.socket.try_clone().ok();
                    new_server = Some(server);
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
        let pipes = slot
            .writer
            .as_ref()
            .ok_or_else(|| "the step server's socket cannot be duplicated".to_string())
            .and_then(|writer| send_request(writer, &launch.invocation));
        if pipes.is_err() {
            slot.writer = None;
        }
        let job = Job {
            launch,
            handle: handle.clone(),
            sent: Instant::now(),
            pipes,
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

/// Sends `{"run": invocation}` with two new pipes' write ends; returns the read ends.
fn send_request(
    writer: &UnixStream,
    invocation: &crate::execution::protocol::StepInvocation,
) -> Result<[OwnedFd; 2], String> {
    let (out_r, out_w) = std::io::pipe().map_err(|e| format!("cannot make a pipe: {e}"))?;
    let (err_r, err_w) = std::io::pipe().map_err(|e| format!("cannot make a pipe: {e}"))?;
    let mut line = serde_json::to_vec(&ServerRequest::Run(Box::new(invocation.clone())))
        .map_err(|e| e.to_string())?;
    line.push(b'\n');
    send_with_fds(writer, &line, &[out_w.as_raw_fd(), err_w.as_raw_fd()])
        .map_err(|e| format!("cannot reach the step server: {e}"))?;
    Ok([OwnedFd::from(out_r), OwnedFd::from(err_r)])
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

/// One warm step server process and the parent's end of its socket.
struct Server {
    child: Child,
    socket: UnixStream,
    replies: Lines,
    steps: u64,
    /// Its `/proc/<pid>/statm`, kept open for the memory check after every step.
    statm: Option<std::fs::File>,
}

impl Server {
    fn start(program: &Path, in_server: bool) -> std::io::Result<Self> {
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
        Ok(Self {
            child,
            socket: ours,
            replies: Lines::default(),
            steps: 0,
            statm: None,
        })
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
            pipes,
            ..
        } = job;
        let Launch {
            invocation,
            reporter,
            ..
        } = launch;
        if handle.lock().canceled && pipes.is_err() {
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
        let lost = match pipes.and_then(|p| self.follow(p, &mut step)) {
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

    /// Reads the server's replies and the step's output until the step is over.
    /// Returns whether the server was lost on the way.
    fn follow(&mut self, pipes: [OwnedFd; 2], step: &mut StepRun<'_>) -> Result<bool, String> {
        let [out_r, err_r] = pipes;
        let mut streams = [Stream::new(out_r), Stream::new(err_r)];
        let mut socket_open = true;
        let mut lost = false;
        let mut deadline: Option<Instant> = None;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let done = step.exit.is_some() || step.not_started.is_some() || lost;
            if done && streams.iter().all(|s| s.fd.is_none()) {
                break;
            }
            if done && deadline.is_none() {
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
            if socket_open && !done {
                polled.push(pollfd(self.socket.as_raw_fd()));
            }
            for s in &streams {
                if let Some(fd) = &s.fd {
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
            if socket_open && !done && ready(self.socket.as_raw_fd()) {
                match (&self.socket).read(&mut chunk) {
                    Ok(0) | Err(_) => {
                        socket_open = false;
                        lost = true;
                    }
                    Ok(n) => {
                        for reply in self.replies.feed(&chunk[..n]) {
                            step.reply(&reply);
                        }
                    }
                }
            }
            for (i, s) in streams.iter_mut().enumerate() {
                let Some(fd) = s.fd.as_ref().map(AsRawFd::as_raw_fd) else {
                    continue;
                };
                if !ready(fd) {
                    continue;
                }
                // SAFETY: read(2) into our own buffer from a descriptor we own.
                let n = unsafe { libc::read(fd, chunk.as_mut_ptr().cast(), chunk.len()) };
                let lines = if n > 0 {
                    s.lines.feed(&chunk[..n as usize])
                } else if n == 0
                    || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                {
                    s.fd = None;
                    s.lines.rest()
                } else {
                    continue;
                };
                for line in lines {
                    step.output(i == 1, line);
                }
            }
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

/// One of the step's output pipes and its partial line.
struct Stream {
    fd: Option<OwnedFd>,
    lines: Lines,
}

impl Stream {
    fn new(fd: OwnedFd) -> Self {
        Self {
            fd: Some(fd),
            lines: Lines::default(),
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
