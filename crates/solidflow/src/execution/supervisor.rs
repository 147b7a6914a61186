//! Keeps a step's own child processes from outliving the step (`<binary> step` on Linux).
//!
//! A solid may start processes (a shell, a server, a daemon that calls `setsid`). They
//! must end with the step, whether the step finishes, is canceled, or loses the process
//! that started it (a killed worker or pipeline process). So step mode splits in two
//! right at its start, while the process is still single-threaded:
//!
//! - the **supervisor** (the process the executor started, leader of its own process
//!   group) is a child subreaper (`PR_SET_CHILD_SUBREAPER`): every orphaned descendant
//!   of the step is re-parented to it, never to pid 1. It runs no user code, so its
//!   signal handling cannot be changed by a solid. It waits for signals:
//!   - the runner exited: it SIGKILLs every remaining descendant, reaps them, and exits
//!     the way the runner did (same code, or the same signal);
//!   - its parent died (`PR_SET_PDEATHSIG` = SIGHUP): it SIGKILLs the runner and every
//!     descendant and exits;
//!   - SIGTERM / SIGINT / SIGQUIT (cancellation): passed on to the runner, which stops
//!     the solid; its descendants are killed when it has exited.
//! - the **runner** (its forked child) runs the step as before, and dies with the
//!   supervisor (`PR_SET_PDEATHSIG` = SIGKILL).
//!
//! What is not covered: a descendant that left the process group, when the whole
//! group is SIGKILLed at once (e.g. a second Ctrl-C on `multiprocess`): the supervisor
//! dies without a chance to act. Everything in the group dies with it.

/// The exit status of a step whose parent is gone before it started.
pub(crate) const PARENT_GONE_EXIT: i32 = 3;

/// Sets up supervision of the step process and returns in the runner, which then runs
/// the step; the supervisor never returns. `parent` is the pid the executor says
/// started this process (`SOLIDFLOW_PARENT_PID`); if it is already gone, the step
/// exits at once.
///
/// Without Linux's process controls, or if the process is no longer single-threaded
/// (forking then would be unsafe), only the parent check is done.
pub(crate) fn supervise_step(parent: Option<i32>) {
    #[cfg(target_os = "linux")]
    linux::supervise(parent);
    #[cfg(not(target_os = "linux"))]
    check_parent(parent);
}

#[cfg(not(target_os = "linux"))]
fn check_parent(parent: Option<i32>) {
    // SAFETY: getppid(2) has no preconditions.
    if let Some(parent) = parent
        && unsafe { libc::getppid() } != parent
    {
        eprintln!("error: the parent process {parent} is gone; not running the step");
        std::process::exit(PARENT_GONE_EXIT);
    }
}

#[cfg(target_os = "linux")]
pub(crate) mod linux {
    use super::PARENT_GONE_EXIT;
    use libc::{c_int, pid_t};

    /// Signals the supervisor waits for.
    const HANDLED: [c_int; 5] = [
        libc::SIGCHLD,
        libc::SIGHUP,
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGQUIT,
    ];

    /// Whether this process has one thread (so forking it may keep running Rust code).
    pub(crate) fn single_threaded() -> bool {
        threads() == Some(1)
    }

    /// How many threads this process has (`None`: `/proc` is not readable).
    pub(crate) fn threads() -> Option<usize> {
        std::fs::read_dir("/proc/self/task")
            .ok()
            .map(Iterator::count)
    }

    fn parent_gone(parent: Option<pid_t>) -> bool {
        // SAFETY: getppid(2) has no preconditions.
        parent.is_some_and(|p| unsafe { libc::getppid() } != p)
    }

