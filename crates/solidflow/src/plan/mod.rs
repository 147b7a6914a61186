//! The execution plan: a pipeline plus its run config, compiled into steps.
//!
//! A plan is plain data, deterministic for the same pipeline and config, and printable
//! (`plan` prints it as text or JSON). Executors only ever see plans.

mod dynamic;
pub mod selection;
pub mod step_key;
mod subset;

pub use dynamic::DynamicStep;
pub(crate) use dynamic::collect_item;
pub use dynamic::items_of;
pub use step_key::StepKey;
pub use subset::{UnprovidedInput, UnprovidedInputs};

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::Serialize;

use crate::config::RunConfig;
use crate::definition::pipeline::{InputSource, Invocation, OutputRef, Pipeline};
use crate::definition::retry::RetryPolicy;

/// Where a step input's value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "from", rename_all = "snake_case")]
pub enum StepInputSource {
    /// Output `output` of step `step_key`.
    Step {
        /// The upstream step.
        step_key: String,
        /// The upstream output.
        output: String,
        /// The run whose intermediates hold the value, when it is not this run: a
        /// re-execution reads the outputs of steps it does not re-run from its parent.
        #[serde(skip_serializing_if = "Option::is_none")]
        run_id: Option<String>,
    },
    /// The run config (`solids.<alias>.inputs.<name>`).
    Config,
    /// A fan-in: the outputs of these steps, gathered into one list in this order.
    FanIn {
        /// The upstream outputs, in list order.
        sources: Vec<StepOutputRef>,
    },
    /// In a template step (one step per item of a fan-out): per item, item `<key>` of
    /// dynamic output `output` of `step_key`, or, when `step_key` is a template too,
    /// output `output` of its step of the same key. Each real step reads a
    /// [`Step`](Self::Step) source instead.
    Mapped {
        /// The step holding the items (`split.compute`, or `double[?].compute`).
        step_key: String,
        /// Its output.
        output: String,
        /// The run holding the values when it is not this one (re-execution).
        #[serde(skip_serializing_if = "Option::is_none")]
        run_id: Option<String>,
        /// Items whose values a parent run holds: mapping key → run id (re-execution).
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        reused: BTreeMap<String, String>,
    },
    /// Every item of a fan-out gathered into one list, in item order: output `output`
    /// of each step of template `step_key` (or each item of dynamic output `output` of
    /// `step_key`). The item keys are read from `keys_from` when the step runs.
    Collect {
        /// The template step (or the step with the dynamic output).
        step_key: String,
        /// The output gathered.
        output: String,
        /// The dynamic output whose keys say which items there are.
        keys_from: StepOutputRef,
        /// The run holding `keys_from` when it is not this one (re-execution).
        #[serde(skip_serializing_if = "Option::is_none")]
        keys_run_id: Option<String>,
        /// Items whose values a parent run holds: mapping key → run id (re-execution).
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        reused: BTreeMap<String, String>,
    },
}

/// One upstream step output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepOutputRef {
    /// The upstream step.
    pub step_key: String,
    /// The upstream output.
    pub output: String,
}

/// One input of a step.
#[derive(Debug, Clone, Serialize)]
pub struct StepInput {
    /// The input name.
    pub name: String,
    /// The Rust type.
    pub type_name: &'static str,
    /// Where the value comes from.
    pub source: StepInputSource,
}

/// One output of a step.
#[derive(Debug, Clone, Serialize)]
pub struct StepOutput {
    /// The output name.
    pub name: String,
    /// The Rust type (of one item, for a dynamic output).
    pub type_name: &'static str,
    /// Whether this is a dynamic output: keyed items, one step per item downstream.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dynamic: bool,
}

