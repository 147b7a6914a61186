//! The step server's side (Linux): read a request, fork the step's process, supervise
//! it until it and everything it left are gone, report, repeat. See the parent module.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use libc::{c_int, pid_t};

use super::{ServerMessage, ServerRequest, here, recv_with_fds};
use crate::definition::repository::Repository;
use crate::execution::message_stream::background_threads;
use crate::execution::protocol::{StepInvocation, protocol_stdout, run_invocation};
use crate::execution::supervisor::{PARENT_GONE_EXIT, linux};

/// Serves step requests on stdin (a Unix stream socket) until it closes; returns the
/// exit status. `parent` is the pid that started the server (`SOLIDFLOW_PARENT_PID`):
/// the server dies with it.
pub fn serve(repository: &Repository, parent: Option<pid_t>) -> i32 {
    // SAFETY: the server is single-threaded here (it has only parsed its arguments).
    let (set, old) = unsafe { linux::become_supervisor() };
    // SAFETY: getppid(2) has no preconditions.
    if parent.is_some_and(|p| unsafe { libc::getppid() } != p) {
        eprintln!("error: the parent process is gone; the step server is not starting");
        return PARENT_GONE_EXIT;
    }
    let socket = match take_socket() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: the step server's stdin is not usable: {e}");
            return 3;
        }
    };
    let mut requests = Requests {
        socket: &socket,
        buf: Vec::new(),
        fds: Vec::new(),
    };
    let threads = Threads::open();
    // The pipes of `run_on_kept_pipes` requests, kept between steps.
    let mut kept: Option<[OwnedFd; 2]> = None;
    let mut stop = false;
    while !stop {
        let (line, fds) = match requests.next() {
            Ok(Some(request)) => request,
            Ok(None) => return 0,
            Err(e) => {
                eprintln!("error: the step server cannot read its requests: {e}");
                return 1;
            }
        };
        if stop_requested(&set) {
            return 0;
        }
        let message = match start(
            repository,
            &line,
            fds,
            socket.as_raw_fd(),
            &old,
            &threads,
            &mut kept,
        ) {
            Err(message) => ServerMessage::NotStarted { message },
            Ok(Start::Here(invocation, out, err)) => {
                // SAFETY: getpid(2) has no preconditions.
                let pid = unsafe { libc::getpid() };
                let started = ServerMessage::Started {
                    pid: pid as u32,
                    forked: false,
                    in_server: true,
                };
                if reply(&socket, &started).is_err() {
                    return 0;
                }
                let code = here::run(repository, *invocation, [out, err], &set, &old);
                // A step that left threads behind would leave them running under the
                // next steps: the server retires instead. (The message stream's
                // background flush is the server's own, kept between steps.)
                stop = threads.count() != Some(1 + background_threads());
                ServerMessage::Exited {
                    pid: pid as u32,
                    code: Some(code),
                    signal: None,
                    core_dumped: false,
                    retire: stop,
                }
            }
            Ok(Start::Process(pid, forked)) => {
                if reply(
                    &socket,
                    &ServerMessage::Started {
                        pid: pid as u32,
                        forked,
                        in_server: false,
                    },
                )
                .is_err()
                {
                    // The parent is gone: the step's results have no reader.
                    kill_step(pid);
                    return 0;
                }
                let status = if forked {
                    // Stop signals go to the step's group; the server stops after it.
                    linux::wait_runner(pid, &set, |sig| {
                        // SAFETY: the step's group; its leader is not reaped yet.
                        unsafe { libc::kill(-pid, sig) };
                        stop = true;
                    })
                } else {
                    wait_spawned(pid)
                };
                exited(pid, status)
            }
        };
        if reply(&socket, &message).is_err() {
            return 0;
        }
    }
    0
}

/// This server's thread count, from its `/proc/<pid>/stat` kept open: one `pread` per
/// step instead of listing `/proc/self/task`. (Only the server reads it: a forked child
/// would read the server's.)
struct Threads(Option<std::fs::File>);

impl Threads {
    fn open() -> Self {
        Self(std::fs::File::open(format!("/proc/{}/stat", std::process::id())).ok())
    }

