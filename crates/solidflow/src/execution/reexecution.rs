//! Re-execution: a new run of a recorded run, and step selection for any run.
//!
//! A re-execution reuses its parent's validated config (extra config merges on top),
//! runs the steps chosen by [`StepsToRun`] and reads the outputs of the other steps
//! from the parent's intermediates, in place: the plan's inputs name the run that holds
//! each value ([`StepInputSource::Step::run_id`](crate::plan::StepInputSource::Step)),
//! and the step invocation of out-of-process executors carries it. The new run records
//! `parent_run_id`, `root_run_id` and which steps it reused, so re-executing it again
//! still finds every output. The CLI's `reexecute` and
//! [`RunOptions`](super::run::RunOptions) both go through here.

use std::collections::BTreeMap;

use crate::config::RunConfig;
use crate::definition::pipeline::Pipeline;
use crate::plan::selection::{SelectionError, StepSelection};
use crate::plan::{ExecutionPlan, StepInputSource, UnprovidedInputs};
use crate::storage::run_history::{HistoryError, RunHistory, RunRecord, RunStatus};
use crate::storage::{IntermediateKey, IntermediateStorage, StorageError};

/// Which steps of the plan a run executes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StepsToRun {
    /// Every step (for a re-execution: recompute everything, reuse nothing).
    #[default]
    All,
    /// The steps a selection in Dagster's syntax picks (`*load`, `a+,b`, `branch_*`;
    /// see [`crate::plan::selection`]). With a parent run, inputs from unselected steps
    /// are read from it.
    Selection(String),
    /// Needs a parent run: the steps that did not succeed there (failed, skipped,
    /// canceled, cut off when its process died, or never started) and everything
    /// downstream of them.
    FromFailure,
}

/// The recorded run being re-executed, with where each of its steps' outputs are.
#[derive(Debug, Clone)]
pub struct ParentRun {
    /// Its record.
    pub record: RunRecord,
    /// Step key → run whose intermediates hold that step's outputs.
    pub outputs: BTreeMap<String, String>,
}

impl ParentRun {
    /// The root of the lineage a child of this run belongs to.
    pub fn root_run_id(&self) -> String {
        self.record
            .root_run_id
            .clone()
            .unwrap_or_else(|| self.record.run_id.clone())
    }

    /// The storage the parent kept its intermediates in (`filesystem`, `s3`, ...).
    pub fn storage(&self) -> Option<&str> {
        self.record
            .config
            .get("storage")
            .and_then(|s| s.as_object())
            .and_then(|s| s.keys().next())
            .map(String::as_str)
    }
}

