//! Running a pipeline: validate config, compile the plan, record the run, execute, and
//! report. This is the programmatic API behind `execute`, mirroring the seed's
//! `execute_pipeline(pipeline, env_config)`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::cancel::CancelToken;
use super::event::{ErrorInfo, Event, EventKind, Level};
use super::executor::{ExecutionContext, Executor, ExecutorError};
use super::reexecution::{self, ParentRun, ReexecutionError, StepsToRun};
use super::run_id::RunId;
use super::sink::{EventCollector, EventListener, EventSink};
use super::step::StepEnvironment;
use super::values::ValueStore;
use crate::config::{ConfigErrors, ConfigSources, RunConfig};
use crate::definition::pipeline::Pipeline;
use crate::definition::storage::StorageContext;
use crate::plan::ExecutionPlan;
use crate::storage::run_history::{HistoryError, RunHistory, RunRecord, RunStatus};
use crate::storage::{IntermediateKey, IntermediateStorage, StorageError};

/// The solidflow home: `$SOLIDFLOW_HOME`, else `~/.solidflow`. Holds run history and
/// the default filesystem storage.
pub fn solidflow_home() -> PathBuf {
    if let Some(home) = std::env::var_os("SOLIDFLOW_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(".solidflow")
}

/// Why a run could not start. Step failures are not errors: they are in the result.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The run config is invalid (every problem is listed).
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    /// The chosen executor or storage cannot run this plan.
    #[error("cannot run pipeline `{pipeline}`: {message}")]
    Setup {
        /// The pipeline.
        pipeline: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// Run history refused the run (its run id is taken) or could not be used.
    #[error(transparent)]
    History(#[from] HistoryError),
    /// The parent run cannot be re-executed, or the step selection is unusable.
    #[error("cannot run pipeline `{pipeline}`: {source}")]
    Reexecution {
        /// The pipeline.
        pipeline: String,
        /// What is wrong.
        #[source]
        source: ReexecutionError,
    },
}

/// Options for [`execute_pipeline_with`].
#[derive(Default)]
pub struct RunOptions {
    /// Use this run id instead of a fresh UUID.
    pub run_id: Option<String>,
    /// The mode (the pipeline's first mode if `None`).
    pub mode: Option<String>,
    /// The solidflow home (default [`solidflow_home`]).
    pub home: Option<PathBuf>,
    /// Extra event listeners (console, live subscribers).
    pub listeners: Vec<Arc<dyn EventListener>>,
    /// Run history to record into (none by default for the programmatic API).
    pub history: Option<RunHistory>,
    /// Cancellation token, e.g. set by a Ctrl-C handler.
    pub cancel: CancelToken,
    /// The run this one re-executes (needs `history`). Its validated config is the
    /// base the run's config sources merge over, and the steps that are not run read
    /// their outputs from it.
    pub parent_run_id: Option<String>,
    /// Which steps to run: all (the default), a selection, or (with a parent) the
    /// steps that did not succeed in the parent.
    pub steps: StepsToRun,
    /// Tags recorded with the run (`execute --tag team=ml`).
    pub tags: BTreeMap<String, String>,
}

/// The outcome of a run: status, events, and typed access to outputs.
pub struct ExecutionResult {
    status: RunStatus,
    events: Vec<Event>,
    env: StepEnvironment,
    reused: BTreeMap<String, String>,
}

/// An output could not be read from a finished run.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// No such solid or output in the pipeline.
    #[error("pipeline has no output `{output}` on solid `{solid}`")]
    Unknown {
        /// The solid.
        solid: String,
        /// The output.
        output: String,
    },
    /// The requested Rust type differs from the output's type.
    #[error("output `{solid}.{output}` is a {actual}, not a {requested}")]
    WrongType {
        /// The solid.
        solid: String,
        /// The output.
        output: String,
        /// Its type.
        actual: &'static str,
        /// The type asked for.
        requested: &'static str,
    },
    /// The value was not produced (the step failed or was skipped) or cannot be read.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl ExecutionResult {
    /// Whether every step succeeded.
    pub fn success(&self) -> bool {
        self.status == RunStatus::Success
    }

    /// The final status.
    pub fn status(&self) -> RunStatus {
        self.status
    }

    /// The run id.
    pub fn run_id(&self) -> &str {
        &self.env.run_id
    }

    /// The compiled plan.
    pub fn plan(&self) -> &ExecutionPlan {
        &self.env.plan
    }

    /// Every event of the run, in order.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// The events of one step (`<alias>.compute`).
    pub fn step_events<'a>(&'a self, step_key: &'a str) -> impl Iterator<Item = &'a Event> + 'a {
        self.events
            .iter()
            .filter(move |e| e.step_key.as_deref() == Some(step_key))
    }

    /// The `result` output of solid `solid`.
    pub fn result<T: Clone + Send + Sync + 'static>(&self, solid: &str) -> Result<T, OutputError> {
        self.output(solid, crate::definition::solid::DEFAULT_OUTPUT)
    }

    /// Output `output` of solid `solid`, read from memory or storage.
    pub fn output<T: Clone + Send + Sync + 'static>(
        &self,
        solid: &str,
        output: &str,
    ) -> Result<T, OutputError> {
        let unknown = || OutputError::Unknown {
            solid: solid.into(),
            output: output.into(),
        };
        let inv = self.env.pipeline.invocation(solid).ok_or_else(unknown)?;
        let def = inv.definition.find_output(output).ok_or_else(unknown)?;
        if def.ty.name != std::any::type_name::<T>() {
            return Err(OutputError::WrongType {
                solid: solid.into(),
                output: output.into(),
                actual: def.ty.name,
                requested: std::any::type_name::<T>(),
            });
        }
        let step_key = crate::plan::step_key(solid);
        // A step this run reused (did not re-run) has its value in an earlier run.
        let run_id = match self.reused.get(&step_key) {
            Some(run) if self.env.plan.step(&step_key).is_none() => run.as_str(),
            _ => self.env.run_id.as_str(),
        };
        let memory = self
            .env
            .memory
            .as_ref()
            .filter(|_| run_id == self.env.run_id);
        let value = match memory {
            Some(mem) => mem
                .get(&step_key, output)
                .ok_or_else(|| StorageError::NotFound {
                    location: format!(
                        "memory://{}/intermediates/{step_key}/{output}",
                        self.env.run_id
                    ),
                })?,
            None => {
                let key = IntermediateKey::new(run_id, &step_key, output);
                let reader = self.env.storage.read(&key)?;
                def.ty.decode(reader).map_err(|source| StorageError::Io {
                    operation: "decode",
                    location: self.env.storage.location(&key),
                    source,
                })?
            }
        };
        Ok(value
            .downcast_ref::<T>()
            .expect("type checked above")
            .clone())
    }
}