    fn count(&self) -> Option<usize> {
        use std::os::unix::fs::FileExt;
        let Some(stat) = &self.0 else {
            return linux::threads();
        };
        let mut buf = [0u8; 2048];
        let n = stat.read_at(&mut buf, 0).ok()?;
        // The fields after the parenthesized command name start at field 3 (state);
        // field 20 is num_threads.
        let (_, rest) = std::str::from_utf8(&buf[..n]).ok()?.rsplit_once(") ")?;
        rest.split_whitespace().nth(17)?.parse().ok()
    }
}

/// Moves the socket off fd 0 (to a close-on-exec descriptor) and puts /dev/null there.
fn take_socket() -> std::io::Result<UnixStream> {
    // SAFETY: fcntl/dup2 on this process's own descriptors; the duplicate is owned by
    // the returned stream.
    unsafe {
        let fd = libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let socket = UnixStream::from_raw_fd(fd);
        let null = std::fs::File::open("/dev/null")?;
        libc::dup2(null.as_raw_fd(), 0);
        Ok(socket)
    }
}

/// The requests on the socket: one JSON line each, with the descriptors that came with it.
struct Requests<'a> {
    socket: &'a UnixStream,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Requests<'_> {
    fn next(&mut self) -> std::io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return Ok(Some((line, std::mem::take(&mut self.fds))));
            }
            let n = recv_with_fds(self.socket, &mut chunk, &mut self.fds)?;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn reply(mut socket: &UnixStream, message: &ServerMessage) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    line.push(b'\n');
    socket.write_all(&line)
}

/// Drains signals that arrived while idle; true if one asks the server to stop.
fn stop_requested(set: &libc::sigset_t) -> bool {
    let mut stop = false;
    loop {
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `set` is initialized; siginfo is written by the kernel.
        let sig = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::sigtimedwait(set, &mut info, &zero)
        };
        match sig {
            s if s <= 0 => return stop,
            libc::SIGCHLD => {}
            _ => stop = true,
        }
    }
}

/// How a request is served.
enum Start {
    /// A process of its own was started: `(pid, forked)`.
    Process(pid_t, bool),
    /// Run it in this process ([`IN_SERVER_ENV`](super::IN_SERVER_ENV)), with its stdout
    /// and stderr.
    Here(Box<StepInvocation>, OwnedFd, OwnedFd),
}

/// Parses the request and starts the step's process, or hands it back to run here.
fn start(
    repository: &Repository,
    line: &[u8],
    fds: Vec<OwnedFd>,
    socket: RawFd,
    old_mask: &libc::sigset_t,
    threads: &Threads,
    kept: &mut Option<[OwnedFd; 2]>,
) -> Result<Start, String> {
    let request: ServerRequest = serde_json::from_slice(line)
        .map_err(|e| format!("the step server got a request it cannot read: {e}"))?;
    let (invocation, [out, err]) = match request {
        ServerRequest::Run(invocation) => {
            let Ok(pipes) = <[OwnedFd; 2]>::try_from(fds) else {
                return Err(
                    "a step request must come with two descriptors (stdout, stderr)".into(),
                );
            };
            (invocation, pipes)
        }
        ServerRequest::RunOnKeptPipes(invocation) => {
            if !fds.is_empty() {
                let Ok(pipes) = <[OwnedFd; 2]>::try_from(fds) else {
                    return Err(
                        "a step request on kept pipes comes with two descriptors or none".into(),
                    );
                };
                *kept = Some(pipes);
            }
            let Some([out, err]) = kept.as_ref() else {
                return Err("a step request on kept pipes came before any pipes to keep".into());
            };
            let clone = |fd: &OwnedFd| {
                fd.try_clone()
                    .map_err(|e| format!("the step server cannot duplicate a kept pipe: {e}"))
            };
            (invocation, [clone(out)?, clone(err)?])
        }
    };
    // Build a lazily registered pipeline here, once, so every later step forks it built.
    let _ = repository.pipeline(&invocation.pipeline);
    if here::enabled() {
        Ok(Start::Here(invocation, out, err))
    } else if threads.count() == Some(1) {
        fork_step(repository, *invocation, out, err, socket, old_mask)
            .map(|pid| Start::Process(pid, true))
    } else {
        spawn_step(&invocation, out, err).map(|pid| Start::Process(pid, false))
    }
}

