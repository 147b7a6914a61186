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

use std::collections::{BTreeMap, HashMap, HashSet};
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
    /// A fan-in: a `Vec<T>` input gathered from several outputs of type `T`, in order.
    FanIn {
        /// The upstream outputs, in the order their values appear in the list.
        sources: Vec<OutputRef>,
    },
    /// One item of a fan-out, in an invocation mapped over it
    /// ([`PipelineBuilder::map`]): item `<key>` of dynamic output `output` of `solid`,
    /// or, when `solid` is itself mapped, its output in the step of the same key.
    Item {
        /// The invocation holding the items.
        solid: String,
        /// Its output.
        output: String,
    },
    /// Every item of a fan-out gathered into a list, in item order
    /// ([`DynamicHandle::collect`](super::dynamic::DynamicHandle::collect)).
    Collect {
        /// The invocation holding the items (a dynamic output, or a mapped invocation).
        solid: String,
        /// Its output.
        output: String,
    },
}

impl InputSource {
    /// The upstream outputs this input reads: none, one, or every source of a fan-in.
    pub fn upstream_outputs(&self) -> Vec<OutputRef> {
        match self {
            Self::Output { solid, output } => vec![OutputRef {
                solid: solid.clone(),
                output: output.clone(),
            }],
            Self::Config => Vec::new(),
            Self::FanIn { sources } => sources.clone(),
            Self::Item { solid, output } | Self::Collect { solid, output } => vec![OutputRef {
                solid: solid.clone(),
                output: output.clone(),
            }],
        }
    }
}

/// One upstream output: output `output` of the invocation named `solid`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OutputRef {
    /// The upstream invocation's alias.
    pub solid: String,
    /// The upstream output's name.
    pub output: String,
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

    pub(crate) fn from_source(source: InputSource) -> Self {
        Self {
            raw: RawHandle(source),
            _type: PhantomData,
        }
    }
}

/// What can be wired into an input of type `T`: a [`Handle<T>`], or, for a list input
/// `Vec<T>`, a `Vec<Handle<T>>` (a fan-in, gathered in the order of the handles).
///
/// ```
/// use solidflow::prelude::*;
///
/// #[solid]
/// fn branch(_ctx: &SolidContext) -> i64 { 1 }
///
/// #[solid]
/// fn collect(_ctx: &SolidContext, values: Vec<i64>) -> i64 { values.iter().sum() }
///
/// let pipeline = Pipeline::build("fan_in", |p| {
///     let handles: Vec<Handle<i64>> =
///         (0..3).map(|i| p.invoke_as(&format!("branch_{i}"), branch, ())).collect();
///     p.invoke(collect, (handles,));
/// }).unwrap();
/// assert_eq!(pipeline.invocations().len(), 4);
/// ```
///
/// The element type must match; a list of `Handle<String>` does not fit `Vec<i64>`:
///
/// ```compile_fail
/// use solidflow::prelude::*;
///
/// #[solid]
/// fn name(_ctx: &SolidContext) -> String { "x".into() }
///
/// #[solid]
/// fn collect(_ctx: &SolidContext, values: Vec<i64>) -> i64 { values.iter().sum() }
///
/// Pipeline::build("broken", |p| {
///     let handles = vec![p.invoke(name, ())];
///     p.invoke(collect, (handles,)); // Vec<Handle<String>> is not a Vec<Handle<i64>>
/// });
/// ```
///
/// Nor does a single handle of the element type:
///
/// ```compile_fail
/// use solidflow::prelude::*;
///
/// #[solid]
/// fn one(_ctx: &SolidContext) -> i64 { 1 }
///
/// #[solid]
/// fn collect(_ctx: &SolidContext, values: Vec<i64>) -> i64 { values.iter().sum() }
///
/// Pipeline::build("broken", |p| {
///     let h = p.invoke(one, ());
///     p.invoke(collect, (h,)); // a Handle<i64> is not a list; write `(vec![h],)`
/// });
/// ```
///
/// And a list of handles only fits a list input:
///
/// ```compile_fail
/// use solidflow::prelude::*;
///
/// #[solid]
/// fn one(_ctx: &SolidContext) -> i64 { 1 }
///
/// #[solid]
/// fn double(_ctx: &SolidContext, x: i64) -> i64 { x * 2 }
///
/// Pipeline::build("broken", |p| {
///     let handles = vec![p.invoke_as("a", one, ()), p.invoke_as("b", one, ())];
///     p.invoke(double, (handles,)); // `x: i64` takes one handle, not a Vec<Handle<i64>>
/// });
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be wired into an input of type `{T}`",
    label = "expected a `Handle<{T}>` (or, for a `Vec<E>` input, a `Vec<Handle<E>>`)"
)]
pub trait IntoHandle<T> {
    /// The handle for the input.
    fn into_handle(self) -> Handle<T>;
}