/// Runs `pipeline` with run config given as a JSON/YAML-shaped value, in the default
/// mode, without run history. The seed's `execute_pipeline(pipeline, env_config)`.
///
/// ```
/// use solidflow::prelude::*;
///
/// #[solid]
/// fn hello_world(_ctx: &SolidContext) -> String { "Hello, World!".to_string() }
///
/// let pipeline = Pipeline::build("dask_pipeline", |p| { p.invoke(hello_world, ()); }).unwrap();
/// let result = execute_pipeline(&pipeline, serde_json::json!({"storage": {"in_memory": {}}})).unwrap();
/// assert!(result.success());
/// assert_eq!(result.result::<String>("hello_world").unwrap(), "Hello, World!");
/// ```
pub fn execute_pipeline(
    pipeline: &Pipeline,
    config: serde_json::Value,
) -> Result<ExecutionResult, RunError> {
    execute_pipeline_with(
        pipeline,
        &ConfigSources::from_value(config),
        RunOptions::default(),
    )
}

/// Runs `pipeline` with merged config sources and options. Returns `Err` only when the
/// run cannot start (bad config, unusable executor or storage, a parent that cannot be
/// re-executed, a selection that leaves an input without a value); step failures are
/// in the result.
///
/// With [`RunOptions::parent_run_id`] the run re-executes a recorded run: `sources`
/// merge over the parent's config, and the steps [`RunOptions::steps`] does not run
/// read their outputs from the parent's intermediates. Tags go with the run record.
///
/// ```
/// use solidflow::prelude::*;
/// use solidflow::execution::reexecution::StepsToRun;
/// use solidflow::storage::run_history::RunHistory;
///
/// #[solid]
/// fn extract(_ctx: &SolidContext) -> i64 { 20 }
/// #[solid]
/// fn double(_ctx: &SolidContext, n: i64) -> i64 { n * 2 }
///
/// let pipeline = Pipeline::build("p", |p| {
///     let n = p.invoke(extract, ());
///     p.invoke(double, (n,));
/// })
/// .unwrap();
/// let home = tempfile::tempdir().unwrap();
/// let history = RunHistory::open(&home.path().join("history.db")).unwrap();
/// let options = || RunOptions {
///     home: Some(home.path().to_path_buf()),
///     history: Some(history.clone()),
///     ..RunOptions::default()
/// };
/// let filesystem = ConfigSources::from_value(serde_json::json!({"storage": {"filesystem": {}}}));
/// let first = execute_pipeline_with(&pipeline, &filesystem, options()).unwrap();
///
/// // Run `double` again, reading `extract`'s output from the first run.
/// let again = execute_pipeline_with(
///     &pipeline,
///     &ConfigSources::empty(),
///     RunOptions {
///         parent_run_id: Some(first.run_id().to_string()),
///         steps: StepsToRun::Selection("double".into()),
///         tags: [("reason".to_string(), "demo".to_string())].into(),
///         ..options()
///     },
/// )
/// .unwrap();
/// assert!(again.success());
/// assert_eq!(again.step_events("extract.compute").count(), 0, "not re-run");
/// assert_eq!(again.result::<i64>("double").unwrap(), 40);
/// assert_eq!(again.result::<i64>("extract").unwrap(), 20, "read from the first run");
/// let record = history.run(again.run_id()).unwrap().unwrap();
/// assert_eq!(record.parent_run_id.as_deref(), Some(first.run_id()));
/// assert_eq!(record.tags["reason"], "demo");
/// ```
pub fn execute_pipeline_with(
    pipeline: &Pipeline,
    sources: &ConfigSources,
    options: RunOptions,
) -> Result<ExecutionResult, RunError> {
    PreparedRun::new(pipeline, sources, &options)?.execute(options)
}

