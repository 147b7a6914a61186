//! Running a step inside the step server itself, without a fork (`isolation:
//! in_server`, [`IN_SERVER_ENV`]; see the parent module): the step's stdout and stderr
//! are put on fds 1 and 2 for the step and put back after it; the stop signals are
//! unblocked for it, so SIGTERM, SIGINT, SIGQUIT and the parent's death (SIGHUP) end
//! the server, and with it the step, as they end a step process; their dispositions
//! are reset after it; and what the step started is killed when it returns. The
//! server retires after a step that left threads running (see `server.rs`).

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::definition::repository::Repository;
use crate::execution::protocol::{StepInvocation, protocol_stdout, run_invocation};
use crate::execution::step_server::IN_SERVER_ENV;
use crate::execution::supervisor::linux;

/// Whether this server runs steps itself.
pub(super) fn enabled() -> bool {
    std::env::var_os(IN_SERVER_ENV).is_some_and(|v| v == "1")
}

/// Runs the step here with `pipes` (its stdout and stderr) as fds 1 and 2; returns
/// its exit status. `set` is the server's blocked set, `old` the mask a step runs with.
pub(super) fn run(
    repository: &Repository,
    invocation: StepInvocation,
    pipes: [OwnedFd; 2],
    set: &libc::sigset_t,
    old: &libc::sigset_t,
) -> i32 {
    let [out, err] = pipes;
    // SAFETY: fcntl/dup2/sigprocmask on this process's own descriptors and mask; the
    // server is single-threaded between steps.
    let saved_err = unsafe {
        let saved = libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3);
        libc::dup2(out.as_raw_fd(), 1);
        libc::dup2(err.as_raw_fd(), 2);
        libc::sigprocmask(libc::SIG_SETMASK, old, std::ptr::null_mut());
        saved
    };
    drop((out, err));
    let code = match protocol_stdout() {
        Ok(writer) => run_invocation(repository, invocation, writer),
        Err(e) => {
            eprintln!("error: cannot set up the event channel: {e}");
            3
        }
    };
    // What the solid printed and left in std's buffers belongs to this step.
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: as above; `saved_err` is ours and closed once. A solid that ignored a
    // stop signal must not make the server ignore it for the next steps.
    unsafe {
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT, libc::SIGHUP] {
            libc::signal(sig, libc::SIG_DFL);
        }
        libc::sigprocmask(libc::SIG_BLOCK, set, std::ptr::null_mut());
        if let Some(null) = dev_null() {
            libc::dup2(null.as_raw_fd(), 1);
        }
        if saved_err >= 0 {
            libc::dup2(saved_err, 2);
            libc::close(saved_err);
        }
    }
    // The step's own processes end with it (the server is their subreaper).
    let mut status = None;
    if linux::reap(0, &mut status, libc::WNOHANG) {
        linux::kill_descendants(0, &mut status);
    }
    code
}

/// `/dev/null`, opened once (close-on-exec): what fd 1 points at between steps.
fn dev_null() -> Option<&'static std::fs::File> {
    static NULL: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
    NULL.get_or_init(|| std::fs::File::options().write(true).open("/dev/null").ok())
        .as_ref()
}
