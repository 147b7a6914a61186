//! One run on Dask: start the bridge, connect to the cluster, ship the binary if
//! asked, then hand the plan to the shared run loop with the [`DaskLauncher`].
//!
//! [`DaskLauncher`]: super::launcher::DaskLauncher

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::runtime::Runtime;
use tokio::sync::mpsc::UnboundedReceiver;

use super::DaskExecutor;
use super::bridge::{
    Bridge, BridgeError, BridgeMessage, BridgeOptions, ClusterKind, ConnectRequest, ConnectedInfo,
    ErrorKind, WarmTask, WorkerResources,
};
use super::launcher::{DaskLauncher, TaskTemplate};
use super::placement::{critical_path, unsatisfiable_resources};
use crate::execution::event::{EventKind, Level};
use crate::execution::launcher::{RunOptions, run_steps};
use crate::execution::scheduler::Summary;
use crate::execution::step::StepEnvironment;
use crate::execution::step_server::IN_SERVER_ENV;
use crate::executor::{ExecutionContext, ExecutorError, Isolation};

/// How long canceled steps get between SIGTERM and SIGKILL on the workers.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

fn engine(what: &str, e: BridgeError) -> ExecutorError {
    ExecutorError::Engine(format!("dask executor: {what}: {e}"))
}

impl DaskExecutor {
    /// Runs the plan: the bridge's I/O on `runtime`'s worker thread, the run loop on
    /// this one.
    pub(super) fn run(
        &self,
        ctx: &ExecutionContext,
        runtime: &Runtime,
    ) -> Result<Summary, ExecutorError> {
        let options = BridgeOptions {
            python: self.config.python.clone(),
            startup_timeout: self.config.timeout.max(Duration::from_secs(5)),
            package_root: ctx.home.join("bridge"),
            ..BridgeOptions::default()
        };
        let (bridge, messages) = runtime
            .block_on(Bridge::spawn(options))
            .map_err(|e| engine("cannot start the Dask bridge", e))?;
        let result = self.drive(ctx, runtime, &bridge, messages);
        // Always: kill our steps, close the client and a cluster we created.
        if let Err(e) = runtime.block_on(bridge.shutdown(Duration::from_secs(60))) {
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
            BridgeError::Remote {
                kind: ErrorKind::NotAScheduler,
                message,
            } => ExecutorError::Engine(format!("dask executor: {message}")),
            BridgeError::Remote {
                kind: ErrorKind::WorkersTimeout,
                ..
            } => ExecutorError::Engine(format!(
                "dask executor: {e}. Start workers with `dask worker {}`.",
                self.config.address.as_deref().unwrap_or("<scheduler address>")
            )),
            e => engine(&format!("cannot connect to {}", self.config.describe_cluster()), e),
        })
    }

    /// Makes sure the scheduler holds this build (uploading it only if it does not)
    /// and says so in an engine event; returns the `command[0]` that runs it.
    fn ship(
        &self,
        runtime: &Runtime,
        bridge: &Bridge,
        env: &StepEnvironment,
        executable: &Path,
    ) -> Result<String, ExecutorError> {
        let started = Instant::now();
        let shipped = runtime
            .block_on(bridge.upload_binary(executable, None, self.config.keep_builds))
            .map_err(|e| engine("cannot ship the binary to the workers", e))?;
        let sha = shipped.sha256.get(..12).unwrap_or(&shipped.sha256);
        let message = if shipped.cached {
            format!(
                "dask executor: build {sha} of {} is on the scheduler already; nothing uploaded",
                executable.display()
            )
        } else {
            format!(
                "dask executor: shipped {} (sha256 {sha}, {:.1} MB) to the scheduler; workers fetch it when a step first needs it",
                executable.display(),
                shipped.bytes_sent as f64 / 1e6
            )
        };
        env.events.emit(
            None,
            Level::Info,
            message,
            EventKind::EngineEvent {
                details: json!({
                    "sha256": shipped.sha256,
                    "cached": shipped.cached,
                    "bytes_sent": shipped.bytes_sent,
                    "kept": shipped.kept,
                    "evicted": shipped.evicted,
                    "worker_paths": shipped.worker_paths,
                    "upload_ms": started.elapsed().as_millis() as u64,
                }),
            },
        );
        Ok(shipped.command0)
    }

    /// Connects, ships the binary if asked, and runs the plan through the shared loop.
    fn drive(
        &self,
        ctx: &ExecutionContext,
        runtime: &Runtime,
        bridge: &Bridge,
        messages: UnboundedReceiver<BridgeMessage>,
    ) -> Result<Summary, ExecutorError> {
        let env = &ctx.env;
        let plan = env.plan.clone();
        let connect_started = Instant::now();
        let connected = runtime.block_on(self.connect(bridge))?;
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
            self.ship(runtime, bridge, env, &executable)?
        } else {
            executable.display().to_string()
        };

        let priorities = if self.config.critical_path_priority {
            critical_path(&plan)
        } else {
            vec![0; plan.steps.len()]
        };
        let mut step_env = self.config.env.clone();
        for name in &self.config.forward_env {
            if let Ok(value) = std::env::var(name) {
                step_env.insert(name.clone(), value);
            }
        }
        if self.config.isolation == Isolation::InServer {
            // The worker's step servers (started with the task's environment) then
            // run each step themselves.
            step_env.insert(IN_SERVER_ENV.to_string(), "1".to_string());
        }
        let template = TaskTemplate {
            command0,
            env: step_env,
            // Workers on this machine run in our working directory, so relative paths in
            // config (storage base_dir) mean the same thing in the step processes.
            cwd: (!self.config.is_remote())
                .then(|| std::env::current_dir().ok())
                .flatten(),
            log_dir: ctx.home.join("logs").join(&env.run_id),
            priorities,
            allowed_failures: self.config.allowed_failures,
            warm: self.config.isolation.is_warm().then_some(WarmTask {
                max_steps: self.config.max_steps_per_server,
                max_rss_mb: self.config.max_server_rss_mb,
            }),
        };
        let mut launcher = DaskLauncher::new(runtime, bridge, messages, env, template);
        let options = RunOptions {
            // Dask places every ready step wherever there is room.
            max_running: None,
            resources: None,
            grace: CANCEL_GRACE,
        };
        run_steps(env, &ctx.cancel, &ctx.home, &mut launcher, options)
            .map_err(ExecutorError::Engine)
    }
}