/// A run that passed every check `execute` makes before it starts: config validated,
/// run id checked, plan compiled, storage and executor built, and the executor's
/// [`check`](super::executor::Executor::check) passed. `plan` stops here, so a config
/// that `plan` accepts is never refused by `execute`; `execute` goes on with
/// [`execute`](Self::execute), validating and compiling nothing twice.
pub struct PreparedRun {
    pipeline: Arc<Pipeline>,
    config: Arc<RunConfig>,
    plan: Arc<ExecutionPlan>,
    storage: Arc<dyn IntermediateStorage>,
    executor: Arc<dyn Executor>,
    home: PathBuf,
    run_id: String,
    parent: Option<ParentRun>,
    reused: BTreeMap<String, String>,
    warnings: Vec<String>,
}

impl PreparedRun {
    /// Validates `sources` for `pipeline` in `options.mode`, checks `options.run_id`,
    /// compiles the plan, builds storage and executor from their config blocks (without
    /// touching the network or the disk) and runs the executor's checks.
    pub fn new(
        pipeline: &Pipeline,
        sources: &ConfigSources,
        options: &RunOptions,
    ) -> Result<Self, RunError> {
        let parent = Self::parent(pipeline, options)?;
        let Some(parent) = parent else {
            let config = RunConfig::validate(pipeline, options.mode.as_deref(), sources)?;
            return Self::build(pipeline, config, options, None);
        };
        let layered = sources.layered_over(parent.record.config.clone());
        let mode = options.mode.as_deref().unwrap_or(&parent.record.mode);
        let config = RunConfig::validate(pipeline, Some(mode), &layered)?;
        Self::build(pipeline, config, options, Some(parent))
    }

    fn parent(pipeline: &Pipeline, options: &RunOptions) -> Result<Option<ParentRun>, RunError> {
        let Some(id) = &options.parent_run_id else {
            return Ok(None);
        };
        reexecution::load_parent(options.history.as_ref(), pipeline, id)
            .map(Some)
            .map_err(|source| RunError::Reexecution {
                pipeline: pipeline.name().into(),
                source,
            })
    }

    /// Like [`new`](Self::new), for a config that is already validated (with a parent
    /// run, `config` is used as is: it is not merged over the parent's).
    pub fn from_config(
        pipeline: &Pipeline,
        config: RunConfig,
        options: &RunOptions,
    ) -> Result<Self, RunError> {
        let parent = Self::parent(pipeline, options)?;
        Self::build(pipeline, config, options, parent)
    }