/// Forks the step's process: its own process group, the step's pipes as stdout and
/// stderr, dies with the server; then it runs the step like `<binary> step`.
fn fork_step(
    repository: &Repository,
    invocation: StepInvocation,
    out: OwnedFd,
    err: OwnedFd,
    socket: RawFd,
    old_mask: &libc::sigset_t,
) -> Result<pid_t, String> {
    // SAFETY: getpid/fork; the process is single-threaded (checked by the caller), so
    // the child may keep running Rust code. The child only changes its own attributes
    // and descriptors before running the step.
    unsafe {
        let server = libc::getpid();
        match libc::fork() {
            -1 => Err(format!(
                "the step server cannot fork: {}",
                std::io::Error::last_os_error()
            )),
            0 => {
                libc::setpgid(0, 0);
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                if libc::getppid() != server {
                    libc::_exit(PARENT_GONE_EXIT);
                }
                libc::dup2(out.as_raw_fd(), 1);
                libc::dup2(err.as_raw_fd(), 2);
                libc::close(socket);
                drop((out, err));
                libc::sigprocmask(libc::SIG_SETMASK, old_mask, std::ptr::null_mut());
                let code = match protocol_stdout() {
                    Ok(writer) => run_invocation(repository, invocation, writer),
                    Err(e) => {
                        eprintln!("error: cannot set up the event channel: {e}");
                        3
                    }
                };
                std::process::exit(code)
            }
            pid => {
                // Also here, so the group exists before the parent hears of the pid.
                libc::setpgid(pid, pid);
                Ok(pid)
            }
        }
    }
}

/// Starts `<binary> step` for a server that is no longer single-threaded.
fn spawn_step(invocation: &StepInvocation, out: OwnedFd, err: OwnedFd) -> Result<pid_t, String> {
    let program = std::env::current_exe()
        .map_err(|e| format!("the step server cannot locate its binary: {e}"))?;
    let input = serde_json::to_vec(invocation).map_err(|e| e.to_string())?;
    let mut child = Command::new(&program)
        .arg("step")
        .stdin(Stdio::piped())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0)
        .env(
            crate::execution::protocol::PARENT_PID_ENV,
            std::process::id().to_string(),
        )
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start a step process ({} step): {e}",
                program.display()
            )
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A child that dies before reading its invocation is reported by its exit.
        let _ = stdin.write_all(&input);
    }
    Ok(child.id() as pid_t)
}

/// Waits (blocking) for a spawned `<binary> step`, then kills what is left.
fn wait_spawned(pid: pid_t) -> c_int {
    let mut status = None;
    while status.is_none() {
        if !linux::reap(pid, &mut status, 0) {
            break;
        }
    }
    let mut rest = None;
    linux::kill_descendants(pid, &mut rest);
    status.unwrap_or(0)
}

/// SIGKILLs every descendant (the step's process and what it started), and reaps them.
fn kill_step(pid: pid_t) {
    let mut status = None;
    linux::kill_descendants(pid, &mut status);
}

fn exited(pid: pid_t, status: c_int) -> ServerMessage {
    let signaled = libc::WIFSIGNALED(status);
    ServerMessage::Exited {
        pid: pid as u32,
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        signal: signaled.then(|| libc::WTERMSIG(status)),
        core_dumped: signaled && libc::WCOREDUMP(status),
        retire: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_count_from_stat_is_that_of_proc_self_task() {
        let threads = Threads::open();
        // Other tests' threads come and go: agree on a reading taken while the count
        // stood still (the same before and after the listing).
        let agreed = (0..1000).any(|_| {
            let (a, listed, b) = (threads.count(), linux::threads(), threads.count());
            a.is_some() && a == listed && listed == b
        });
        assert!(
            agreed,
            "num_threads in /proc/<pid>/stat never matched /proc/self/task"
        );
    }
}