    pub(super) fn supervise(parent: Option<pid_t>) {
        if !single_threaded() {
            tracing::debug!("step process is multi-threaded: running the step unsupervised");
            // SAFETY: prctl(PR_SET_PDEATHSIG) only changes this process's attributes.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
            if parent_gone(parent) {
                gone(parent);
            }
            return;
        }
        // SAFETY: every call below only changes this process's own attributes (signal
        // mask, dispositions, prctl flags, process group) or forks it. The process is
        // single-threaded (checked above), so the child may keep running Rust code.
        unsafe {
            if libc::getpgrp() != libc::getpid() {
                libc::setpgid(0, 0);
            }
            let (set, old) = become_supervisor();
            if parent_gone(parent) {
                gone(parent);
            }
            let supervisor = libc::getpid();
            match libc::fork() {
                -1 => {
                    // Cannot split: run the step in this process, as before.
                    libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 0 as libc::c_ulong);
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                    libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
                }
                0 => {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                    if libc::getppid() != supervisor {
                        libc::_exit(PARENT_GONE_EXIT);
                    }
                    libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
                }
                runner => run_supervisor(runner, &set),
            }
        }
    }

    /// Blocks the signals [`wait_runner`] waits for, restores SIGCHLD's default
    /// disposition, and makes this process a child subreaper that gets SIGHUP when its
    /// parent dies. Returns the blocked set and the previous signal mask (for a child
    /// to restore).
    ///
    /// # Safety
    /// Changes process-wide attributes; call it while the process is single-threaded.
    pub(crate) unsafe fn become_supervisor() -> (libc::sigset_t, libc::sigset_t) {
        // SAFETY: only this process's own mask, dispositions and prctl flags change.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in HANDLED {
                libc::sigaddset(&mut set, s);
            }
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);
            // A SIGCHLD disposition of SIG_IGN inherited from the spawner would make the
            // kernel reap children on its own; waiting needs the default.
            libc::signal(libc::SIGCHLD, libc::SIG_DFL);
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGHUP as libc::c_ulong);
            (set, old)
        }
    }

    fn gone(parent: Option<pid_t>) -> ! {
        eprintln!(
            "error: the parent process {} is gone; not running the step",
            parent.unwrap_or_default()
        );
        std::process::exit(PARENT_GONE_EXIT);
    }

    /// The supervisor's loop; see the module docs.
    fn run_supervisor(runner: pid_t, set: &libc::sigset_t) -> ! {
        // The runner owns stdin (the invocation) and stdout (the messages); the
        // supervisor keeps only stderr.
        if let Ok(null) = std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            use std::os::fd::AsRawFd;
            // SAFETY: dup2 onto this process's own standard descriptors.
            unsafe {
                libc::dup2(null.as_raw_fd(), 0);
                libc::dup2(null.as_raw_fd(), 1);
            }
        }
        let status = wait_runner(runner, set, |sig| {
            // SAFETY: signals our own child, not yet reaped.
            unsafe { libc::kill(runner, sig) };
        });
        exit_like(status)
    }

    /// Waits for `runner` to exit, then SIGKILLs and reaps every remaining descendant
    /// and returns the runner's wait status. SIGTERM / SIGINT / SIGQUIT meanwhile go to
    /// `on_stop`; SIGHUP (the parent died, `PR_SET_PDEATHSIG`) kills every descendant
    /// and exits. The signals of `set` must be blocked, and this process a subreaper.
    pub(crate) fn wait_runner(
        runner: pid_t,
        set: &libc::sigset_t,
        mut on_stop: impl FnMut(c_int),
    ) -> c_int {
        let mut status = None;
        loop {
            // SAFETY: `set` is a valid, initialized signal set; siginfo is written by the kernel.
            let sig = unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                libc::sigwaitinfo(set, &mut info)
            };
            match sig {
                libc::SIGCHLD => {
                    let children_left = reap(runner, &mut status, libc::WNOHANG);
                    if let Some(s) = status {
                        // No children left means no descendants: nothing to scan for.
                        if children_left {
                            kill_descendants(runner, &mut status);
                        }
                        return s;
                    }
                }
                libc::SIGHUP => {
                    // The parent (worker or pipeline process) is gone: nobody reads the
                    // step's results any more.
                    kill_descendants(runner, &mut status);
                    // SAFETY: _exit(2) ends this process without running destructors.
                    unsafe { libc::_exit(128 + libc::SIGHUP) };
                }
                libc::SIGTERM | libc::SIGINT | libc::SIGQUIT => on_stop(sig),
                _ => {} // EINTR or an unexpected signal: wait again.
            }
        }
    }

    /// Reaps children; records the runner's status. Returns false when there are none.
    pub(crate) fn reap(runner: pid_t, status: &mut Option<c_int>, flags: c_int) -> bool {
        loop {
            let mut s: c_int = 0;
            // SAFETY: waitpid(2) on our own children with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut s, flags) };
            if pid == runner {
                *status = Some(s);
            }
            if pid > 0 && flags == 0 {
                return true;
            }
            if pid == 0 {
                return true;
            }
            if pid < 0 {
                return std::io::Error::last_os_error().raw_os_error() != Some(libc::ECHILD);
            }
        }
    }

    /// SIGKILLs every descendant and reaps until this process has no children left. As
    /// a subreaper, having no children means having no descendants.
    pub(crate) fn kill_descendants(runner: pid_t, status: &mut Option<c_int>) {
        loop {
            // SAFETY: getpid(2) has no preconditions.
            for pid in descendants(unsafe { libc::getpid() }) {
                // SAFETY: kill(2) on a process of this step's own tree.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if !reap(runner, status, 0) {
                return;
            }
        }
    }

    /// The process tree below `pid`, from the parent pids in `/proc/*/stat` (the
    /// `children` files need a kernel option that is not always there).
    fn descendants(pid: pid_t) -> Vec<pid_t> {
        let mut parents: Vec<(pid_t, pid_t)> = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(p) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            // The fields after the parenthesized command name: state, ppid, ...
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            if let Some(ppid) = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse().ok())
            {
                parents.push((p, ppid));
            }
        }
        let mut out = Vec::new();
        let mut frontier = vec![pid];
        while let Some(p) = frontier.pop() {
            for &(child, parent) in &parents {
                if parent == p && !out.contains(&child) {
                    out.push(child);
                    frontier.push(child);
                }
            }
        }
        out
    }

    /// Exits with the runner's exit code, or dies of the signal that killed it, so the
    /// executor sees the same status it would have seen from the runner.
    fn exit_like(status: c_int) -> ! {
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            // SAFETY: resets this process's disposition for `sig`, unblocks it and
            // sends it to this process; the fallback exit follows if it is not fatal.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                let mut one: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut one);
                libc::sigaddset(&mut one, sig);
                libc::sigprocmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
                libc::kill(libc::getpid(), sig);
                libc::_exit(128 + sig);
            }
        }
        // SAFETY: _exit(2) ends this process; stdout is /dev/null, nothing to flush.
        unsafe { libc::_exit(libc::WEXITSTATUS(status)) }
    }
}
