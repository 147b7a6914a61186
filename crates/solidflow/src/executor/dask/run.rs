//! One run on Dask: start the bridge, connect to the cluster, submit every ready step
//! as a Dask task, and feed what comes back to the shared [`Scheduler`]; on Ctrl-C,
//! cancel what is running.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::json;

use super::DaskExecutor;
use super::bridge::{
    Bridge, BridgeError, BridgeMessage, BridgeOptions, ClusterKind, ConnectRequest, ConnectedInfo,
    SubmitRequest, WorkerResources,
};
use super::events::Outcome;
use super::placement::{critical_path, unsatisfiable_resources};
use crate::execution::event::{ErrorInfo, EventKind, Level};
use crate::execution::protocol::{PROTOCOL_VERSION, StepInvocation};
use crate::execution::scheduler::{Scheduler, Summary};
use crate::executor::{ExecutionContext, ExecutorError, PARENT_PID_ENV};
use crate::plan::StepKey;

/// How long canceled steps get between SIGTERM and SIGKILL on the workers.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// Finished keys are released from the bridge (and Dask) in batches of this size.
const RELEASE_BATCH: usize = 64;

/// What the parent knows about one submitted step attempt.
pub(super) struct InFlight {
    pub(super) step: usize,
    pub(super) attempt: u32,
    pub(super) worker: Option<String>,
    pub(super) pid: u32,
    pub(super) result: Option<(bool, Option<ErrorInfo>, Option<Option<f64>>)>,
    /// Hashes of the stdout lines forwarded, to recover missing ones from the log file.
    pub(super) seen: HashSet<u64>,
}

/// One run in progress: the steps submitted to Dask and the keys to release.
pub(super) struct Run<'a> {
    pub(super) executor: &'a DaskExecutor,
    pub(super) ctx: &'a ExecutionContext,
    pub(super) bridge: &'a Bridge,
    pub(super) inflight: HashMap<String, InFlight>,
    pub(super) to_release: Vec<String>,
}

fn engine(what: &str, e: BridgeError) -> ExecutorError {
    ExecutorError::Engine(format!("dask executor: {what}: {e}"))
}

impl DaskExecutor {
    pub(super) async fn run(&self, ctx: &ExecutionContext) -> Result<Summary, ExecutorError> {
        let options = BridgeOptions {
            python: self.config.python.clone(),
            startup_timeout: self.config.timeout.max(Duration::from_secs(5)),
            ..BridgeOptions::default()
        };
        let (bridge, mut rx) = Bridge::spawn(options)
            .await
            .map_err(|e| engine("cannot start the Dask bridge", e))?;
        let result = self.drive(ctx, &bridge, &mut rx).await;
        // Always: kill our steps, close the client and a cluster we created.
        if let Err(e) = bridge.shutdown(Duration::from_secs(60)).await {
            tracing::warn!(target: "solidflow::dask", "Dask bridge shutdown: {e}");
        }
        result
    }

    fn connect_request(&self) -> ConnectRequest {
        let c = &self.config;
        let local = c.kind() == ClusterKind::Local;
        ConnectRequest {
            address: c.address.clone(),
            timeout: Some(c.timeout.as_secs_f64()),
            tls: c.tls.clone(),
            cluster: c.cluster.clone(),
            n_workers: c.n_workers,
            threads_per_worker: if local { c.threads_per_worker } else { None },
            memory_limit: if local { c.memory_limit.clone() } else { None },
            worker_resources: if local {
                c.resources.clone().map(WorkerResources::Uniform)
            } else {
                None
            },
            allowed_failures: Some(c.allowed_failures),
            // An existing scheduler without workers would make the run wait forever.
            wait_for_workers: (c.kind() == ClusterKind::Existing).then_some(1),
        }
    }

    async fn connect(&self, bridge: &Bridge) -> Result<ConnectedInfo, ExecutorError> {
        bridge.connect(&self.connect_request()).await.map_err(|e| match e {
            BridgeError::SchedulerUnreachable { .. } => {
                let address = self.config.address.clone().unwrap_or_default();
                let dashboard_hint = if address.ends_with(":8787") {
                    " Port 8787 is usually the Dask dashboard; the scheduler listens on 8786 by default (`tcp://host:8786`)."
                } else {
                    ""
                };
                ExecutorError::Engine(format!(
                    "dask executor: {e}. Check that `dask scheduler` is running there and reachable from this machine, or \
                     raise `timeout`.{dashboard_hint}"
                ))
            }
            BridgeError::Remote { ref kind, .. } if kind == "workers_timeout" => ExecutorError::Engine(format!(
                "dask executor: {e}. Start workers with `dask worker {}`.",
                self.config.address.as_deref().unwrap_or("<scheduler address>")
            )),
            e => engine(&format!("cannot connect to {}", self.config.describe_cluster()), e),
        })
    }

