//! Pipelines: DAGs of solid invocations with type-checked wiring.
//!
//! With `#[solid]` functions, wiring is checked by the Rust compiler: an invocation
//! takes a tuple of [`Handle<T>`] whose types must match the solid's parameters.
//!
//! ```
//! use solidflow::prelude::*;
//!
//! #[solid]
//! fn numbers(_ctx: &SolidContext) -> Vec<i64> { vec![1, 2, 3] }
//!
//! #[solid]
//! fn total(_ctx: &SolidContext, numbers: Vec<i64>) -> i64 { numbers.iter().sum() }
//!
//! let pipeline = Pipeline::build("sum", |p| {
//!     let n = p.invoke(numbers, ());
//!     p.invoke(total, (n,));
//! }).unwrap();
//! assert_eq!(pipeline.invocations().len(), 2);
//! ```
//!
//! Wiring an output into an input of another type does not compile:
//!
//! ```compile_fail
//! use solidflow::prelude::*;
//!
//! #[solid]
//! fn name(_ctx: &SolidContext) -> String { "x".into() }
//!
//! #[solid]
//! fn total(_ctx: &SolidContext, numbers: Vec<i64>) -> i64 { numbers.iter().sum() }
//!
//! Pipeline::build("broken", |p| {
//!     let n = p.invoke(name, ());
//!     p.invoke(total, (n,)); // expected Handle<Vec<i64>>, found Handle<String>
//! });
//! ```
//!
//! Solids assembled at run time use [`PipelineBuilder::add`], which checks the same
//! rules when the pipeline is built.

use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::sync::Arc;

use super::mode::Mode;
use super::solid::{DEFAULT_OUTPUT, Solid, SolidDefinition};

/// Where an invocation's input comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "from", rename_all = "snake_case")]
pub enum InputSource {
    /// Output `output` of the invocation named `solid`.
    Output {
        /// The upstream invocation's alias.
        solid: String,
        /// The upstream output's name.
        output: String,
    },
    /// A value given in run config under `solids.<alias>.inputs.<name>`.
    Config,
}

/// An untyped reference to a value in a pipeline under construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawHandle(pub InputSource);

/// A typed reference to a value in a pipeline under construction: an upstream output,
/// or an input to be provided in run config ([`PipelineBuilder::config_input`]).
pub struct Handle<T> {
    raw: RawHandle,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for Handle<T> {
    fn clone(&self) -> Self {
        Self {
            raw: self.raw.clone(),
            _type: PhantomData,
        }
    }
}

impl<T> Handle<T> {
    /// A handle to output `output` of invocation `solid` (used by generated code).
    pub fn output(solid: &str, output: &str) -> Self {
        Self {
            raw: RawHandle(InputSource::Output {
                solid: solid.into(),
                output: output.into(),
            }),
            _type: PhantomData,
        }
    }

    /// The untyped reference.
    pub fn raw(self) -> RawHandle {
        self.raw
    }
}

/// One use of a solid in a pipeline, under an alias.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The unique name of this use (the solid's name unless aliased).
    pub alias: String,
    /// The solid.
    pub definition: Arc<SolidDefinition>,
    /// Where each input comes from, by input name.
    pub inputs: BTreeMap<String, InputSource>,
}

/// A pipeline that was built and checked.
#[derive(Debug, Clone)]
pub struct Pipeline {
    name: String,
    description: String,
    // Shared: pipelines are cloned into every run and step process.
    invocations: Arc<Vec<Invocation>>,
    modes: Vec<Mode>,
}