/// One unit of execution: one solid invocation.
#[derive(Debug, Clone, Serialize)]
pub struct ExecutionStep {
    /// `<alias>.compute`.
    pub key: String,
    /// The invocation's alias.
    pub solid: String,
    /// The solid definition's name (differs from `solid` when aliased).
    pub solid_definition: String,
    /// Inputs in declaration order.
    pub inputs: Vec<StepInput>,
    /// Outputs in declaration order.
    pub outputs: Vec<StepOutput>,
    /// Resources one execution needs.
    pub required_resources: BTreeMap<String, f64>,
    /// The solid's tags.
    pub tags: BTreeMap<String, String>,
    /// The effective retry policy (solid default, overridden by run config).
    pub retry_policy: RetryPolicy,
    /// Topological level: 0 for steps with no upstream step.
    pub level: usize,
    /// For a step of a fan-out (or its template): what it maps over.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamic: Option<DynamicStep>,
    /// Index of the invocation in [`Pipeline::invocations`], for O(1) lookup.
    #[serde(skip)]
    pub invocation: usize,
    /// Indices of the steps this one depends on.
    #[serde(skip)]
    pub upstream: Vec<usize>,
    /// Indices of the steps that depend on this one.
    #[serde(skip)]
    pub downstream: Vec<usize>,
}

