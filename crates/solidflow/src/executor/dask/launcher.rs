//! The Dask [`StepLauncher`]: every attempt is one `submit` to the bridge; the bridge's
//! task messages become the attempt's [`Report`]s. Scheduling, retries, cancellation
//! and event translation are the shared run loop's.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::runtime::Runtime;
use tokio::sync::mpsc::UnboundedReceiver;

use super::bridge::{
    Bridge, BridgeError, BridgeMessage, FailureReason, Stream, SubmitRequest, TaskDone, WarmTask,
};
use crate::execution::event::{ErrorInfo, Level};
use crate::execution::launcher::{
    AttemptId, Launch, LaunchError, Place, ProcessExit, Report, Reporter, StepLauncher,
};
use crate::execution::step::StepEnvironment;
use crate::executor::PARENT_PID_ENV;
use crate::plan::StepKey;

/// Finished keys are released from the bridge (and Dask) in batches of this size.
const RELEASE_BATCH: usize = 64;

/// What the step's exit status 126/127 on a worker means.
const NOT_RUNNABLE: &str = "the binary could not be run there: set `executable:` to this pipeline's binary on the \
                            workers, or `ship_binary: true`";

/// What the message pump knows about one submitted key.
struct InFlight {
    id: AttemptId,
    reporter: Reporter,
    step_key: String,
    attempt: u32,
    /// Launched ahead of the attempts it waited for.
    ahead: bool,
    /// Hashes of the stdout lines forwarded, to recover missing ones from the log file.
    seen: HashSet<u64>,
}

/// State shared between the launcher (run loop thread) and the message pump.
#[derive(Default)]
struct Shared {
    inflight: HashMap<String, InFlight>,
    to_release: Vec<(AttemptId, String)>,
    /// The Dask key of each attempt submitted and not released yet, for launches
    /// ahead that wait for it.
    keys: HashMap<AttemptId, String>,
    /// Set when the bridge went away.
    dead: Option<String>,
}

type SharedState = Arc<Mutex<Shared>>;

fn lock(shared: &SharedState) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// How every step's task is submitted in this run.
pub(super) struct TaskTemplate {
    /// `command[0]`: the binary's path on the workers, or `{uploaded:<sha>}`.
    pub(super) command0: String,
    pub(super) env: BTreeMap<String, String>,
    pub(super) cwd: Option<PathBuf>,
    pub(super) log_dir: PathBuf,
    pub(super) priorities: Vec<i64>,
    pub(super) allowed_failures: u32,
    /// Set with `isolation: warm`: steps run on the workers' warm step servers.
    pub(super) warm: Option<WarmTask>,
}

/// Submits step attempts to Dask through the bridge.
pub(super) struct DaskLauncher<'a> {
    runtime: &'a Runtime,
    bridge: &'a Bridge,
    env: &'a StepEnvironment,
    template: TaskTemplate,
    topic: String,
    shared: SharedState,
}

impl<'a> DaskLauncher<'a> {
    /// A launcher for one run; starts the pump of the bridge's task messages.
    pub(super) fn new(
        runtime: &'a Runtime,
        bridge: &'a Bridge,
        messages: UnboundedReceiver<BridgeMessage>,
        env: &'a StepEnvironment,
        template: TaskTemplate,
    ) -> Self {
        let shared = SharedState::default();
        let allowed_failures = template.allowed_failures;
        runtime.spawn(pump(messages, shared.clone(), allowed_failures));
        Self {
            runtime,
            bridge,
            env,
            topic: format!("solidflow-{}", env.run_id),
            template,
            shared,
        }
    }

    fn request(&self, launch: &Launch, after: Vec<String>) -> SubmitRequest {
        let step = &self.env.plan.steps[launch.step];
        let t = &self.template;
        let step_key = &launch.invocation.step_key;
        let mut key = StepKey::dask_key(
            &step.solid_definition,
            step_key,
            &self.env.run_id,
            launch.invocation.attempt,
        );
        if launch.withdrawn > 0 {
            // Dask keys are unique: a launch again after a withdrawn one gets its own.
            key.push_str(&format!("-w{}", launch.withdrawn));
        }
        let mut request = SubmitRequest::new(
            key,
            vec![t.command0.clone(), "step".into()],
            self.topic.clone(),
        );
        request.stdin = serde_json::to_string(&launch.invocation).expect("invocations serialize");
        request.env = t.env.clone();
        request.cwd = t.cwd.clone();
        request.resources = step.required_resources.clone();
        request.priority = t.priorities[launch.step];
        // Step mode makes itself die with the worker process (PR_SET_PDEATHSIG) when it
        // finds the worker's pid here, so the bridge can start it without a preexec_fn
        // (vfork instead of fork: ~10 ms less per step).
        request.parent_pid_env = Some(PARENT_PID_ENV.to_string());
        request.warm = t.warm.clone();
        request.after = after;
        request.log_files = BTreeMap::from([
            (
                "stdout".to_string(),
                t.log_dir.join(format!("{step_key}.stdout.jsonl")),
            ),
            (
                "stderr".to_string(),
                t.log_dir.join(format!("{step_key}.stderr.log")),
            ),
        ]);
        request
    }
}