/// Why a pipeline could not be built. Each message names the pipeline, solid and input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DefinitionError {
    /// Two invocations share a name.
    #[error(
        "pipeline `{pipeline}`: solid name `{alias}` is used twice; give one of them an alias with `invoke_as`"
    )]
    DuplicateAlias {
        /// The pipeline.
        pipeline: String,
        /// The repeated name.
        alias: String,
    },
    /// An input refers to a solid that does not exist.
    #[error(
        "pipeline `{pipeline}`: input `{input}` of solid `{solid}` refers to unknown solid `{upstream}`"
    )]
    UnknownSolid {
        /// The pipeline.
        pipeline: String,
        /// The consuming solid.
        solid: String,
        /// The input.
        input: String,
        /// The missing upstream name.
        upstream: String,
    },
    /// An input refers to an output that does not exist.
    #[error(
        "pipeline `{pipeline}`: input `{input}` of solid `{solid}` refers to output `{output}` of `{upstream}`, which has outputs: {available}"
    )]
    UnknownOutput {
        /// The pipeline.
        pipeline: String,
        /// The consuming solid.
        solid: String,
        /// The input.
        input: String,
        /// The upstream solid.
        upstream: String,
        /// The missing output.
        output: String,
        /// The outputs that exist.
        available: String,
    },
    /// A wired input has a different type from the output feeding it.
    #[error(
        "pipeline `{pipeline}`: input `{input}` of solid `{solid}` expects {expected} but `{upstream}.{output}` produces {found}"
    )]
    TypeMismatch {
        /// The pipeline.
        pipeline: String,
        /// The consuming solid.
        solid: String,
        /// The input.
        input: String,
        /// The upstream solid.
        upstream: String,
        /// The upstream output.
        output: String,
        /// The input's type.
        expected: String,
        /// The output's type.
        found: String,
    },
    /// An input is neither wired nor declared as coming from config.
    #[error(
        "pipeline `{pipeline}`: input `{input}` of solid `{solid}` is not wired; connect it to an output or mark it as provided by run config"
    )]
    UnwiredInput {
        /// The pipeline.
        pipeline: String,
        /// The solid.
        solid: String,
        /// The input.
        input: String,
    },
    /// The same input was given twice, or an input that does not exist was given.
    #[error(
        "pipeline `{pipeline}`: solid `{solid}` has no input `{input}`; its inputs are: {available}"
    )]
    UnknownInput {
        /// The pipeline.
        pipeline: String,
        /// The solid.
        solid: String,
        /// The input given.
        input: String,
        /// The inputs that exist.
        available: String,
    },
    /// The wiring has a cycle.
    #[error("pipeline `{pipeline}`: dependency cycle through solid `{solid}`")]
    Cycle {
        /// The pipeline.
        pipeline: String,
        /// A solid on the cycle.
        solid: String,
    },
    /// A pipeline name or mode was given twice in one repository or pipeline.
    #[error("{0}")]
    Duplicate(String),
}

/// An invocation as added, before [`Pipeline::build`] checks it: alias, solid, wiring.
type PendingInvocation = (String, Arc<SolidDefinition>, Vec<(String, RawHandle)>);

/// Collects invocations; [`Pipeline::build`] checks them.
pub struct PipelineBuilder {
    invocations: Vec<Invocation>,
    pending: Vec<PendingInvocation>,
}

impl PipelineBuilder {
    /// Invokes solid `S` under its own name with typed inputs; returns typed outputs.
    pub fn invoke<S: Solid>(&mut self, solid: impl FnOnce() -> S, inputs: S::Inputs) -> S::Outputs {
        let alias = S::definition().name;
        self.invoke_as(&alias, solid, inputs)
    }

    /// Invokes solid `S` under `alias`, so one solid can appear several times.
    pub fn invoke_as<S: Solid>(
        &mut self,
        alias: &str,
        _solid: impl FnOnce() -> S,
        inputs: S::Inputs,
    ) -> S::Outputs {
        let wiring = S::wire(inputs)
            .into_iter()
            .map(|(n, h)| (n.to_string(), h))
            .collect();
        self.pending
            .push((alias.to_string(), Arc::new(S::definition()), wiring));
        S::outputs(alias)
    }

    /// Adds an erased solid under `alias`, with inputs as `(input name, source)`;
    /// returns nothing because outputs are referred to by [`RawHandle`]s built by name.
    pub fn add(
        &mut self,
        alias: &str,
        definition: SolidDefinition,
        inputs: Vec<(String, RawHandle)>,
    ) {
        self.pending
            .push((alias.to_string(), Arc::new(definition), inputs));
    }

    /// An input value that will be given in run config at `solids.<alias>.inputs.<name>`.
    pub fn config_input<T>(&self) -> Handle<T> {
        Handle {
            raw: RawHandle(InputSource::Config),
            _type: PhantomData,
        }
    }

    /// An untyped reference to output `output` of `alias`, for [`add`](Self::add).
    pub fn output(&self, alias: &str, output: &str) -> RawHandle {
        RawHandle(InputSource::Output {
            solid: alias.into(),
            output: output.into(),
        })
    }

    /// An untyped reference to the default output of `alias`.
    pub fn result(&self, alias: &str) -> RawHandle {
        self.output(alias, DEFAULT_OUTPUT)
    }
}