    fn build(
        pipeline: &Pipeline,
        config: RunConfig,
        options: &RunOptions,
        parent: Option<ParentRun>,
    ) -> Result<Self, RunError> {
        let reexecution_error = |source| RunError::Reexecution {
            pipeline: pipeline.name().into(),
            source,
        };
        let setup = |message: String| RunError::Setup {
            pipeline: pipeline.name().into(),
            message,
        };
        let run_id: String = match &options.run_id {
            Some(id) => RunId::parse(id).map_err(|e| setup(e.to_string()))?.into(),
            None => RunId::fresh().into(),
        };
        if let (Some(h), Some(_)) = (&options.history, &options.run_id)
            && let Some(existing) = h.run_exact(&run_id)?
        {
            return Err(RunError::History(HistoryError::RunExists {
                run_id: existing.run_id,
                pipeline: existing.pipeline,
                status: existing.status,
                started_at: existing.started_at,
            }));
        }
        let config = Arc::new(config);
        let steps = reexecution::plan_steps(
            ExecutionPlan::compile(pipeline, &config),
            &options.steps,
            parent.as_ref(),
        )
        .map_err(reexecution_error)?;
        if let Some(p) = &parent
            && !steps.reused.is_empty()
            && config.storage.name == "in_memory"
        {
            return Err(reexecution_error(ReexecutionError::InMemoryChild {
                parent: p.record.run_id.clone(),
                parent_storage: p.storage().unwrap_or("its").to_string(),
            }));
        }
        let warnings = parent
            .as_ref()
            .map(|p| reexecution::config_warnings(p, &config, &steps.reused))
            .unwrap_or_default();
        let (plan, reused) = (Arc::new(steps.plan), steps.reused);
        let mode = pipeline
            .mode(Some(&config.mode))
            .ok_or_else(|| setup(format!("no mode `{}`", config.mode)))?;
        let home = options.home.clone().unwrap_or_else(solidflow_home);
        let storage_def = mode
            .storage(&config.storage.name)
            .ok_or_else(|| setup(format!("no storage `{}`", config.storage.name)))?;
        let storage = (storage_def.build)(
            &config.storage.config,
            &StorageContext { home: home.clone() },
        )
        .map_err(|e| setup(e.to_string()))?;
        let executor_def = mode
            .executor(&config.execution.name)
            .ok_or_else(|| setup(format!("no executor `{}`", config.execution.name)))?;
        let executor =
            (executor_def.build)(&config.execution.config).map_err(|e| setup(e.to_string()))?;
        let prepared = Self {
            pipeline: Arc::new(pipeline.clone()),
            config,
            plan,
            storage,
            executor,
            home,
            run_id,
            parent,
            reused,
            warnings,
        };
        // Checks look at the plan, config and storage only: no listener hears this sink.
        let probe = prepared.context(
            EventSink::new(&prepared.run_id, pipeline.name(), vec![]),
            CancelToken::new(),
        );
        prepared
            .executor
            .check(&probe)
            .map_err(|e| setup(e.to_string()))?;
        Ok(prepared)
    }

    /// The validated run config, defaults filled in.
    pub fn config(&self) -> &RunConfig {
        &self.config
    }

    /// The compiled plan.
    pub fn plan(&self) -> &ExecutionPlan {
        &self.plan
    }

    /// The steps not run whose outputs are read from earlier runs (step key → run id).
    pub fn reused(&self) -> &BTreeMap<String, String> {
        &self.reused
    }

    /// Warnings about the run as prepared (config changed on steps that are not
    /// re-run); also emitted as `ENGINE_EVENT`s when it starts.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The run id the run will have (`options.run_id`, or a fresh one).
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    fn context(&self, events: EventSink, cancel: CancelToken) -> ExecutionContext {
        let memory = (self.executor.in_process() && self.config.storage.name == "in_memory")
            .then(|| Arc::new(ValueStore::new()));
        let env = StepEnvironment {
            run_id: self.run_id.clone(),
            pipeline: self.pipeline.clone(),
            plan: self.plan.clone(),
            config: self.config.clone(),
            storage: self.storage.clone(),
            memory,
            events,
        };
        ExecutionContext {
            env,
            cancel,
            home: self.home.clone(),
        }
    }