impl<T> IntoHandle<T> for Handle<T> {
    fn into_handle(self) -> Handle<T> {
        self
    }
}

impl<T> IntoHandle<Vec<T>> for Vec<Handle<T>> {
    fn into_handle(self) -> Handle<Vec<T>> {
        let sources = self
            .into_iter()
            .map(|h| match h.raw.0 {
                InputSource::Output { solid, output } => OutputRef { solid, output },
                // Not an upstream output (a config input): `build` reports the empty name.
                _ => OutputRef {
                    solid: String::new(),
                    output: String::new(),
                },
            })
            .collect();
        Handle {
            raw: RawHandle(InputSource::FanIn { sources }),
            _type: PhantomData,
        }
    }
}

/// The inputs of solid `S` as given to [`PipelineBuilder::invoke`]: a tuple with one
/// [`IntoHandle`] per input. `#[solid]` implements it for every solid.
#[diagnostic::on_unimplemented(
    message = "these inputs do not match the parameters of the solid",
    label = "expected a tuple with one handle per input of the solid, in order"
)]
pub trait IntoInputs<S: Solid> {
    /// The typed handles.
    fn into_inputs(self) -> S::Inputs;
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
    /// The config given when the pipeline was built ([`PipelineBuilder::invoke_with`]):
    /// the default of `solids.<alias>.config`, which run config may override key by key.
    pub config: Option<serde_json::Value>,
    /// The dynamic output this invocation fans out over, one step per item, when it was
    /// invoked inside [`PipelineBuilder::map`].
    pub mapped_over: Option<OutputRef>,
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
    /// A fan-in list holds a handle that is not an upstream output.
    #[error(
        "pipeline `{pipeline}`: the list wired into input `{input}` of solid `{solid}` holds a run-config input; a fan-in gathers upstream outputs only (give the whole input in run config instead)"
    )]
    FanInFromConfig {
        /// The pipeline.
        pipeline: String,
        /// The consuming solid.
        solid: String,
        /// The input.
        input: String,
    },
    /// An invocation was given config, but its solid takes none.
    #[error(
        "pipeline `{pipeline}`: solid `{solid}` was given config, but it declares no config type; add `config = MyConfig` to its `#[solid(..)]`"
    )]
    ConfigWithoutSchema {
        /// The pipeline.
        pipeline: String,
        /// The invocation.
        solid: String,
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
    /// A dynamic fan-out is wired in a way that cannot run.
    #[error("pipeline `{pipeline}`: solid `{solid}`: {reason}")]
    Dynamic {
        /// The pipeline.
        pipeline: String,
        /// The solid (invocation) where the wiring is wrong.
        solid: String,
        /// What is wrong and what to do.
        reason: String,
    },
}

/// An invocation as added, before [`Pipeline::build`] checks it: alias, solid, wiring.
type PendingInvocation = (
    String,
    Arc<SolidDefinition>,
    Vec<(String, RawHandle)>,
    Option<serde_json::Value>,
    Option<OutputRef>,
);

/// Collects invocations; [`Pipeline::build`] checks them.
pub struct PipelineBuilder {
    invocations: Vec<Invocation>,
    pending: Vec<PendingInvocation>,
    /// The dynamic output being mapped over, inside [`map`](Self::map).
    mapping: Option<OutputRef>,
    /// Wiring mistakes found while building, reported by [`Pipeline::build`].
    errors: Vec<String>,
}