impl Pipeline {
    /// Builds a pipeline: `body` invokes solids on the builder, then the wiring is checked
    /// (names, types, unwired inputs, cycles). The pipeline runs in the default mode
    /// unless [`with_modes`](Self::with_modes) says otherwise.
    // Definition errors happen once, at start-up; their size does not matter.
    #[allow(clippy::result_large_err)]
    pub fn build(
        name: &str,
        body: impl FnOnce(&mut PipelineBuilder),
    ) -> Result<Self, DefinitionError> {
        let mut builder = PipelineBuilder {
            invocations: Vec::new(),
            pending: Vec::new(),
        };
        body(&mut builder);
        let mut invocations = builder.invocations;
        let mut seen = HashMap::new();
        for (alias, def, wiring) in builder.pending {
            if seen.insert(alias.clone(), def.clone()).is_some() {
                return Err(DefinitionError::DuplicateAlias {
                    pipeline: name.into(),
                    alias,
                });
            }
            let mut inputs = BTreeMap::new();
            for (input, RawHandle(source)) in wiring {
                if def.find_input(&input).is_none() {
                    return Err(DefinitionError::UnknownInput {
                        pipeline: name.into(),
                        solid: alias.clone(),
                        input,
                        available: def
                            .inputs
                            .iter()
                            .map(|i| i.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
                inputs.insert(input, source);
            }
            invocations.push(Invocation {
                alias,
                definition: def,
                inputs,
            });
        }
        let pipeline = Self {
            name: name.into(),
            description: String::new(),
            invocations: Arc::new(invocations),
            modes: vec![Mode::default()],
        };
        pipeline.check()?;
        Ok(pipeline)
    }

    /// Sets the description.
    pub fn with_description(mut self, text: impl Into<String>) -> Self {
        self.description = text.into();
        self
    }

    /// Replaces the modes the pipeline can run in; the first is the default.
    pub fn with_modes(mut self, modes: impl IntoIterator<Item = Mode>) -> Self {
        self.modes = modes.into_iter().collect();
        if self.modes.is_empty() {
            self.modes.push(Mode::default());
        }
        self
    }

    /// Convenience for the seed's `ModeDefinition(executor_defs=...)`: one default mode
    /// with these executors and the default storages.
    pub fn with_executors(self, executors: Vec<super::executor::ExecutorDefinition>) -> Self {
        self.with_modes([Mode::new("default").executors(executors)])
    }

    /// The pipeline's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pipeline's description.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The invocations, in the order they were added.
    pub fn invocations(&self) -> &[Invocation] {
        &self.invocations
    }

    /// Looks up an invocation by alias.
    pub fn invocation(&self, alias: &str) -> Option<&Invocation> {
        self.invocations.iter().find(|i| i.alias == alias)
    }

    /// The modes; the first is the default.
    pub fn modes(&self) -> &[Mode] {
        &self.modes
    }

    /// Looks up a mode by name, or the default mode for `None`.
    pub fn mode(&self, name: Option<&str>) -> Option<&Mode> {
        match name {
            None => self.modes.first(),
            Some(n) => self.modes.iter().find(|m| m.name == n),
        }
    }

    #[allow(clippy::result_large_err)]
    fn check(&self) -> Result<(), DefinitionError> {
        let pipeline = || self.name.clone();
        let index: HashMap<&str, usize> = self
            .invocations
            .iter()
            .enumerate()
            .map(|(i, inv)| (inv.alias.as_str(), i))
            .collect();
        for inv in self.invocations.iter() {
            for input in &inv.definition.inputs {
                let Some(source) = inv.inputs.get(&input.name) else {
                    return Err(DefinitionError::UnwiredInput {
                        pipeline: pipeline(),
                        solid: inv.alias.clone(),
                        input: input.name.clone(),
                    });
                };
                let InputSource::Output { solid, output } = source else {
                    continue;
                };
                let upstream = index
                    .get(solid.as_str())
                    .map(|&i| &self.invocations[i])
                    .ok_or_else(|| DefinitionError::UnknownSolid {
                        pipeline: pipeline(),
                        solid: inv.alias.clone(),
                        input: input.name.clone(),
                        upstream: solid.clone(),
                    })?;
                let out = upstream.definition.find_output(output).ok_or_else(|| {
                    DefinitionError::UnknownOutput {
                        pipeline: pipeline(),
                        solid: inv.alias.clone(),
                        input: input.name.clone(),
                        upstream: solid.clone(),
                        output: output.clone(),
                        available: upstream
                            .definition
                            .outputs
                            .iter()
                            .map(|o| o.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    }
                })?;
                if out.ty != input.ty {
                    return Err(DefinitionError::TypeMismatch {
                        pipeline: pipeline(),
                        solid: inv.alias.clone(),
                        input: input.name.clone(),
                        upstream: solid.clone(),
                        output: output.clone(),
                        expected: input.ty.name.into(),
                        found: out.ty.name.into(),
                    });
                }
            }
        }
        let mut graph = petgraph::graph::DiGraph::<usize, ()>::new();
        let nodes: Vec<_> = (0..self.invocations.len())
            .map(|i| graph.add_node(i))
            .collect();
        for (i, inv) in self.invocations.iter().enumerate() {
            for source in inv.inputs.values() {
                if let InputSource::Output { solid, .. } = source {
                    graph.add_edge(nodes[index[solid.as_str()]], nodes[i], ());
                }
            }
        }
        petgraph::algo::toposort(&graph, None).map_err(|cycle| DefinitionError::Cycle {
            pipeline: pipeline(),
            solid: self.invocations[graph[cycle.node_id()]].alias.clone(),
        })?;
        Ok(())
    }
}
