//! One launched attempt, as the run loop sees it: the step protocol's stdout parsed
//! into forwarded events and a result, stderr turned into `LOG_MESSAGE`s, and a
//! process that ended without a result described as a crash. The one place every
//! out-of-process executor's reports become events and a `StepOutcome`.

use std::collections::VecDeque;

use serde_json::{Value, json};

use super::{Place, ProcessExit, Report};
use crate::execution::event::{ErrorInfo, EventKind, Level};
use crate::execution::protocol::StepMessage;
use crate::execution::scheduler::StepOutcome;
use crate::execution::sink::Origin;
use crate::execution::step::StepEnvironment;

/// How many trailing stderr lines a crash report quotes.
pub const CRASH_TAIL_LINES: usize = 8;

/// What the loop knows about one running attempt.
pub(super) struct Attempt {
    pub(super) step: usize,
    pub(super) number: u32,
    key: String,
    place: Option<Place>,
    result: Option<StepOutcome>,
    tail: VecDeque<String>,
}

impl Attempt {
    /// Attempt `number` of `step` (the scheduler's index), whose key is `key`.
    pub(super) fn new(step: usize, key: &str, number: u32) -> Self {
        Self {
            step,
            number,
            key: key.to_string(),
            place: None,
            result: None,
            tail: VecDeque::with_capacity(CRASH_TAIL_LINES),
        }
    }

    /// Handles one report; returns the outcome when the attempt ended.
    pub(super) fn report(&mut self, env: &StepEnvironment, report: Report) -> Option<StepOutcome> {
        match report {
            Report::Started(place) => {
                self.started(env, place);
                None
            }
            Report::Stdout(line) => {
                self.stdout(env, &line);
                None
            }
            Report::Stderr(line) => {
                self.emit(
                    env,
                    Level::Info,
                    format!("[stderr] {line}"),
                    EventKind::LogMessage,
                );
                if self.tail.len() == CRASH_TAIL_LINES {
                    self.tail.pop_front();
                }
                self.tail.push_back(line);
                None
            }
            Report::Note {
                level,
                message,
                details,
            } => {
                self.emit(env, level, message, EventKind::EngineEvent { details });
                None
            }
            Report::Exited(exit) => Some(match self.result.take() {
                Some(outcome) => outcome,
                None => StepOutcome::Failed(self.crash(exit)),
            }),
            Report::Failed(error) => Some(StepOutcome::Failed(error)),
            // The run loop takes a withdrawn launch back to the scheduler before this.
            Report::Withdrawn => None,
        }
    }

    fn started(&mut self, env: &StepEnvironment, place: Place) {
        // A transport that re-runs the process (a lost Dask worker) starts over.
        self.result = None;
        self.tail.clear();
        let mut details = place.details.clone();
        details.insert("pid".into(), place.pid.into());
        details.insert("attempt".into(), self.number.into());
        let mut message = format!(
            "started step process {} for {} (attempt {}){}",
            place.pid,
            self.key,
            self.number,
            on(&place)
        );
        if let Some(log) = &place.stderr_log {
            details.insert("log_file".into(), json!(log));
            message.push_str(&format!("; its stderr is kept in {}", log.display()));
        }
        self.place = Some(place);
        let details = Value::Object(details);
        self.emit(
            env,
            Level::Debug,
            message,
            EventKind::EngineEvent { details },
        );
    }

    fn stdout(&mut self, env: &StepEnvironment, line: &str) {
        if line.trim().is_empty() {
            return;
        }
        match serde_json::from_str::<StepMessage>(line) {
            Ok(StepMessage::Event { mut event }) => {
                if let Some(worker) = self.place.as_ref().and_then(|p| p.worker.clone()) {
                    event.worker = Some(worker);
                }
                env.events.forward(*event);
            }
            Ok(result) => {
                let (pid, key) = (self.pid(), self.key.clone());
                self.result = result.outcome(|| {
                    format!("step process {pid} for {key} reported a failure without details")
                });
            }
            Err(e) => self.emit(
                env,
                Level::Warning,
                format!("[stdout] {line}"),
                EventKind::EngineEvent {
                    details: json!({"stream": "stdout", "unparsed": e.to_string()}),
                },
            ),
        }
    }

