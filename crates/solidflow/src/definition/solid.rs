//! Solids: units of computation with typed inputs, outputs and config.
//!
//! Most users write solids with the [`#[solid]`](crate::solid) attribute, which builds a
//! [`SolidDefinition`] from a plain function. The definition is also public so that
//! solids can be assembled at run time (e.g. from a table of SQL queries).
//!
//! A solid's first parameter is its context; without it `#[solid]` reports one error,
//! "the first parameter of solid `double` must be the context `ctx: &SolidContext`",
//! on that parameter, and none at the call sites:
//!
//! ```compile_fail
//! use solidflow::prelude::*;
//!
//! #[solid]
//! fn double(x: i64) -> i64 { x * 2 }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use super::retry::RetryPolicy;
use super::types::{TypeInfo, Value};
use crate::config::schema::ConfigType;
use crate::execution::context::SolidContext;
use crate::execution::error::SolidError;

/// The name of the output a solid has when it declares none: `result`.
pub const DEFAULT_OUTPUT: &str = "result";

/// One named, typed input.
#[derive(Debug, Clone)]
pub struct InputDefinition {
    /// The input name (the function parameter's name).
    pub name: String,
    /// The input's type.
    pub ty: TypeInfo,
    /// What the input means.
    pub description: String,
}

/// One named, typed output.
#[derive(Debug, Clone)]
pub struct OutputDefinition {
    /// The output name (`result` by default).
    pub name: String,
    /// The output's type; for a dynamic output, the type of one item.
    pub ty: TypeInfo,
    /// Set for a dynamic output (`DynamicOutput<T>`): how to split it into its items.
    pub dynamic: Option<super::dynamic::SplitFn>,
}

/// The values a solid received, by input name.
#[derive(Default)]
pub struct Inputs {
    values: BTreeMap<String, Value>,
}

impl Inputs {
    /// Wraps resolved input values.
    pub fn new(values: BTreeMap<String, Value>) -> Self {
        Self { values }
    }

    /// Borrows input `name` as a `T`.
    pub fn get<T: 'static>(&self, name: &str) -> Result<&T, SolidError> {
        let value = self
            .values
            .get(name)
            .ok_or_else(|| SolidError::new(format!("input `{name}` was not provided")))?;
        value.downcast_ref::<T>().ok_or_else(|| {
            SolidError::new(format!(
                "input `{name}` is not a {}",
                std::any::type_name::<T>()
            ))
        })
    }

    /// Takes input `name` as an owned `T`, cloning only if another step shares the value.
    pub fn take<T: Clone + Send + Sync + 'static>(&mut self, name: &str) -> Result<T, SolidError> {
        let value = self
            .values
            .remove(name)
            .ok_or_else(|| SolidError::new(format!("input `{name}` was not provided")))?;
        let typed = value.downcast::<T>().map_err(|_| {
            SolidError::new(format!(
                "input `{name}` is not a {}",
                std::any::type_name::<T>()
            ))
        })?;
        Ok(Arc::try_unwrap(typed).unwrap_or_else(|shared| (*shared).clone()))
    }
}

/// The values a solid produced, by output name.
#[derive(Default)]
pub struct Outputs {
    values: Vec<(String, Value)>,
}

impl Outputs {
    /// No outputs yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Outputs with a single `result`.
    pub fn result<T: Send + Sync + 'static>(value: T) -> Self {
        Self::new().with(DEFAULT_OUTPUT, value)
    }

    /// Adds output `name`.
    pub fn with<T: Send + Sync + 'static>(mut self, name: &str, value: T) -> Self {
        self.values.push((name.to_string(), Arc::new(value)));
        self
    }

    /// Consumes the outputs.
    pub fn into_values(self) -> Vec<(String, Value)> {
        self.values
    }
}