impl ExecutionStep {
    /// The runs this step reads upstream outputs from, other than its own run: upstream
    /// step key → run id. Carried by the step invocation of out-of-process executors.
    pub fn input_runs(&self) -> BTreeMap<String, String> {
        self.inputs
            .iter()
            .filter_map(|i| match &i.source {
                StepInputSource::Step {
                    step_key,
                    run_id: Some(run),
                    ..
                } => Some(vec![(step_key.clone(), run.clone())]),
                StepInputSource::Collect {
                    step_key,
                    keys_from,
                    keys_run_id,
                    reused,
                    ..
                } => Some(dynamic::collect_runs(
                    step_key,
                    keys_from,
                    keys_run_id,
                    reused,
                )),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// Reads the outputs of the upstream steps in `runs` (step key → run id) from those
    /// runs instead of this one; the other side of [`input_runs`](Self::input_runs).
    pub fn read_inputs_from(&mut self, runs: &BTreeMap<String, String>) {
        for input in &mut self.inputs {
            match &mut input.source {
                StepInputSource::Step {
                    step_key, run_id, ..
                } => *run_id = runs.get(step_key).cloned(),
                StepInputSource::Collect {
                    step_key,
                    keys_from,
                    keys_run_id,
                    reused,
                    ..
                } => dynamic::read_collect_runs(step_key, keys_from, keys_run_id, reused, runs),
                _ => {}
            }
        }
    }
}

/// The compiled plan of one run.
#[derive(Debug, Clone, Serialize)]
pub struct ExecutionPlan {
    /// The pipeline's name.
    pub pipeline: String,
    /// Steps ordered by level, then by the order solids were added to the pipeline.
    pub steps: Vec<ExecutionStep>,
}

/// The step key of invocation `alias` (see [`StepKey`]).
pub fn step_key(alias: &str) -> String {
    StepKey::of(alias).into()
}

impl ExecutionPlan {
    /// Compiles `pipeline` with `config` into a plan.
    pub fn compile(pipeline: &Pipeline, config: &RunConfig) -> Self {
        let invs = pipeline.invocations();
        let index: HashMap<&str, usize> = invs
            .iter()
            .enumerate()
            .map(|(i, inv)| (inv.alias.as_str(), i))
            .collect();
        let level = levels(invs, &index);
        let mut order: Vec<usize> = (0..invs.len()).collect();
        order.sort_by_key(|&i| (level[i], i));
        let mut position = vec![0; invs.len()];
        for (pos, &i) in order.iter().enumerate() {
            position[i] = pos;
        }
        let lookup = |alias: &str| index.get(alias).map(|&i| &invs[i]);
        let mut steps: Vec<ExecutionStep> = order
            .iter()
            .map(|&i| {
                let upstream_of = |solid: &str| Some(position[index[solid]]);
                build_step(&invs[i], i, config, level[i], upstream_of, &lookup)
            })
            .collect();
        for i in 0..steps.len() {
            for u in steps[i].upstream.clone() {
                steps[u].downstream.push(i);
            }
        }
        Self {
            pipeline: pipeline.name().to_string(),
            steps,
        }
    }

    /// A plan holding only the step `key`, for a step process that runs just that step.
    /// Upstream indices are empty: the step reads its inputs by step key from storage.
    pub fn for_step(pipeline: &Pipeline, config: &RunConfig, key: &str) -> Option<Self> {
        let alias = StepKey::parse(key)?;
        let (i, inv) = pipeline
            .invocations()
            .iter()
            .enumerate()
            .find(|(_, inv)| inv.alias == alias.solid())?;
        let lookup = |alias: &str| pipeline.invocation(alias);
        let step = build_step(inv, i, config, 0, |_| None, &lookup);
        // A step of a fan-out is its template's, for one key.
        let step = match (alias.mapping_key(), &step.dynamic) {
            (None, None) => step,
            (Some(mapping_key), Some(_)) if !alias.is_template() => {
                step.instantiate(mapping_key, &BTreeMap::new())
            }
            _ => return None,
        };
        Some(Self {
            pipeline: pipeline.name().to_string(),
            steps: vec![step],
        })
    }

    /// Looks up a step by key.
    pub fn step(&self, key: &str) -> Option<&ExecutionStep> {
        self.steps.iter().find(|s| s.key == key)
    }

    /// The index of a step by key.
    pub fn index_of(&self, key: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.key == key)
    }

    /// The number of topological levels.
    pub fn depth(&self) -> usize {
        self.steps.iter().map(|s| s.level + 1).max().unwrap_or(0)
    }
}

/// Each invocation's topological level: the longest path from a root. Iterative (a
/// 100,000-step chain is deeper than any thread's stack) and O(wires): an invocation is
/// scanned once when first reached and once after all its upstreams have levels. The
/// pipeline was checked to be acyclic.
fn levels(invs: &[Invocation], index: &HashMap<&str, usize>) -> Vec<usize> {
    let mut level = vec![usize::MAX; invs.len()];
    let mut stack = Vec::new();
    for root in 0..invs.len() {
        if level[root] != usize::MAX {
            continue;
        }
        stack.push(root);
        while let Some(&i) = stack.last() {
            if level[i] != usize::MAX {
                stack.pop();
                continue;
            }
            let mut pending = false;
            let mut l = 0;
            for upstream in invs[i]
                .inputs
                .values()
                .flat_map(InputSource::upstream_outputs)
            {
                let u = index[upstream.solid.as_str()];
                if level[u] == usize::MAX {
                    stack.push(u);
                    pending = true;
                } else {
                    l = l.max(level[u] + 1);
                }
            }
            if !pending {
                level[i] = l;
                stack.pop();
            }
        }
    }
    level
}

/// Builds the step of invocation `inv` (index `i` in the pipeline). `upstream_of` maps
/// an upstream alias to its step index in the plan being built, if it has one.
fn build_step<'a>(
    inv: &Invocation,
    i: usize,
    config: &RunConfig,
    level: usize,
    upstream_of: impl Fn(&str) -> Option<usize>,
    lookup: &dyn Fn(&str) -> Option<&'a Invocation>,
) -> ExecutionStep {
    let def = &inv.definition;
    let mapped = |alias: &str| lookup(alias).and_then(|u| u.mapped_over.clone());
    let step_key = |alias: &str| match mapped(alias) {
        Some(_) => StepKey::template(alias).into(),
        None => step_key(alias),
    };
    let mut upstream = Vec::new();
    let inputs = def
        .inputs
        .iter()
        .map(|input| {
            let source = match &inv.inputs[&input.name] {
                InputSource::Output { solid, output } | InputSource::Item { solid, output }
                    if inv.mapped_over.is_some()
                        && (mapped(solid).is_some()
                            || matches!(&inv.inputs[&input.name], InputSource::Item { .. })) =>
                {
                    upstream.extend(upstream_of(solid));
                    StepInputSource::Mapped {
                        step_key: step_key(solid),
                        output: output.clone(),
                        run_id: None,
                        reused: BTreeMap::new(),
                    }
                }
                InputSource::Output { solid, output } | InputSource::Item { solid, output } => {
                    upstream.extend(upstream_of(solid));
                    StepInputSource::Step {
                        step_key: step_key(solid),
                        output: output.clone(),
                        run_id: None,
                    }
                }
                InputSource::Collect { solid, output } => {
                    upstream.extend(upstream_of(solid));
                    let over = mapped(solid).unwrap_or_else(|| OutputRef {
                        solid: solid.clone(),
                        output: output.clone(),
                    });
                    StepInputSource::Collect {
                        step_key: step_key(solid),
                        output: output.clone(),
                        keys_from: StepOutputRef {
                            step_key: self::step_key(&over.solid),
                            output: over.output,
                        },
                        keys_run_id: None,
                        reused: BTreeMap::new(),
                    }
                }
                InputSource::Config => StepInputSource::Config,
                InputSource::FanIn { sources } => StepInputSource::FanIn {
                    sources: sources
                        .iter()
                        .map(|u| {
                            upstream.extend(upstream_of(&u.solid));
                            StepOutputRef {
                                step_key: step_key(&u.solid),
                                output: u.output.clone(),
                            }
                        })
                        .collect(),
                },
            };
            StepInput {
                name: input.name.clone(),
                type_name: input.ty.name,
                source,
            }
        })
        .collect();
    upstream.sort_unstable();
    upstream.dedup();
    let retry_policy = config
        .solids
        .get(&inv.alias)
        .and_then(|s| s.retry.clone())
        .or_else(|| def.retry_policy.clone())
        .unwrap_or_default();
    let dynamic = inv.mapped_over.as_ref().map(|over| DynamicStep {
        over: StepOutputRef {
            step_key: self::step_key(&over.solid),
            output: over.output.clone(),
        },
        over_run_id: None,
        mapping_key: None,
        reused: BTreeMap::new(),
    });
    ExecutionStep {
        key: step_key(&inv.alias),
        solid: inv.alias.clone(),
        solid_definition: def.name.clone(),
        inputs,
        outputs: def
            .outputs
            .iter()
            .map(|o| StepOutput {
                name: o.name.clone(),
                type_name: o.ty.name,
                dynamic: o.dynamic.is_some(),
            })
            .collect(),
        required_resources: def.required_resources.clone(),
        tags: def.tags.clone(),
        retry_policy,
        level,
        dynamic,
        invocation: i,
        upstream,
        downstream: Vec::new(),
    }
}

impl fmt::Display for ExecutionPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Execution plan for pipeline `{}` ({} steps, {} levels)",
            self.pipeline,
            self.steps.len(),
            self.depth()
        )?;
        let mut current = usize::MAX;
        for step in &self.steps {
            if step.level != current {
                current = step.level;
                writeln!(f, "level {current}:")?;
            }
            write!(f, "  {}", step.key)?;
            if step.solid != step.solid_definition {
                write!(f, " (solid {})", step.solid_definition)?;
            }
            if let Some(d) = &step.dynamic {
                write!(
                    f,
                    " (one step per item of {}.{}, keys known when it runs)",
                    d.over.step_key, d.over.output
                )?;
            }
            if !step.required_resources.is_empty() {
                let r: Vec<String> = step
                    .required_resources
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                write!(f, " [requires {}]", r.join(", "))?;
            }
            writeln!(f)?;
            for input in &step.inputs {
                match &input.source {
                    StepInputSource::Step {
                        step_key,
                        output,
                        run_id,
                    } => {
                        write!(
                            f,
                            "      in  {}: {} <- {step_key}.{output}",
                            input.name, input.type_name
                        )?;
                        match run_id {
                            Some(run) => writeln!(f, " (from run {run})")?,
                            None => writeln!(f)?,
                        }
                    }
                    StepInputSource::Config => writeln!(
                        f,
                        "      in  {}: {} <- run config",
                        input.name, input.type_name
                    )?,
                    StepInputSource::FanIn { sources } => {
                        writeln!(
                            f,
                            "      in  {}: {} <- fan-in of {}:",
                            input.name,
                            input.type_name,
                            sources.len()
                        )?;
                        for (i, s) in sources.iter().enumerate() {
                            writeln!(f, "            [{i}] {}.{}", s.step_key, s.output)?;
                        }
                    }
                    StepInputSource::Mapped {
                        step_key, output, ..
                    } => {
                        let what = match StepKey::parse(step_key) {
                            Some(k) if k.is_template() => format!("{step_key}.{output}"),
                            _ => format!("{step_key}.{output}[?]"),
                        };
                        writeln!(
                            f,
                            "      in  {}: {} <- {what} (one item)",
                            input.name, input.type_name
                        )?
                    }
                    StepInputSource::Collect {
                        step_key, output, ..
                    } => writeln!(
                        f,
                        "      in  {}: {} <- collect of {step_key}.{output}, in item order",
                        input.name, input.type_name
                    )?,
                }
            }
            for output in &step.outputs {
                let dynamic = if output.dynamic { " (dynamic)" } else { "" };
                writeln!(
                    f,
                    "      out {}: {}{dynamic}",
                    output.name, output.type_name
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigSources;
    use crate::definition::solid::{Outputs, SolidDefinition};
    use crate::definition::types::TypeInfo;

    fn diamond() -> Pipeline {
        let src = || {
            SolidDefinition::new("src", |_, _| Ok(Outputs::result(1i64)))
                .output("result", TypeInfo::of::<i64>())
        };
        let one = |name: &str| {
            SolidDefinition::new(name, |_, _| Ok(Outputs::result(1i64)))
                .input("x", TypeInfo::of::<i64>())
                .output("result", TypeInfo::of::<i64>())
        };
        let join = SolidDefinition::new("join", |_, _| Ok(Outputs::new()))
            .input("a", TypeInfo::of::<i64>())
            .input("b", TypeInfo::of::<i64>());
        Pipeline::build("diamond", |p| {
            // Added out of order on purpose: the plan sorts by level, then insertion.
            let (ra, rb, rs1, rs2) = (
                p.result("left"),
                p.result("right"),
                p.result("src"),
                p.result("src"),
            );
            p.add("join", join, vec![("a".into(), ra), ("b".into(), rb)]);
            p.add("right", one("right"), vec![("x".into(), rs1)]);
            p.add("left", one("left"), vec![("x".into(), rs2)]);
            p.add("src", src(), vec![]);
        })
        .unwrap()
    }

    #[test]
    fn compiles_levels_deterministically() {
        let pipeline = diamond();
        let config = RunConfig::validate(&pipeline, None, &ConfigSources::empty()).unwrap();
        let plan = ExecutionPlan::compile(&pipeline, &config);
        let keys: Vec<(&str, usize)> = plan
            .steps
            .iter()
            .map(|s| (s.key.as_str(), s.level))
            .collect();
        assert_eq!(
            keys,
            [
                ("src.compute", 0),
                ("right.compute", 1),
                ("left.compute", 1),
                ("join.compute", 2)
            ]
        );
        assert_eq!(plan.steps[3].upstream, vec![1, 2]);
        assert_eq!(plan.steps[0].downstream, vec![1, 2]);
        let again = ExecutionPlan::compile(&pipeline, &config);
        assert_eq!(
            serde_json::to_string(&plan).unwrap(),
            serde_json::to_string(&again).unwrap()
        );
        assert!(
            plan.to_string()
                .contains("in  a: i64 <- left.compute.result")
        );
    }
}