impl PipelineBuilder {
    /// Invokes solid `S` under its own name with typed inputs; returns typed outputs.
    pub fn invoke<S: Solid>(
        &mut self,
        solid: impl FnOnce() -> S,
        inputs: impl IntoInputs<S>,
    ) -> S::Outputs {
        let alias = S::definition().name;
        self.invoke_as(&alias, solid, inputs)
    }

    /// Invokes solid `S` under `alias`, so one solid can appear several times.
    pub fn invoke_as<S: Solid>(
        &mut self,
        alias: &str,
        solid: impl FnOnce() -> S,
        inputs: impl IntoInputs<S>,
    ) -> S::Outputs {
        self.push::<S>(alias, solid, None, inputs)
    }

    /// Invokes solid `S` under `alias` with its own config, fixed when the pipeline is
    /// built (Dagster's `configured`). The config becomes the default of
    /// `solids.<alias>.config`: `config-schema` shows it, and run config may still
    /// override it key by key.
    ///
    /// ```
    /// use solidflow::prelude::*;
    ///
    /// #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
    /// struct BranchConfig { index: i64 }
    ///
    /// #[solid(config = BranchConfig)]
    /// fn branch(ctx: &SolidContext) -> Result<i64, SolidError> {
    ///     Ok(ctx.config::<BranchConfig>()?.index * 10)
    /// }
    ///
    /// let pipeline = Pipeline::build("branches", |p| {
    ///     for index in 0..3 {
    ///         p.invoke_with(&format!("branch_{index}"), branch, BranchConfig { index }, ());
    ///     }
    /// }).unwrap();
    /// let result = execute_pipeline(&pipeline, serde_json::json!({})).unwrap();
    /// assert_eq!(result.result::<i64>("branch_2").unwrap(), 20);
    /// ```
    ///
    /// A solid without config cannot be configured:
    ///
    /// ```compile_fail
    /// use solidflow::prelude::*;
    ///
    /// #[solid]
    /// fn plain(_ctx: &SolidContext) -> i64 { 1 }
    ///
    /// Pipeline::build("broken", |p| {
    ///     p.invoke_with("plain_1", plain, serde_json::json!({"x": 1}), ());
    /// });
    /// ```
    pub fn invoke_with<S: Solid>(
        &mut self,
        alias: &str,
        solid: impl FnOnce() -> S,
        config: S::Config,
        inputs: impl IntoInputs<S>,
    ) -> S::Outputs
    where
        S::Config: serde::Serialize,
    {
        let config = serde_json::to_value(&config).unwrap_or_else(|e| {
            // The config type's own `Serialize` failed (e.g. a map with non-string keys):
            // a bug in the pipeline's code, reported when it is built.
            panic!("config of solid `{alias}` cannot be serialized: {e}")
        });
        self.push::<S>(alias, solid, Some(config), inputs)
    }

    fn push<S: Solid>(
        &mut self,
        alias: &str,
        _solid: impl FnOnce() -> S,
        config: Option<serde_json::Value>,
        inputs: impl IntoInputs<S>,
    ) -> S::Outputs {
        let wiring = S::wire(inputs.into_inputs())
            .into_iter()
            .map(|(n, h)| (n.to_string(), h))
            .collect();
        self.pending.push((
            alias.to_string(),
            Arc::new(S::definition()),
            wiring,
            config,
            self.mapping.clone(),
        ));
        S::outputs(alias)
    }

    /// Starts wiring the body of a map over `over`; returns what to restore after.
    pub(crate) fn enter_map(&mut self, over: OutputRef) -> Option<OutputRef> {
        if let Some(outer) = &self.mapping {
            self.errors.push(format!(
                "a map over `{}.{}` is nested in a map over `{}.{}`; nested fan-outs are not supported: collect the inner one first",
                over.solid, over.output, outer.solid, outer.output
            ));
        }
        self.mapping.replace(over)
    }

    pub(crate) fn leave_map(&mut self, outer: Option<OutputRef>) {
        self.mapping = outer;
    }

    pub(crate) fn note_bad_map(&mut self, over: &OutputRef) {
        self.errors.push(format!(
            "the body of the map over `{}.{}` returned a handle that is not a value of a solid invoked in it; return the handle of the mapped solid's output",
            over.solid, over.output
        ));
    }