    /// The step's key.
    pub(super) fn key(&self) -> &str {
        &self.key
    }

    fn pid(&self) -> u32 {
        self.place.as_ref().map_or(0, |p| p.pid)
    }

    /// The error for a process that ended without reporting a result.
    fn crash(&self, exit: ProcessExit) -> ErrorInfo {
        let place = self.place.clone().unwrap_or_default();
        let mut how = describe_exit(&exit);
        if let (Some(126 | 127), Some(hint)) = (exit.code, &exit.not_runnable_hint) {
            how.push_str(&format!(" ({hint})"));
        }
        let mut message = format!(
            "step process {} for {}{} {how} without reporting a result",
            place.pid,
            self.key,
            on(&place)
        );
        // The log is created with the step's first stderr line.
        if let Some(log) = place.stderr_log.as_ref().filter(|l| l.exists()) {
            message.push_str(&format!("; its stderr is in {}", log.display()));
        }
        let causes = if self.tail.is_empty() {
            let skip = exit.stderr_tail.len().saturating_sub(CRASH_TAIL_LINES);
            exit.stderr_tail.into_iter().skip(skip).collect()
        } else {
            self.tail.iter().cloned().collect()
        };
        ErrorInfo {
            message,
            causes,
            kind: "crash".into(),
            location: None,
        }
    }

    /// Where this attempt runs, when on a remote worker: what the events about it
    /// (including the scheduler's failure, retry and restart events) are stamped with.
    pub(super) fn origin(&self) -> Option<Origin> {
        let place = self.place.as_ref()?;
        let worker = place.worker.as_deref()?;
        Some(Origin {
            worker: worker.to_string(),
            host: worker_host(worker),
            pid: place.pid,
        })
    }

    /// Emits an event about this attempt, from its worker when it runs on one.
    fn emit(&self, env: &StepEnvironment, level: Level, message: String, kind: EventKind) {
        env.events.emit_from(
            self.origin().as_ref(),
            Some(&self.key),
            level,
            message,
            kind,
        );
    }
}

/// ` on worker <address>` for remote places.
fn on(place: &Place) -> String {
    place
        .worker
        .as_deref()
        .map(|w| format!(" on worker {w}"))
        .unwrap_or_default()
}

/// The host part of a worker address (`tcp://10.0.0.5:41545` → `10.0.0.5`).
pub fn worker_host(address: &str) -> String {
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    rest.rsplit_once(':')
        .map_or(rest, |(h, _)| h)
        .trim_matches(['[', ']'])
        .to_string()
}

/// Describes how a process ended, for a crash report: `exited with status 3`,
/// `was killed by signal 9 (Killed; out of memory, or killed by another process)`.
pub fn describe_exit(exit: &ProcessExit) -> String {
    match (exit.signal, exit.code) {
        (Some(signal), _) => {
            // SAFETY: strsignal returns a pointer to a static (or thread-local) C string.
            let name = unsafe {
                let p = libc::strsignal(signal);
                if p.is_null() {
                    String::from("unknown signal")
                } else {
                    std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
                }
            };
            let core = if exit.core_dumped {
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
        }
        (None, Some(code)) => format!("exited with status {code}"),
        (None, None) => "ended".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_described_for_crash_reports() {
        let exit = |code, signal, core_dumped| ProcessExit {
            code,
            signal,
            core_dumped,
            ..ProcessExit::default()
        };
        assert_eq!(
            describe_exit(&exit(Some(3), None, false)),
            "exited with status 3"
        );
        let killed = describe_exit(&exit(None, Some(libc::SIGKILL), false));
        assert!(
            killed.starts_with("was killed by signal 9 (") && killed.contains("out of memory"),
            "{killed}"
        );
        let aborted = describe_exit(&exit(None, Some(libc::SIGABRT), true));
        assert!(
            aborted.starts_with("was killed by signal 6 (") && aborted.contains("core dumped"),
            "{aborted}"
        );
    }

    #[test]
    fn worker_hosts() {
        assert_eq!(worker_host("tcp://10.0.0.5:41545"), "10.0.0.5");
        assert_eq!(worker_host("tls://[::1]:41545"), "::1");
    }
}