    /// Records the run (when `options.history` is set), executes every step and reports.
    /// `options.run_id`, `mode` and `home` were used by [`new`](Self::new); the
    /// listeners, history, cancel token and parent run are used here.
    pub fn execute(self, options: RunOptions) -> Result<ExecutionResult, RunError> {
        let pipeline = self.pipeline.clone();
        let config = self.config.clone();
        let plan = self.plan.clone();
        let run_id = self.run_id.clone();
        let collector = EventCollector::default();
        let mut listeners: Vec<Arc<dyn EventListener>> = vec![Arc::new(collector.clone())];
        if let Some(h) = &options.history {
            listeners.push(Arc::new(h.clone()));
        }
        listeners.extend(options.listeners.iter().cloned());
        let events = EventSink::new(&run_id, pipeline.name(), listeners);
        let ctx = self.context(events.clone(), options.cancel.clone());
        let env = ctx.env.clone();
        let executor = self.executor;
        reexecution::check_reused_outputs(&plan, &*self.storage).map_err(|source| {
            RunError::Reexecution {
                pipeline: pipeline.name().into(),
                source,
            }
        })?;
        if let Some(h) = &options.history {
            let mut record = RunRecord::new(
                run_id.clone(),
                pipeline.name(),
                config.mode.clone(),
                config.value.clone(),
            );
            record.parent_run_id = self.parent.as_ref().map(|p| p.record.run_id.clone());
            record.root_run_id = self.parent.as_ref().map(ParentRun::root_run_id);
            record.tags = options.tags.clone();
            h.create_run_reusing(&record, &self.reused)?;
        }
        let _heartbeat = options.history.as_ref().map(|h| h.start_heartbeat(&run_id));
        let started = Instant::now();
        events.emit(
            None,
            Level::Info,
            format!(
                "started run {run_id} of {} on {} with {} storage",
                pipeline.name(),
                config.execution.name,
                config.storage.name
            ),
            EventKind::PipelineStart {
                executor: config.execution.name.clone(),
                storage: config.storage.name.clone(),
                steps: plan.steps.len(),
            },
        );
        if let Some(parent) = &self.parent {
            events.emit(
                None,
                Level::Info,
                format!(
                    "re-executing run {}: {} step(s) to run, {} reused from earlier runs",
                    parent.record.run_id,
                    plan.steps.len(),
                    self.reused.len()
                ),
                EventKind::EngineEvent {
                    details: serde_json::json!({
                        "parent_run_id": parent.record.run_id,
                        "root_run_id": parent.root_run_id(),
                        "steps_to_run": plan.steps.len(),
                        "steps_reused": self.reused.len(),
                    }),
                },
            );
        }
        for warning in &self.warnings {
            events.emit(
                None,
                Level::Warning,
                warning.clone(),
                EventKind::EngineEvent {
                    details: serde_json::json!({"warning": "config_changed_on_reused_step"}),
                },
            );
        }
        let outcome = env
            .storage
            .preflight()
            .map_err(|e| ExecutorError::Engine(e.to_string()))
            .and_then(|()| executor.execute(&ctx));
        let duration_ms = started.elapsed().as_millis() as u64;
        let status = match outcome {
            Ok(summary) if summary.canceled || ctx.cancel.is_canceled() => {
                events.emit(
                    None,
                    Level::Error,
                    "run canceled",
                    EventKind::PipelineCanceled { duration_ms },
                );
                RunStatus::Canceled
            }
            Ok(summary) if summary.failed.is_empty() && summary.skipped.is_empty() => {
                events.emit(
                    None,
                    Level::Info,
                    format!("run succeeded in {duration_ms} ms"),
                    EventKind::PipelineSuccess { duration_ms },
                );
                RunStatus::Success
            }
            Ok(summary) => {
                events.emit(
                    None,
                    Level::Error,
                    format!(
                        "run failed: {} step(s) failed, {} skipped",
                        summary.failed.len(),
                        summary.skipped.len()
                    ),
                    EventKind::PipelineFailure {
                        duration_ms,
                        failed_steps: summary.failed,
                        error: None,
                    },
                );
                RunStatus::Failure
            }
            Err(e) => {
                let error = ErrorInfo {
                    message: e.to_string(),
                    causes: vec![],
                    kind: "engine".into(),
                    location: None,
                };
                events.emit(
                    None,
                    Level::Error,
                    format!("run failed: {e}"),
                    EventKind::PipelineFailure {
                        duration_ms,
                        failed_steps: vec![],
                        error: Some(error),
                    },
                );
                RunStatus::Failure
            }
        };
        if let Some(h) = &options.history {
            h.flush();
        }
        Ok(ExecutionResult {
            status,
            events: collector.take(),
            env,
            reused: self.reused,
        })
    }
}
