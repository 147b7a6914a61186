//! A plan cut down to some of its steps, for step selection and re-execution.
//!
//! The steps that are not kept do not run. A kept step whose input comes from a step
//! that is not kept reads it from the run that holds that step's outputs (a re-executed
//! run's parent), or, when no run holds it, the selection is refused naming the input.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use super::{ExecutionPlan, StepInputSource};

/// A kept step's input whose producer is neither kept nor available from another run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnprovidedInput {
    /// The step that needs the input.
    pub step_key: String,
    /// The input.
    pub input: String,
    /// The step that produces it.
    pub producer: String,
    /// The producer's output.
    pub output: String,
}

/// Every input a selection leaves without a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct UnprovidedInputs {
    /// The inputs, in plan order.
    pub inputs: Vec<UnprovidedInput>,
    /// The run that was asked for outputs, if any.
    pub parent_run_id: Option<String>,
}

impl fmt::Display for UnprovidedInputs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match &self.parent_run_id {
            Some(parent) => format!("is not selected and did not succeed in run {parent}"),
            None => "is not selected".to_string(),
        };
        write!(
            f,
            "the selection leaves {} input(s) without a value:",
            self.inputs.len()
        )?;
        for i in &self.inputs {
            write!(
                f,
                "\n  - input `{}` of {} comes from {}.{}, which {why}",
                i.input, i.step_key, i.producer, i.output
            )?;
        }
        write!(
            f,
            "\nselect the producers too (e.g. `*{}`), or re-execute a run in which they succeeded",
            self.inputs
                .first()
                .map(|i| i.step_key.trim_end_matches(".compute"))
                .unwrap_or_default()
        )
    }
}

impl ExecutionPlan {
    /// The plan of the steps flagged in `keep`. Inputs from steps that are not kept are
    /// read from the run `outputs` names for them (step key → run id).
    pub fn subset(
        &self,
        keep: &[bool],
        outputs: &BTreeMap<String, String>,
        parent_run_id: Option<&str>,
    ) -> Result<ExecutionPlan, UnprovidedInputs> {
        let index: HashMap<&str, usize> = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.key.as_str(), i))
            .collect();
        let mut position = vec![usize::MAX; self.steps.len()];
        let mut steps: Vec<super::ExecutionStep> = Vec::new();
        let mut missing = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            if !keep[i] {
                continue;
            }
            let mut step = step.clone();
            let kept = |key: &str| index.get(key).is_some_and(|&p| keep[p]);
            let mut from_parent = |key: &str, output: &str, input: &str| {
                let run = outputs.get(key).cloned();
                if run.is_none() {
                    missing.push(UnprovidedInput {
                        step_key: step.key.clone(),
                        input: input.to_string(),
                        producer: key.to_string(),
                        output: output.to_string(),
                    });
                }
                run
            };
            if let Some(d) = &mut step.dynamic
                && !kept(&d.over.step_key)
            {
                d.over_run_id = from_parent(&d.over.step_key, &d.over.output, "(its items)");
            }
            for input in &mut step.inputs {
                match &mut input.source {
                    StepInputSource::Step {
                        step_key,
                        output,
                        run_id,
                    } if !kept(step_key) => *run_id = from_parent(step_key, output, &input.name),
                    // Per-item values of a template that does not run: every item's
                    // value is the parent's.
                    StepInputSource::Mapped {
                        step_key, reused, ..
                    } if !kept(step_key) && super::dynamic::is_template_key(step_key) => {
                        *reused = super::dynamic::items_of(step_key, outputs);
                    }
                    StepInputSource::Mapped {
                        step_key,
                        output,
                        run_id,
                        ..
                    } if !kept(step_key) => *run_id = from_parent(step_key, output, &input.name),
                    StepInputSource::Collect {
                        step_key,
                        keys_from,
                        keys_run_id,
                        reused,
                        ..
                    } => {
                        if !kept(&keys_from.step_key) {
                            *keys_run_id =
                                from_parent(&keys_from.step_key, &keys_from.output, &input.name);
                        }
                        if !kept(step_key) && super::dynamic::is_template_key(step_key) {
                            *reused = super::dynamic::items_of(step_key, outputs);
                        }
                    }
                    _ => {}
                }
            }
            step.upstream = step
                .upstream
                .iter()
                .filter(|&&u| keep[u])
                .map(|&u| position[u])
                .collect();
            step.downstream.clear();
            step.level = step
                .upstream
                .iter()
                .map(|&u| steps[u].level + 1)
                .max()
                .unwrap_or(0);
            position[i] = steps.len();
            steps.push(step);
        }
        if !missing.is_empty() {
            return Err(UnprovidedInputs {
                inputs: missing,
                parent_run_id: parent_run_id.map(str::to_string),
            });
        }
        // Levels may have dropped; keep the plan ordered by level, then original order.
        let mut order: Vec<usize> = (0..steps.len()).collect();
        order.sort_by_key(|&i| (steps[i].level, i));
        let mut new_pos = vec![0; steps.len()];
        for (pos, &i) in order.iter().enumerate() {
            new_pos[i] = pos;
        }
        let mut sorted: Vec<_> = order.iter().map(|&i| steps[i].clone()).collect();
        for step in &mut sorted {
            for u in &mut step.upstream {
                *u = new_pos[*u];
            }
            step.upstream.sort_unstable();
        }
        for i in 0..sorted.len() {
            for u in sorted[i].upstream.clone() {
                sorted[u].downstream.push(i);
            }
        }
        Ok(ExecutionPlan {
            pipeline: self.pipeline.clone(),
            steps: sorted,
        })
    }
}
