//! Turning bridge messages into the run's events and step outcomes: worker-side step
//! events are forwarded, stderr lines become log messages, and every final message
//! (`done`, `failed`, `skipped`) becomes an [`Outcome`] for the scheduler.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use super::address::worker_host;
use super::bridge::{BridgeMessage, FailureReason, Stream, TaskDone};
use super::run::Run;
use crate::execution::event::{ErrorInfo, Event, EventKind, Level};
use crate::execution::protocol::StepMessage;
use crate::executor::ExecutorError;

/// How a step attempt ended.
pub(super) enum Outcome {
    Succeeded,
    Failed(ErrorInfo, Option<Option<Duration>>),
}

fn hash_line(line: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    line.hash(&mut h);
    h.finish()
}

impl Run<'_> {
    fn step_key(&self, step: usize) -> &str {
        &self.ctx.env.plan.steps[step].key
    }

    /// Emits an event that happened on a worker (host and worker set from its address).
    fn emit_from_worker(
        &self,
        step: usize,
        worker: &str,
        pid: u32,
        level: Level,
        message: String,
        kind: EventKind,
    ) {
        let env = &self.ctx.env;
        env.events.forward(Event {
            run_id: env.run_id.clone(),
            pipeline: env.pipeline.name().to_string(),
            step_key: Some(self.step_key(step).to_string()),
            timestamp: chrono::Utc::now(),
            level,
            message,
            host: worker_host(worker),
            pid,
            worker: Some(worker.to_string()),
            kind,
        });
    }

    /// One stdout line of a step process: a step protocol message.
    fn stdout_line(&mut self, key: &str, worker: &str, line: &str) {
        let Some(f) = self.inflight.get_mut(key) else {
            return;
        };
        f.seen.insert(hash_line(line));
        let (step, pid) = (f.step, f.pid);
        match serde_json::from_str::<StepMessage>(line) {
            Ok(StepMessage::Event { mut event }) => {
                event.worker = Some(worker.to_string());
                self.ctx.env.events.forward(*event);
            }
            Ok(StepMessage::Result {
                ok,
                error,
                retry_requested,
            }) => f.result = Some((ok, error, retry_requested)),
            Err(e) if !line.trim().is_empty() => self.emit_from_worker(
                step,
                worker,
                pid,
                Level::Warning,
                format!("[stdout] {line}"),
                EventKind::EngineEvent {
                    details: json!({"stream": "stdout", "unparsed": e.to_string()}),
                },
            ),
            Err(_) => {}
        }
    }

    /// Handles one bridge message; returns the outcome when a step attempt ended.
    pub(super) fn handle(
        &mut self,
        msg: BridgeMessage,
    ) -> Result<Option<(usize, Outcome)>, ExecutorError> {
        match msg {
            BridgeMessage::Started {
                key,
                worker,
                pid,
                attempt,
            } => {
                let Some(f) = self.inflight.get_mut(&key) else {
                    return Ok(None);
                };
                f.worker = Some(worker.clone());
                f.pid = pid.unwrap_or(0);
                f.result = None;
                let (step, scheduler_attempt, pid) = (f.step, f.attempt, f.pid);
                let step_key = self.step_key(step).to_string();
                if attempt > 1 {
                    self.emit_from_worker(
                        step,
                        &worker,
                        pid,
                        Level::Warning,
                        format!("a Dask worker died while running {step_key}; Dask re-runs it on {worker} (run {attempt} of attempt {scheduler_attempt})"),
                        EventKind::EngineEvent { details: json!({"dask_key": key, "dask_attempt": attempt, "worker_lost": true, "pid": pid}) },
                    );
                } else {
                    self.emit_from_worker(
                        step,
                        &worker,
                        pid,
                        Level::Debug,
                        format!("{step_key} (attempt {scheduler_attempt}) started on Dask worker {worker}, pid {pid}"),
                        EventKind::EngineEvent { details: json!({"dask_key": key, "pid": pid}) },
                    );
                }
                Ok(None)
            }
            BridgeMessage::Line {
                key,
                worker,
                stream: Stream::Stdout,
                line,
            } => {
                self.stdout_line(&key, &worker, &line);
                Ok(None)
            }
            BridgeMessage::Line {
                key,
                worker,
                stream: Stream::Stderr,
                line,
            } => {
                if let Some(f) = self.inflight.get(&key) {
                    self.emit_from_worker(
                        f.step,
                        &worker,
                        f.pid,
                        Level::Info,
                        format!("[stderr] {line}"),
                        EventKind::LogMessage,
                    );
                }
                Ok(None)
            }
            BridgeMessage::Done(done) => Ok(self.done(done)),
            BridgeMessage::Failed(failed) => {
                let Some(f) = self.inflight.remove(&failed.key) else {
                    return Ok(None);
                };
                self.to_release.push(failed.key.clone());
                let (kind, message) = match failed.reason {
                    FailureReason::WorkerLost => (
                        "worker_lost",
                        format!(
                            "worker lost: the Dask workers running {} died {} time(s) (allowed_failures: {}): {}",
                            self.step_key(f.step),
                            self.executor.config.allowed_failures + 1,
                            self.executor.config.allowed_failures,
                            failed.message
                        ),
                    ),
                    FailureReason::Canceled => {
                        ("interrupted", format!("interrupted: {}", failed.message))
                    }
                    FailureReason::UnsatisfiableResources => (
                        "error",
                        format!(
                            "{}; start a worker with `dask worker <scheduler> --resources \"NAME=N\"`",
                            failed.message
                        ),
                    ),
                    FailureReason::Error if failed.message.contains("could not start") => (
                        "crash",
                        format!(
                            "{}; the workers need this pipeline's binary at that path: set `executable:` to its path on the \
                             workers, or `ship_binary: true` to upload it",
                            failed.message
                        ),
                    ),
                    _ => ("error", failed.message.clone()),
                };
                let error = ErrorInfo {
                    message,
                    causes: vec![],
                    kind: kind.into(),
                    location: None,
                };
                Ok(Some((f.step, Outcome::Failed(error, None))))
            }
            BridgeMessage::Skipped { key, upstream } => {
                let Some(f) = self.inflight.remove(&key) else {
                    return Ok(None);
                };
                let error = ErrorInfo {
                    message: format!(
                        "Dask skipped the task because {} did not succeed",
                        upstream.join(", ")
                    ),
                    causes: vec![],
                    kind: "error".into(),
                    location: None,
                };
                Ok(Some((f.step, Outcome::Failed(error, None))))
            }
            BridgeMessage::Exited {
                status,
                stderr_tail,
                ..
            } => Err(ExecutorError::Engine(format!(
                "dask executor: the Dask bridge exited unexpectedly ({status}); its stderr ends with:\n{stderr_tail}"
            ))),
            _ => Ok(None),
        }
    }

    fn done(&mut self, done: TaskDone) -> Option<(usize, Outcome)> {
        self.to_release.push(done.key.clone());
        if let Some(missing) = done.lines_missing {
            self.recover_lines(&done, missing);
        }
        let f = self.inflight.remove(&done.key)?;
        let step_key = self.step_key(f.step).to_string();
        let outcome = match f.result {
            Some((true, _, _)) => Outcome::Succeeded,
            Some((false, error, retry)) => {
                let error = error.unwrap_or_else(|| ErrorInfo {
                    message: format!(
                        "{step_key} failed on Dask worker {} without details",
                        done.worker
                    ),
                    causes: vec![],
                    kind: "error".into(),
                    location: None,
                });
                Outcome::Failed(
                    error,
                    retry.map(|d| d.map(|s| Duration::from_secs_f64(s.max(0.0)))),
                )
            }
            None => {
                let how = match (done.exit_code, done.signal) {
                    (_, Some(sig)) => format!(
                        "was killed by signal {sig}{}",
                        if sig == 9 {
                            " (out of memory, or killed by another process)"
                        } else {
                            ""
                        }
                    ),
                    (Some(127), _) | (Some(126), _) => format!(
                        "exited with status {} (the binary could not be run there: set `executable:` to this pipeline's binary on \
                         the workers, or `ship_binary: true`)",
                        done.exit_code.unwrap_or_default()
                    ),
                    (Some(code), _) => format!("exited with status {code}"),
                    (None, None) => "ended".to_string(),
                };
                let causes = done
                    .stderr_tail
                    .lines()
                    .rev()
                    .take(8)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .map(str::to_string)
                    .collect();
                let error = ErrorInfo {
                    message: format!(
                        "step process {} for {step_key} on Dask worker {} {how} without reporting a result",
                        f.pid, done.worker
                    ),
                    causes,
                    kind: "crash".into(),
                    location: None,
                };
                Outcome::Failed(error, None)
            }
        };
        Some((f.step, outcome))
    }

    /// The live stream lost lines: say so, and forward what the worker's copy of the
    /// output has that we have not seen (when that file is readable from here).
    fn recover_lines(&mut self, done: &TaskDone, missing: u64) {
        let Some(f) = self.inflight.get(&done.key) else {
            return;
        };
        let (step, pid) = (f.step, f.pid);
        let file = done.log_files.get("stdout").map(PathBuf::from);
        let readable = file
            .as_deref()
            .and_then(|p| std::fs::read_to_string(p).ok());
        self.emit_from_worker(
            step,
            &done.worker,
            pid,
            Level::Warning,
            format!(
                "{missing} output line(s) of {} did not arrive live from Dask worker {}; {}",
                self.step_key(step),
                done.worker,
                match (&file, &readable) {
                    (Some(p), Some(_)) => format!("recovered them from {}", p.display()),
                    (Some(p), None) => format!(
                        "the complete output is kept on the worker in {}",
                        p.display()
                    ),
                    (None, _) => "the worker could not keep a copy of its output".into(),
                }
            ),
            EventKind::EngineEvent {
                details: json!({"lines_missing": missing, "log_files": done.log_files}),
            },
        );
        if let Some(text) = readable {
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !self.inflight[&done.key].seen.contains(&hash_line(l)))
                .collect();
            for line in lines {
                self.stdout_line(&done.key, &done.worker, line);
            }
        }
    }
}
