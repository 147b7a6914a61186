//! A pipeline binary running `execute ... --json` in its own process group, with its
//! events read live, so a test can wait for a moment and then break something (kill a
//! process by pid, interrupt the group, stop a server); and checks that a process is gone.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::outcome::Outcome;

/// Generous upper bound for one run; a hang fails the test instead of blocking CI.
pub const RUN_DEADLINE: Duration = Duration::from_secs(180);

/// A pipeline process in flight.
pub struct LiveRun {
    child: Option<Child>,
    rx: Receiver<String>,
    lines: Vec<String>,
    events: Vec<Value>,
    stderr: Option<std::thread::JoinHandle<String>>,
    started: Instant,
}

impl LiveRun {
    /// Starts `command` (which must print JSON events on stdout) as the leader of a new
    /// process group, with the environment every test process gets.
    pub fn start(mut command: Command) -> Self {
        use std::os::unix::process::CommandExt;
        command
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = command.spawn().expect("start the pipeline binary");
        let (tx, rx) = channel();
        let stdout = child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = child.stderr.take().expect("piped");
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        Self {
            child: Some(child),
            rx,
            lines: Vec::new(),
            events: Vec::new(),
            stderr: Some(stderr),
            started: Instant::now(),
        }
    }

    fn push(&mut self, line: String) -> Option<Value> {
        let event = serde_json::from_str::<Value>(&line)
            .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line}"));
        self.lines.push(line);
        self.events.push(event.clone());
        Some(event)
    }

    /// Waits for the first event (seen so far or arriving) that matches `pred`.
    pub fn wait_event(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(e) = self.events.iter().find(|e| pred(e)) {
            return e.clone();
        }
        let deadline = self.started + RUN_DEADLINE;
        loop {
            match self
                .rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    if let Some(e) = self.push(line)
                        && pred(&e)
                    {
                        return e;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.kill_group();
                    panic!("timed out waiting for {what}; events:\n{}", self.dump());
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.kill_group();
                    let stderr = self.take_stderr();
                    panic!(
                        "the run ended without {what}; events:\n{}\nstderr:\n{stderr}",
                        self.dump()
                    );
                }
            }
        }
    }

    /// Waits for a `LOG_MESSAGE` whose message is `message`.
    pub fn wait_log(&mut self, message: &str) -> Value {
        self.wait_event(&format!("log message {message:?}"), |e| {
            e["event_type"] == "LOG_MESSAGE" && e["message"] == message
        })
    }

    /// The events received so far, in order.
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    /// The pipeline process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends `signal` to the pipeline process only.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "cannot signal the pipeline process");
    }

    /// Sends `signal` to the pipeline's whole process group, as a terminal does for
    /// Ctrl-C (SIGINT) to its foreground job.
    pub fn signal_group(&self, signal: libc::c_int) {
        // SAFETY: kill(2) with a negative pid signals the group our child leads.
        let rc = unsafe { libc::kill(-(self.pid() as libc::pid_t), signal) };
        assert_eq!(rc, 0, "cannot signal the pipeline's process group");
    }

    fn kill_group(&mut self) {
        if let Some(child) = &mut self.child {
            // SAFETY: kill(2) on the group our unreaped child leads.
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn take_stderr(&mut self) -> String {
        self.stderr
            .take()
            .map(|h| h.join().expect("stderr reader"))
            .unwrap_or_default()
    }

    fn dump(&self) -> String {
        self.lines.join("\n")
    }

    /// Waits for the process to exit (with [`RUN_DEADLINE`]) and collects everything.
    pub fn finish(mut self) -> Outcome {
        let deadline = self.started + RUN_DEADLINE;
        let mut child = self.child.take().expect("running");
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() >= deadline {
                // SAFETY: kill(2) on the group our unreaped child leads.
                unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
                let _ = child.wait();
                panic!(
                    "the run did not finish in {RUN_DEADLINE:?}; events:\n{}",
                    self.dump()
                );
            }
            if let Ok(line) = self.rx.recv_timeout(Duration::from_millis(20)) {
                self.push(line);
            }
        };
        while let Ok(line) = self.rx.recv_timeout(Duration::from_secs(10)) {
            self.push(line);
        }
        let stderr = self.take_stderr();
        Outcome::new(
            status.code(),
            self.lines.join("\n"),
            stderr,
            self.started.elapsed(),
        )
    }
}

impl Drop for LiveRun {
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// Whether a process is running (a zombie counts as exited).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Waits (up to 30 s) until `pid` is gone; panics naming it as an orphan otherwise, and
/// then kills it so the test leaves nothing behind.
pub fn assert_dies(pid: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(pid) {
        if Instant::now() >= deadline {
            // SAFETY: kill(2) on the process the test is about to report as orphaned.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("{what} (pid {pid}) outlived its step: orphaned process");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a pid written by a solid.
pub fn read_pid(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .trim()
        .parse()
        .expect("pid")
}