/// The compute function of a solid, after type erasure.
pub type ComputeFn =
    Arc<dyn Fn(&SolidContext<'_>, Inputs) -> Result<Outputs, SolidError> + Send + Sync>;

/// Everything about a solid: signature, config, tags, resources, retry policy and body.
#[derive(Clone)]
pub struct SolidDefinition {
    /// The solid's name, unique within a pipeline unless aliased.
    pub name: String,
    /// What the solid does (from the function's doc comment with `#[solid]`).
    pub description: String,
    /// Typed inputs, in declaration order.
    pub inputs: Vec<InputDefinition>,
    /// Typed outputs, in declaration order.
    pub outputs: Vec<OutputDefinition>,
    /// The schema of `solids.<name>.config`, if the solid takes config.
    pub config: Option<ConfigType>,
    /// Free-form tags.
    pub tags: BTreeMap<String, String>,
    /// Resources one execution needs, e.g. `GPU = 1`.
    pub required_resources: BTreeMap<String, f64>,
    /// The default retry policy (run config may override it).
    pub retry_policy: Option<RetryPolicy>,
    /// The body.
    pub compute: ComputeFn,
}

impl std::fmt::Debug for SolidDefinition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SolidDefinition")
            .field("name", &self.name)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish_non_exhaustive()
    }
}

impl SolidDefinition {
    /// A solid with no inputs, a `result` output of type `T`, and the given body.
    /// Use the builder methods to add inputs, outputs, config and metadata.
    pub fn new(
        name: impl Into<String>,
        compute: impl Fn(&SolidContext<'_>, Inputs) -> Result<Outputs, SolidError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            config: None,
            tags: BTreeMap::new(),
            required_resources: BTreeMap::new(),
            retry_policy: None,
            compute: Arc::new(compute),
        }
    }

    /// Sets the description.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = text.into();
        self
    }

    /// Adds an input of type `ty`.
    pub fn input(mut self, name: impl Into<String>, ty: TypeInfo) -> Self {
        self.inputs.push(InputDefinition {
            name: name.into(),
            ty,
            description: String::new(),
        });
        self
    }

    /// Adds an output of type `ty`.
    pub fn output(mut self, name: impl Into<String>, ty: TypeInfo) -> Self {
        self.outputs.push(OutputDefinition {
            name: name.into(),
            ty,
            dynamic: None,
        });
        self
    }

    /// Adds a dynamic output: the solid returns a
    /// [`DynamicOutput<T>`](super::dynamic::DynamicOutput) under this name, and each
    /// item is a value of type `T` for a step mapped over it.
    pub fn dynamic_output<T: super::types::SolidType>(mut self, name: impl Into<String>) -> Self {
        self.outputs.push(OutputDefinition {
            name: name.into(),
            ty: TypeInfo::of::<T>(),
            dynamic: Some(super::dynamic::split::<T>),
        });
        self
    }

    /// Sets the config schema.
    pub fn config_schema(mut self, schema: ConfigType) -> Self {
        self.config = Some(schema);
        self
    }

    /// Adds a tag.
    pub fn tag(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.tags.insert(key.into(), value.into());
        self
    }

    /// Requires `amount` units of resource `name` (e.g. `GPU`, 1) per execution.
    pub fn requires(mut self, name: impl Into<String>, amount: f64) -> Self {
        self.required_resources.insert(name.into(), amount);
        self
    }

    /// Sets the default retry policy.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry_policy = Some(policy);
        self
    }

    /// Looks up an output by name.
    pub fn find_output(&self, name: &str) -> Option<&OutputDefinition> {
        self.outputs.iter().find(|o| o.name == name)
    }

    /// Looks up an input by name.
    pub fn find_input(&self, name: &str) -> Option<&InputDefinition> {
        self.inputs.iter().find(|i| i.name == name)
    }
}

/// The config type of a solid that takes no config: it has no values, so such a solid
/// cannot be given config with [`invoke_with`](super::pipeline::PipelineBuilder::invoke_with).
#[derive(Debug, Clone, Copy)]
pub enum NoConfig {}

impl serde::Serialize for NoConfig {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        match *self {}
    }
}

/// A solid known at compile time, generated by `#[solid]`; gives typed pipeline wiring.
pub trait Solid {
    /// A tuple of [`Handle`](super::pipeline::Handle)s, one per input, in order.
    type Inputs;
    /// A [`Handle`](super::pipeline::Handle) for one output, or a struct of handles.
    type Outputs;
    /// The solid's config type (`config = T` in `#[solid(..)]`), or [`NoConfig`].
    type Config;

    /// The erased definition.
    fn definition() -> SolidDefinition;

    /// Converts typed input handles into `(input name, handle)` pairs.
    fn wire(inputs: Self::Inputs) -> Vec<(&'static str, super::pipeline::RawHandle)>;

    /// Builds the typed output handles of the invocation called `alias`.
    fn outputs(alias: &str) -> Self::Outputs;
}