/// Why a run cannot re-execute its parent or run its selection. Nothing was recorded.
#[derive(Debug, thiserror::Error)]
pub enum ReexecutionError {
    /// Re-execution looks the parent up in run history, and there is none.
    #[error(
        "re-executing run `{0}` needs run history: set `RunOptions::history` (the CLI uses $SOLIDFLOW_HOME/history.db)"
    )]
    NoHistory(String),
    /// The parent is not in run history.
    #[error("no run `{run_id}` in run history {path}; `runs` lists the recorded runs")]
    UnknownRun {
        /// The id asked for.
        run_id: String,
        /// The history database.
        path: String,
    },
    /// The parent ran another pipeline.
    #[error(
        "run `{run_id}` is a run of pipeline `{parent}`, not of `{pipeline}`; re-execute it as a run of `{parent}`"
    )]
    OtherPipeline {
        /// The parent.
        run_id: String,
        /// The parent's pipeline.
        parent: String,
        /// The pipeline asked to run.
        pipeline: String,
    },
    /// The parent kept its outputs in memory, which ended with its process.
    #[error(
        "run `{0}` used `in_memory` storage, so its intermediates ended with its process and cannot be reused; run with filesystem or s3 storage (`storage: {{filesystem: {{}}}}`) to be able to re-execute, or start afresh with `execute`"
    )]
    InMemoryParent(String),
    /// The parent is still running.
    #[error(
        "run `{run_id}` is still running (process {pid} on host {host}); wait for it to end or cancel it, then re-execute it"
    )]
    StillRunning {
        /// The parent.
        run_id: String,
        /// Its host.
        host: String,
        /// Its pid.
        pid: String,
    },
    /// `FromFailure` without a parent.
    #[error("--from-failure re-executes a recorded run: use `reexecute <run-id> --from-failure`")]
    FromFailureWithoutParent,
    /// Nothing failed in the parent.
    #[error(
        "run `{0}` has no failed, skipped or unfinished step, so --from-failure has nothing to run; use --all or --select"
    )]
    NothingFailed(String),
    /// The selection selects nothing... or cannot be parsed.
    #[error(transparent)]
    Selection(#[from] SelectionError),
    /// Selected steps need inputs no run provides.
    #[error(transparent)]
    Unprovided(#[from] UnprovidedInputs),
    /// The new run keeps values in memory but must read its parent's from storage.
    #[error(
        "this run reads outputs of run `{parent}` from {parent_storage} storage, but its own storage is `in_memory`; do not override `storage` when re-executing"
    )]
    InMemoryChild {
        /// The parent.
        parent: String,
        /// The parent's storage.
        parent_storage: String,
    },
    /// A value to reuse is gone from the parent's storage.
    #[error(
        "output `{output}` of step {step_key} from run {run_id} is missing at {location}: the intermediates of run {run_id} were deleted or moved (or the storage config differs from that run's); re-execute with --all, or select {step_key} to recompute it"
    )]
    MissingIntermediate {
        /// The run that should hold it.
        run_id: String,
        /// The step that produced it.
        step_key: String,
        /// The output.
        output: String,
        /// Where it should be.
        location: String,
    },
    /// Storage failed while checking.
    #[error("cannot check the intermediates to reuse: {0}")]
    Storage(#[from] StorageError),
    /// Run history failed.
    #[error(transparent)]
    History(#[from] HistoryError),
}

/// Looks up the parent run in `history` for a re-execution of `pipeline`, refusing
/// parents that cannot be re-executed. Dead runs are marked first, so a run whose
/// process was killed is re-executable at once.
pub fn load_parent(
    history: Option<&RunHistory>,
    pipeline: &Pipeline,
    parent_run_id: &str,
) -> Result<ParentRun, ReexecutionError> {
    let history = history.ok_or_else(|| ReexecutionError::NoHistory(parent_run_id.into()))?;
    history.mark_dead_runs()?;
    let record = history
        .run_exact(parent_run_id)?
        .ok_or_else(|| ReexecutionError::UnknownRun {
            run_id: parent_run_id.into(),
            path: history.path().display().to_string(),
        })?;
    if record.pipeline != pipeline.name() {
        return Err(ReexecutionError::OtherPipeline {
            run_id: record.run_id,
            parent: record.pipeline,
            pipeline: pipeline.name().into(),
        });
    }
    if record.status == RunStatus::Started {
        return Err(ReexecutionError::StillRunning {
            run_id: record.run_id,
            host: record.host.unwrap_or_else(|| "?".into()),
            pid: record
                .pid
                .map(|p| p.to_string())
                .unwrap_or_else(|| "?".into()),
        });
    }
    let outputs = history.step_outputs(&record.run_id)?;
    let parent = ParentRun { record, outputs };
    if parent.storage() == Some("in_memory") {
        return Err(ReexecutionError::InMemoryParent(parent.record.run_id));
    }
    Ok(parent)
}

/// The plan a run executes and the steps it reuses instead (step key → run id).
#[derive(Debug, Clone)]
pub struct StepPlan {
    /// The steps to run; inputs from reused steps name the run they come from.
    pub plan: ExecutionPlan,
    /// The steps not run whose outputs are available: step key → run that holds them.
    pub reused: BTreeMap<String, String>,
}

/// Cuts `full` down to the steps `steps` chooses, reading the others from `parent`.
pub fn plan_steps(
    full: ExecutionPlan,
    steps: &StepsToRun,
    parent: Option<&ParentRun>,
) -> Result<StepPlan, ReexecutionError> {
    // Items of fan-outs a selection names (`summarize[part_3]`): alias → keys.
    let mut items = BTreeMap::new();
    let keep: Vec<bool> = match steps {
        StepsToRun::All => {
            return Ok(StepPlan {
                plan: full,
                reused: BTreeMap::new(),
            });
        }
        StepsToRun::Selection(text) => {
            let selection = StepSelection::parse(text)?;
            items = selection.items();
            selection.resolve(&full)?
        }
        StepsToRun::FromFailure => {
            let parent = parent.ok_or(ReexecutionError::FromFailureWithoutParent)?;
            let mut keep: Vec<bool> = full
                .steps
                .iter()
                .map(|s| !parent.outputs.contains_key(&s.key))
                .collect();
            // Steps are in topological order, so one pass carries the flag downstream.
            for i in 0..full.steps.len() {
                if keep[i] {
                    for &d in &full.steps[i].downstream {
                        keep[d] = true;
                    }
                }
            }
            if !keep.iter().any(|k| *k) {
                return Err(ReexecutionError::NothingFailed(
                    parent.record.run_id.clone(),
                ));
            }
            keep
        }
    };
    let empty = BTreeMap::new();
    let outputs = parent.map(|p| &p.outputs).unwrap_or(&empty);
    let mut plan = full.subset(&keep, outputs, parent.map(|p| p.record.run_id.as_str()))?;
    if *steps == StepsToRun::FromFailure {
        plan.reuse_succeeded_items(outputs);
    } else if !items.is_empty() && parent.is_some() {
        plan.reuse_unselected_items(outputs, &items);
    }
    let mut reused: BTreeMap<String, String> = full
        .steps
        .iter()
        .zip(&keep)
        .filter(|(_, k)| !**k)
        .filter_map(|(s, _)| outputs.get(&s.key).map(|r| (s.key.clone(), r.clone())))
        .collect();
    // The steps of fan-outs this run does not run again: every item of a template
    // that is not run, and the reused items of one that is.
    let kept_key = |key: &str| full.index_of(key).is_some_and(|i| keep[i]);
    for (step, kept) in full.steps.iter().zip(&keep) {
        let over_rerun = step
            .dynamic
            .as_ref()
            .is_some_and(|d| kept_key(&d.over.step_key));
        let selected = items.get(&step.solid);
        let reuses =
            !*kept || ((*steps == StepsToRun::FromFailure || selected.is_some()) && !over_rerun);
        if step.is_template() && reuses {
            for (mapping_key, run) in crate::plan::items_of(&step.key, outputs) {
                if selected.is_some_and(|keys| keys.contains(&mapping_key)) {
                    continue;
                }
                reused.insert(
                    crate::plan::StepKey::mapped(&step.solid, &mapping_key).into(),
                    run,
                );
            }
        }
    }
    Ok(StepPlan { plan, reused })
}

/// Warnings for solids whose config differs from the parent's on steps that are not
/// re-run: their outputs were computed with the parent's config.
pub fn config_warnings(
    parent: &ParentRun,
    config: &RunConfig,
    reused: &BTreeMap<String, String>,
) -> Vec<String> {
    let Some(solids) = config.value.get("solids").and_then(|s| s.as_object()) else {
        return Vec::new();
    };
    let before = parent.record.config.get("solids");
    solids
        .iter()
        .filter(|(alias, _)| reused.contains_key(&crate::plan::step_key(alias)))
        .filter(|(alias, now)| {
            let was = before.and_then(|b| b.get(alias.as_str())).and_then(|b| b.get("config"));
            now.get("config") != was
        })
        .map(|(alias, _)| {
            let step = crate::plan::step_key(alias);
            format!(
                "the config of solid `{alias}` differs from run {}'s, but {step} is not re-run: its outputs come from run {} and were computed with the old config; select it (`--select '{alias}*'`) to apply the change",
                parent.record.run_id,
                reused[&step]
            )
        })
        .collect()
}

/// Checks, before anything runs, that every value `plan` reads from another run is
/// still in `storage`; the first missing one is named.
pub fn check_reused_outputs(
    plan: &ExecutionPlan,
    storage: &dyn IntermediateStorage,
) -> Result<(), ReexecutionError> {
    for step in &plan.steps {
        for input in &step.inputs {
            if let StepInputSource::Step {
                step_key,
                output,
                run_id: Some(run),
            } = &input.source
            {
                let key = IntermediateKey::new(run, step_key, output);
                if !storage.exists(&key)? {
                    return Err(ReexecutionError::MissingIntermediate {
                        run_id: run.clone(),
                        step_key: step_key.clone(),
                        output: output.clone(),
                        location: storage.location(&key),
                    });
                }
            }
        }
    }
    Ok(())
}