impl StepLauncher for DaskLauncher<'_> {
    /// The Dask key.
    type Handle = String;

    fn launch(&mut self, launch: Launch) -> Result<String, LaunchError> {
        self.launch_all(vec![launch])
            .pop()
            .expect("one result per launch")
    }

    /// Every ready step goes out in one batch of submits.
    fn launch_all(&mut self, launches: Vec<Launch>) -> Vec<Result<String, LaunchError>> {
        if let Some(dead) = lock(&self.shared).dead.clone() {
            return launches
                .iter()
                .map(|_| Err(LaunchError::Engine(dead.clone())))
                .collect();
        }
        let mut requests = Vec::with_capacity(launches.len());
        // Launches ahead whose upstream attempt is released already (it ended, the
        // run loop has not seen it yet): withdrawn without asking Dask.
        let mut gone = Vec::new();
        {
            // Registered before submitting: a reply can be a task message already.
            let mut shared = lock(&self.shared);
            for launch in &launches {
                let after: Option<Vec<String>> = launch
                    .after
                    .iter()
                    .map(|id| shared.keys.get(id).cloned())
                    .collect();
                let Some(after) = after else {
                    let request = self.request(launch, Vec::new());
                    gone.push((launch.id, request.key));
                    continue;
                };
                let request = self.request(launch, after);
                shared.keys.insert(launch.id, request.key.clone());
                shared.inflight.insert(
                    request.key.clone(),
                    InFlight {
                        id: launch.id,
                        reporter: launch.reporter.clone(),
                        step_key: launch.invocation.step_key.clone(),
                        attempt: launch.invocation.attempt,
                        ahead: !launch.after.is_empty(),
                        seen: HashSet::new(),
                    },
                );
                requests.push(request);
            }
        }
        let results = self.runtime.block_on(self.bridge.submit_many(&requests));
        let mut results = requests.into_iter().zip(results);
        let mut shared = lock(&self.shared);
        launches
            .iter()
            .map(|launch| {
                if let Some(pos) = gone.iter().position(|(id, _)| *id == launch.id) {
                    launch.reporter.send(Report::Withdrawn);
                    return Ok(gone.swap_remove(pos).1);
                }
                let (request, result) = results.next().expect("one result per request");
                match result {
                    Ok(()) => Ok(request.key),
                    Err(e) => {
                        shared.inflight.remove(&request.key);
                        shared.keys.remove(&launch.id);
                        Err(match e {
                            BridgeError::BridgeDied { .. } => LaunchError::Engine(format!(
                                "dask executor: the Dask bridge died: {e}"
                            )),
                            e => LaunchError::Step(ErrorInfo {
                                message: format!("could not submit {} to Dask: {e}", request.key),
                                causes: vec![],
                                kind: "error".into(),
                                location: None,
                            }),
                        })
                    }
                }
            })
            .collect()
    }

    fn launches_ahead(&self) -> bool {
        true
    }

    fn terminate(&mut self, handles: &[&String], grace: Duration) {
        let keys: Vec<String> = handles.iter().map(|k| k.to_string()).collect();
        if let Err(e) = self.runtime.block_on(self.bridge.cancel(&keys, grace)) {
            tracing::warn!(target: "solidflow::dask", "canceling Dask tasks: {e}");
        }
    }

    fn idle(&mut self) {
        let keys = {
            let mut shared = lock(&self.shared);
            if shared.to_release.len() < RELEASE_BATCH {
                return;
            }
            let released = std::mem::take(&mut shared.to_release);
            for (id, _) in &released {
                shared.keys.remove(id);
            }
            released.into_iter().map(|(_, key)| key).collect::<Vec<_>>()
        };
        let _ = self.runtime.block_on(self.bridge.release(&keys));
    }
}

fn hash_line(line: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    line.hash(&mut h);
    h.finish()
}