    async fn drive(
        &self,
        ctx: &ExecutionContext,
        bridge: &Bridge,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<BridgeMessage>,
    ) -> Result<Summary, ExecutorError> {
        let env = &ctx.env;
        let plan = env.plan.clone();
        let connect_started = Instant::now();
        let connected = self.connect(bridge).await?;
        let info = bridge.info();
        env.events.emit(
            None,
            Level::Info,
            format!(
                "dask executor: {} scheduler {} with {} worker(s){}",
                if connected.created_cluster {
                    "started"
                } else {
                    "connected to"
                },
                connected.scheduler,
                connected.workers.len(),
                connected
                    .dashboard
                    .as_deref()
                    .map(|d| format!(", dashboard {d}"))
                    .unwrap_or_default()
            ),
            EventKind::EngineEvent {
                details: json!({
                    "scheduler": connected.scheduler,
                    "dashboard": connected.dashboard,
                    "created_cluster": connected.created_cluster,
                    "workers": connected.workers,
                    "python": info.executable,
                    "dask": info.dask,
                    "distributed": info.distributed,
                    "connect_ms": connect_started.elapsed().as_millis() as u64,
                }),
            },
        );
        let adaptive = self
            .config
            .cluster
            .as_ref()
            .is_some_and(|c| c.adapt.is_some());
        if !adaptive {
            unsatisfiable_resources(&plan, &connected.workers).map_err(ExecutorError::Engine)?;
        }

        let executable = match &self.config.executable {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .map_err(|e| ExecutorError::Engine(format!("dask executor: cannot locate this binary for the workers: {e}; set `executable:`")))?,
        };
        let command0 = if self.config.ship_binary {
            let started = Instant::now();
            let uploaded = bridge
                .upload_binary(&executable, None)
                .await
                .map_err(|e| engine("cannot ship the binary to the workers", e))?;
            env.events.emit(
                None,
                Level::Info,
                format!("dask executor: shipped {} (sha256 {}) to the workers", executable.display(), &uploaded.sha256[..12]),
                EventKind::EngineEvent {
                    details: json!({"sha256": uploaded.sha256, "worker_paths": uploaded.worker_paths, "upload_ms": started.elapsed().as_millis() as u64}),
                },
            );
            uploaded.command0
        } else {
            executable.display().to_string()
        };

        let priorities = if self.config.critical_path_priority {
            critical_path(&plan)
        } else {
            vec![0; plan.steps.len()]
        };
        // Workers on this machine run in our working directory, so relative paths in
        // config (storage base_dir) mean the same thing in the step processes.
        let cwd = (!self.config.is_remote())
            .then(|| std::env::current_dir().ok())
            .flatten();
        let log_dir = ctx.home.join("logs").join(&env.run_id);
        let mut run = Run {
            executor: self,
            ctx,
            bridge,
            inflight: HashMap::new(),
            to_release: Vec::new(),
        };
        let mut scheduler = Scheduler::new(&plan, env.events.clone(), None);
        let topic = format!("solidflow-{}", env.run_id);
        let mut step_env = self.config.env.clone();
        for name in &self.config.forward_env {
            if let Ok(value) = std::env::var(name) {
                step_env.insert(name.clone(), value);
            }
        }

        loop {
            if ctx.cancel.is_canceled() {
                run.cancel(&mut scheduler, rx).await;
                return Ok(scheduler.summary());
            }
            // Every step that is ready now goes out in one batch of submits.
            let mut steps = Vec::new();
            let mut requests = Vec::new();
            while let Some((step, attempt)) = scheduler.next() {
                let s = &plan.steps[step];
                let key = StepKey::dask_key(&s.key, &env.run_id, attempt);
                let invocation = StepInvocation {
                    protocol: PROTOCOL_VERSION,
                    run_id: env.run_id.clone(),
                    pipeline: env.pipeline.name().to_string(),
                    mode: env.config.mode.clone(),
                    step_key: s.key.clone(),
                    attempt,
                    run_config: env.config.value.clone(),
                    home: ctx.home.clone(),
                    input_runs: s.input_runs(),
                };
                let mut request = SubmitRequest::new(
                    key.clone(),
                    vec![command0.clone(), "step".into()],
                    topic.clone(),
                );
                request.stdin = serde_json::to_string(&invocation).expect("invocations serialize");
                request.env = step_env.clone();
                request.cwd = cwd.clone();
                request.resources = s.required_resources.clone();
                request.priority = priorities[step];
                // Step mode makes itself die with the worker process (PR_SET_PDEATHSIG)
                // when it finds the worker's pid here, so the bridge can start it
                // without a preexec_fn (vfork instead of fork: ~10 ms less per step).
                request.parent_pid_env = Some(PARENT_PID_ENV.to_string());
                request.log_files = BTreeMap::from([
                    (
                        "stdout".to_string(),
                        log_dir.join(format!("{}.stdout.jsonl", s.key)),
                    ),
                    (
                        "stderr".to_string(),
                        log_dir.join(format!("{}.stderr.log", s.key)),
                    ),
                ]);
                run.inflight.insert(
                    key,
                    InFlight {
                        step,
                        attempt,
                        worker: None,
                        pid: 0,
                        result: None,
                        seen: HashSet::new(),
                    },
                );
                steps.push(step);
                requests.push(request);
            }
            if !requests.is_empty() {
                let results = bridge.submit_many(&requests).await;
                for ((step, request), result) in steps.into_iter().zip(&requests).zip(results) {
                    let Err(e) = result else { continue };
                    if matches!(e, BridgeError::BridgeDied { .. }) {
                        return Err(engine("the Dask bridge died", e));
                    }
                    run.inflight.remove(&request.key);
                    let error = ErrorInfo {
                        message: format!("could not submit {} to Dask: {e}", request.key),
                        causes: vec![],
                        kind: "error".into(),
                        location: None,
                    };
                    scheduler.failed(step, error, None);
                }
            }
            if scheduler.is_finished() {
                break;
            }
            let wait = scheduler
                .next_wakeup()
                .map_or(Duration::from_millis(50), |t| {
                    t.saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(50))
                });
            let first = tokio::select! {
                msg = rx.recv() => Some(msg),
                _ = tokio::time::sleep(wait) => None,
            };
            let mut batch = Vec::new();
            if let Some(msg) = first {
                batch.push(msg.ok_or_else(|| {
                    ExecutorError::Engine("dask executor: the Dask bridge went away".into())
                })?);
                while let Ok(msg) = rx.try_recv() {
                    batch.push(msg);
                }
            }
            for msg in batch {
                if let Some((step, outcome)) = run.handle(msg)? {
                    match outcome {
                        Outcome::Succeeded => scheduler.succeeded(step),
                        Outcome::Failed(error, retry) => {
                            scheduler.failed(step, error, retry);
                        }
                    }
                }
            }
            run.release(false).await;
        }
        run.release(true).await;
        Ok(scheduler.summary())
    }
}

