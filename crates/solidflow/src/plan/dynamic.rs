//! The dynamic part of a plan: a template step stands for the steps of a fan-out
//! before the run (`double[?].compute`), and [`ExecutionStep::instantiate`] makes the
//! real step of one item (`double[part_1].compute`) once the keys are known.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{ExecutionStep, StepInputSource, StepKey, StepOutputRef};

/// What a step of a fan-out (or its template) maps over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DynamicStep {
    /// The dynamic output whose items give the steps.
    pub over: StepOutputRef,
    /// The run holding that output when it is not this one (re-execution).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub over_run_id: Option<String>,
    /// The item this step runs for; `None` for the template.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapping_key: Option<String>,
    /// Template only: items not to run because a parent run holds their outputs
    /// (mapping key → run id; `reexecute --from-failure`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub reused: BTreeMap<String, String>,
}

impl ExecutionStep {
    /// Whether this is a template that stands for the steps of a fan-out.
    pub fn is_template(&self) -> bool {
        self.dynamic
            .as_ref()
            .is_some_and(|d| d.mapping_key.is_none())
    }

    /// The real step of item `mapping_key` of this template: its key, and inputs that
    /// read that item. `runs` names the run holding a per-item upstream value when it
    /// is not this run (upstream step key → run id).
    pub fn instantiate(&self, mapping_key: &str, runs: &BTreeMap<String, String>) -> Self {
        let mut step = self.clone();
        step.key = StepKey::mapped(&self.solid, mapping_key).into();
        step.upstream.clear();
        step.downstream.clear();
        if let Some(d) = &mut step.dynamic {
            d.mapping_key = Some(mapping_key.to_string());
            d.reused.clear();
        }
        for input in &mut step.inputs {
            if let StepInputSource::Mapped {
                step_key,
                output,
                run_id,
                reused,
            } = &input.source
            {
                let (key, output) = match StepKey::parse(step_key) {
                    Some(k) if k.is_template() => (
                        StepKey::mapped(k.solid(), mapping_key).into(),
                        output.clone(),
                    ),
                    _ => (step_key.clone(), StepKey::item_output(output, mapping_key)),
                };
                let run_id = reused
                    .get(mapping_key)
                    .or_else(|| runs.get(&key))
                    .cloned()
                    .or_else(|| run_id.clone());
                input.source = StepInputSource::Step {
                    step_key: key,
                    output,
                    run_id,
                };
            }
        }
        step
    }
}

/// Whether `key` is a template's (`<alias>[?].compute`).
pub(super) fn is_template_key(key: &str) -> bool {
    StepKey::parse(key).is_some_and(|k| k.is_template())
}

/// The steps of template `template` that `outputs` (step key → run id) holds, by
/// mapping key.
pub fn items_of(template: &str, outputs: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let Some(template) = StepKey::parse(template) else {
        return BTreeMap::new();
    };
    outputs
        .iter()
        .filter_map(|(key, run)| {
            let k = StepKey::parse(key)?;
            let mapping_key = k.mapping_key().filter(|_| !k.is_template())?;
            (k.solid() == template.solid()).then(|| (mapping_key.to_string(), run.clone()))
        })
        .collect()
}

impl super::ExecutionPlan {
    /// For `reexecute --from-failure`: the steps of fan-outs that run again reuse the
    /// items whose steps succeeded in the parent (`outputs`: step key → run id), so only
    /// the failed (and unfinished) items run, and collects read the others from there.
    /// A fan-out whose dynamic output is computed again reuses nothing: its items may
    /// differ.
    pub fn reuse_succeeded_items(&mut self, outputs: &BTreeMap<String, String>) {
        self.reuse_items(outputs, None);
    }

    /// For a selection of items (`summarize[part_3]`): the fan-outs in `items` (alias →
    /// mapping keys) run only those items and reuse the others from the parent.
    pub fn reuse_unselected_items(
        &mut self,
        outputs: &BTreeMap<String, String>,
        items: &BTreeMap<String, std::collections::BTreeSet<String>>,
    ) {
        self.reuse_items(outputs, Some(items));
    }

    fn reuse_items(
        &mut self,
        outputs: &BTreeMap<String, String>,
        only: Option<&BTreeMap<String, std::collections::BTreeSet<String>>>,
    ) {
        let kept: std::collections::HashSet<String> =
            self.steps.iter().map(|s| s.key.clone()).collect();
        let rerun = |key: &str| kept.contains(key);
        // The parent's items of `template` this run reuses; `None`: it reruns them all.
        let reusable = |template: &str| -> Option<BTreeMap<String, String>> {
            let mut items = items_of(template, outputs);
            if let Some(only) = only {
                let alias = StepKey::parse(template)?.solid().to_string();
                let selected = only.get(&alias)?;
                items.retain(|k, _| !selected.contains(k));
            }
            Some(items)
        };
        for step in &mut self.steps {
            let over_rerun = step
                .dynamic
                .as_ref()
                .is_some_and(|d| rerun(&d.over.step_key));
            if step.is_template()
                && !over_rerun
                && let Some(items) = reusable(&step.key)
                && let Some(d) = &mut step.dynamic
            {
                d.reused = items;
            }
            for input in &mut step.inputs {
                match &mut input.source {
                    StepInputSource::Mapped {
                        step_key, reused, ..
                    } if !over_rerun && rerun(step_key) && is_template_key(step_key) => {
                        if let Some(items) = reusable(step_key) {
                            *reused = items;
                        }
                    }
                    StepInputSource::Collect {
                        step_key,
                        keys_from,
                        reused,
                        ..
                    } if !rerun(&keys_from.step_key)
                        && rerun(step_key)
                        && is_template_key(step_key) =>
                    {
                        if let Some(items) = reusable(step_key) {
                            *reused = items;
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Where a collect reads item `mapping_key` of `step_key`'s output `output`: the step
/// and output name.
pub(crate) fn collect_item(step_key: &str, output: &str, mapping_key: &str) -> (String, String) {
    match StepKey::parse(step_key) {
        Some(k) if k.is_template() => (
            StepKey::mapped(k.solid(), mapping_key).into(),
            output.to_string(),
        ),
        _ => (
            step_key.to_string(),
            StepKey::item_output(output, mapping_key),
        ),
    }
}

/// The runs a collect reads from other than its own, as upstream step key → run id
/// (what a step invocation carries).
pub(super) fn collect_runs(
    step_key: &str,
    keys_from: &StepOutputRef,
    keys_run_id: &Option<String>,
    reused: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut runs: Vec<(String, String)> = keys_run_id
        .iter()
        .map(|r| (keys_from.step_key.clone(), r.clone()))
        .collect();
    for (mapping_key, run) in reused {
        let (key, _) = collect_item(step_key, "", mapping_key);
        if key != keys_from.step_key {
            runs.push((key, run.clone()));
        }
    }
    runs
}

/// The other side of [`collect_runs`].
pub(super) fn read_collect_runs(
    step_key: &str,
    keys_from: &StepOutputRef,
    keys_run_id: &mut Option<String>,
    reused: &mut BTreeMap<String, String>,
    runs: &BTreeMap<String, String>,
) {
    *keys_run_id = runs.get(&keys_from.step_key).cloned();
    let Some(template) = StepKey::parse(step_key).filter(StepKey::is_template) else {
        return;
    };
    reused.clear();
    for (key, run) in runs {
        if let Some(k) = StepKey::parse(key)
            && k.solid() == template.solid()
            && let Some(mapping_key) = k.mapping_key()
        {
            reused.insert(mapping_key.to_string(), run.clone());
        }
    }
}