    /// Adds an erased solid under `alias`, with inputs as `(input name, source)`;
    /// returns nothing because outputs are referred to by [`RawHandle`]s built by name.
    pub fn add(
        &mut self,
        alias: &str,
        definition: SolidDefinition,
        inputs: Vec<(String, RawHandle)>,
    ) {
        self.pending.push((
            alias.to_string(),
            Arc::new(definition),
            inputs,
            None,
            self.mapping.clone(),
        ));
    }

    /// Like [`add`](Self::add), with the invocation's own config (see
    /// [`invoke_with`](Self::invoke_with)).
    pub fn add_configured(
        &mut self,
        alias: &str,
        definition: SolidDefinition,
        config: serde_json::Value,
        inputs: Vec<(String, RawHandle)>,
    ) {
        self.pending.push((
            alias.to_string(),
            Arc::new(definition),
            inputs,
            Some(config),
            self.mapping.clone(),
        ));
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
            mapping: None,
            errors: Vec::new(),
        };
        body(&mut builder);
        if let Some(reason) = builder.errors.into_iter().next() {
            return Err(DefinitionError::Dynamic {
                pipeline: name.into(),
                solid: "(map)".into(),
                reason,
            });
        }
        let mut invocations = builder.invocations;
        let mut seen = HashMap::new();
        for (alias, def, wiring, config, mapped_over) in builder.pending {
            if config.is_some() && def.config.is_none() {
                return Err(DefinitionError::ConfigWithoutSchema {
                    pipeline: name.into(),
                    solid: alias,
                });
            }
            if seen.insert(alias.clone(), def.clone()).is_some() {
                return Err(DefinitionError::DuplicateAlias {
                    pipeline: name.into(),
                    alias,
                });
            }
            let mut inputs = BTreeMap::new();
            // A wide fan-in step has as many inputs as wires: look names up by hash.
            let names: Option<HashSet<&str>> = (def.inputs.len() > 16)
                .then(|| def.inputs.iter().map(|i| i.name.as_str()).collect());
            for (input, RawHandle(source)) in wiring {
                let known = match &names {
                    Some(names) => names.contains(input.as_str()),
                    None => def.find_input(&input).is_some(),
                };
                if !known {
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
                config,
                mapped_over,
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
                let fan_in = matches!(
                    source,
                    InputSource::FanIn { .. } | InputSource::Collect { .. }
                );
                for OutputRef { solid, output } in source.upstream_outputs() {
                    if solid.is_empty() {
                        return Err(DefinitionError::FanInFromConfig {
                            pipeline: pipeline(),
                            solid: inv.alias.clone(),
                            input: input.name.clone(),
                        });
                    }
                    let upstream = index
                        .get(solid.as_str())
                        .map(|&i| &self.invocations[i])
                        .ok_or_else(|| DefinitionError::UnknownSolid {
                            pipeline: pipeline(),
                            solid: inv.alias.clone(),
                            input: input.name.clone(),
                            upstream: solid.clone(),
                        })?;
                    let out = upstream.definition.find_output(&output).ok_or_else(|| {
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
                    super::dynamic_check::wiring(self, inv, &input.name, source, upstream, out)?;
                    let fits = if fan_in {
                        out.ty.is_element_of(&input.ty)
                    } else {
                        out.ty == input.ty
                    };
                    if !fits {
                        let found = if fan_in {
                            format!("{} (as one item of the list)", out.ty.name)
                        } else {
                            out.ty.name.into()
                        };
                        return Err(DefinitionError::TypeMismatch {
                            pipeline: pipeline(),
                            solid: inv.alias.clone(),
                            input: input.name.clone(),
                            upstream: solid.clone(),
                            output: output.clone(),
                            expected: input.ty.name.into(),
                            found,
                        });
                    }
                }
            }
        }
        for inv in self.invocations.iter() {
            super::dynamic_check::outputs(self, inv)?;
        }
        let mut graph = petgraph::graph::DiGraph::<usize, ()>::new();
        let nodes: Vec<_> = (0..self.invocations.len())
            .map(|i| graph.add_node(i))
            .collect();
        for (i, inv) in self.invocations.iter().enumerate() {
            for source in inv.inputs.values() {
                for upstream in source.upstream_outputs() {
                    graph.add_edge(nodes[index[upstream.solid.as_str()]], nodes[i], ());
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