impl Run<'_> {
    /// Releases finished keys from the bridge in batches (or all, at the end).
    async fn release(&mut self, all: bool) {
        if self.to_release.len() >= RELEASE_BATCH || (all && !self.to_release.is_empty()) {
            let keys = std::mem::take(&mut self.to_release);
            let _ = self.bridge.release(&keys).await;
        }
    }

    /// Ctrl-C: cancel every running task (killing its process on the worker), wait
    /// for them to end, and mark the unfinished steps interrupted.
    async fn cancel(
        &mut self,
        scheduler: &mut Scheduler<'_>,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<BridgeMessage>,
    ) {
        let keys: Vec<String> = self.inflight.keys().cloned().collect();
        if !keys.is_empty() {
            self.ctx.env.events.emit(
                None,
                Level::Warning,
                format!(
                    "dask executor: canceling {} running step(s) on the cluster",
                    keys.len()
                ),
                EventKind::EngineEvent {
                    details: json!({"dask_keys": keys}),
                },
            );
            if let Err(e) = self.bridge.cancel(&keys, CANCEL_GRACE).await {
                tracing::warn!(target: "solidflow::dask", "canceling Dask tasks: {e}");
            }
        }
        let mut interrupted = Vec::new();
        let deadline = tokio::time::Instant::now() + CANCEL_GRACE + Duration::from_secs(8);
        while !self.inflight.is_empty() {
            let Ok(Some(msg)) = tokio::time::timeout_at(deadline, rx.recv()).await else {
                break;
            };
            match self.handle(msg) {
                Ok(Some((step, Outcome::Succeeded))) => scheduler.succeeded(step),
                Ok(Some((step, Outcome::Failed(..)))) => interrupted.push(step),
                Ok(None) => {}
                Err(_) => break,
            }
        }
        interrupted.extend(self.inflight.drain().map(|(_, f)| f.step));
        scheduler.cancel(&interrupted);
    }
}