/// Turns the bridge's task messages into reports, until the bridge exits.
async fn pump(
    mut messages: UnboundedReceiver<BridgeMessage>,
    shared: SharedState,
    allowed_failures: u32,
) {
    while let Some(msg) = messages.recv().await {
        let mut shared = lock(&shared);
        if let BridgeMessage::Exited {
            status,
            stderr_tail,
            ..
        } = &msg
        {
            let message = format!(
                "dask executor: the Dask bridge exited unexpectedly ({status}); its stderr ends with:\n{stderr_tail}"
            );
            for f in shared.inflight.values() {
                f.reporter.engine_failed(message.clone());
            }
            shared.dead = Some(message);
            return;
        }
        let Some(key) = msg.key().map(str::to_string) else {
            continue;
        };
        let Some(f) = shared.inflight.get_mut(&key) else {
            continue;
        };
        match msg {
            BridgeMessage::Started {
                worker,
                pid,
                attempt,
                ..
            } => {
                let pid = pid.unwrap_or(0);
                let mut details = serde_json::Map::new();
                details.insert("dask_key".into(), json!(key));
                if f.ahead {
                    details.insert("launched_ahead".into(), json!(true));
                }
                f.reporter.send(Report::Started(Place {
                    pid,
                    worker: Some(worker.clone()),
                    stderr_log: None,
                    details,
                }));
                if attempt > 1 {
                    f.reporter.send(Report::Note {
                        level: Level::Info,
                        message: format!(
                            "Dask re-runs {} on {worker} (run {attempt} of attempt {})",
                            f.step_key, f.attempt
                        ),
                        details: json!({"dask_key": key, "dask_attempt": attempt, "rerun": true, "pid": pid}),
                    });
                }
            }
            // Reported from the attempt's current place: the worker that was lost.
            BridgeMessage::WorkerLost { worker, .. } => f.reporter.send(Report::Note {
                level: Level::Warning,
                message: format!(
                    "Dask worker {worker} was lost while running {} (attempt {}); Dask re-runs it on another worker \
                     unless its workers died more than allowed_failures ({allowed_failures}) times",
                    f.step_key, f.attempt
                ),
                details: json!({"dask_key": key, "worker_lost": true, "lost_worker": worker}),
            }),
            BridgeMessage::Resubmitted {
                scheduler,
                lost_for,
                ..
            } => f.reporter.send(Report::Note {
                level: Level::Warning,
                message: format!(
                    "the connection to the Dask scheduler at {scheduler} was lost for {lost_for:.1} s and came back; \
                     {} (attempt {}) is submitted again",
                    f.step_key, f.attempt
                ),
                details: json!({"dask_key": key, "scheduler_reconnected": true, "scheduler": scheduler, "lost_for_secs": lost_for}),
            }),
            BridgeMessage::Failed(failed) if failed.reason == FailureReason::Withdrawn => {
                // A launch ahead whose upstream attempt did not succeed: it did not run.
                f.reporter.send(Report::Withdrawn);
                let id = f.id;
                shared.inflight.remove(&key);
                shared.to_release.push((id, key));
            }
            BridgeMessage::Failed(failed) if failed.reason == FailureReason::SchedulerLost => {
                // The cluster is gone for every step: the run stops with the bridge's words.
                let message = format!("dask executor: {} (while running {})", failed.message, f.step_key);
                f.reporter.engine_failed(message.clone());
                shared.dead.get_or_insert(message);
                shared.inflight.remove(&key);
            }
            BridgeMessage::Line {
                stream: Stream::Stdout,
                line,
                ..
            } => {
                f.seen.insert(hash_line(&line));
                f.reporter.send(Report::Stdout(line));
            }
            BridgeMessage::Line {
                stream: Stream::Stderr,
                line,
                ..
            } => f.reporter.send(Report::Stderr(line)),
            BridgeMessage::Done(done) => {
                if let Some(missing) = done.lines_missing {
                    recover_lines(f, &done, missing);
                }
                f.reporter.send(Report::Exited(ProcessExit {
                    code: done.exit_code,
                    signal: done.signal,
                    core_dumped: false,
                    stderr_tail: done.stderr_tail.lines().map(str::to_string).collect(),
                    not_runnable_hint: Some(NOT_RUNNABLE.to_string()),
                }));
                let id = f.id;
                shared.inflight.remove(&key);
                shared.to_release.push((id, key));
            }
            BridgeMessage::Failed(failed) => {
                let (kind, message) = match failed.reason {
                    FailureReason::WorkerLost => (
                        "worker_lost",
                        format!(
                            "worker lost: the Dask workers running {} died {} time(s) (allowed_failures: {allowed_failures}): {}",
                            f.step_key,
                            allowed_failures + 1,
                            failed.message
                        ),
                    ),
                    FailureReason::Canceled => {
                        ("interrupted", format!("interrupted: {}", failed.message))
                    }
                    FailureReason::NotStarted => (
                        "crash",
                        format!(
                            "{}; {NOT_RUNNABLE} to upload it",
                            failed.message.trim_end_matches('.')
                        ),
                    ),
                    _ => ("error", failed.message.clone()),
                };
                f.reporter.send(Report::Failed(ErrorInfo {
                    message,
                    causes: failed.causes.clone(),
                    kind: kind.into(),
                    location: None,
                }));
                let id = f.id;
                shared.inflight.remove(&key);
                shared.to_release.push((id, key));
            }
            _ => {}
        }
    }
}

/// The live stream lost lines: say so, and forward what the worker's copy of the
/// output has that did not arrive (when that file is readable from here).
fn recover_lines(f: &mut InFlight, done: &TaskDone, missing: u64) {
    let file = done.log_files.get("stdout").map(PathBuf::from);
    let readable = file
        .as_deref()
        .and_then(|p| std::fs::read_to_string(p).ok());
    f.reporter.send(Report::Note {
        level: Level::Warning,
        message: format!(
            "{missing} output line(s) of {} did not arrive live from Dask worker {}; {}",
            f.step_key,
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
        details: json!({"lines_missing": missing, "log_files": done.log_files}),
    });
    for line in readable.iter().flat_map(|text| text.lines()) {
        if f.seen.insert(hash_line(line)) {
            f.reporter.send(Report::Stdout(line.to_string()));
        }
    }
}
