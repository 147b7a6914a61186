//! Dynamic fan-out: a solid returns a [`DynamicOutput`], a list of keyed items whose
//! length is known only when it runs; [`PipelineBuilder::map`] runs a solid once per
//! item (step `<solid>[<key>].compute`), and [`DynamicHandle::collect`] gathers the
//! mapped results, in item order, into one `Vec<T>` input (Dagster's
//! `DynamicOutput`, `.map()` and `.collect()`).
//!
//! ```
//! use solidflow::prelude::*;
//!
//! #[solid]
//! fn partitions(_ctx: &SolidContext) -> DynamicOutput<i64> {
//!     (1..=3).map(|i| (format!("part_{i}"), i)).collect()
//! }
//!
//! #[solid]
//! fn double(_ctx: &SolidContext, x: i64) -> i64 { x * 2 }
//!
//! #[solid]
//! fn total(_ctx: &SolidContext, values: Vec<i64>) -> i64 { values.iter().sum() }
//!
//! let pipeline = Pipeline::build("fan_out", |p| {
//!     let parts = p.invoke(partitions, ());
//!     let doubled = p.map(&parts, |p, part| p.invoke(double, (part,)));
//!     p.invoke(total, (doubled.collect(),));
//! }).unwrap();
//! let result = execute_pipeline(&pipeline, serde_json::json!({})).unwrap();
//! assert_eq!(result.result::<i64>("total").unwrap(), 12);
//! ```
//!
//! A dynamic output is not a plain value: it cannot be wired into an input directly.
//!
//! ```compile_fail
//! use solidflow::prelude::*;
//!
//! #[solid]
//! fn partitions(_ctx: &SolidContext) -> DynamicOutput<i64> { DynamicOutput::new() }
//!
//! #[solid]
//! fn double(_ctx: &SolidContext, x: i64) -> i64 { x * 2 }
//!
//! Pipeline::build("broken", |p| {
//!     let parts = p.invoke(partitions, ());
//!     p.invoke(double, (parts,)); // a DynamicHandle<i64> is not a Handle<i64>: use p.map
//! });
//! ```
//!
//! The items have the type the mapped solid takes:
//!
//! ```compile_fail
//! use solidflow::prelude::*;
//!
//! #[solid]
//! fn names(_ctx: &SolidContext) -> DynamicOutput<String> { DynamicOutput::new() }
//!
//! #[solid]
//! fn double(_ctx: &SolidContext, x: i64) -> i64 { x * 2 }
//!
//! Pipeline::build("broken", |p| {
//!     let names = p.invoke(names, ());
//!     p.map(&names, |p, name| p.invoke(double, (name,))); // Handle<String> is not Handle<i64>
//! });
//! ```
//!
//! and `collect` gives a list, which fits only a `Vec<T>` input of the item type:
//!
//! ```compile_fail
//! use solidflow::prelude::*;
//!
//! #[solid]
//! fn partitions(_ctx: &SolidContext) -> DynamicOutput<i64> { DynamicOutput::new() }
//!
//! #[solid]
//! fn first(_ctx: &SolidContext, x: i64) -> i64 { x }
//!
//! Pipeline::build("broken", |p| {
//!     let parts = p.invoke(partitions, ());
//!     p.invoke(first, (parts.collect(),)); // Handle<Vec<i64>> is not Handle<i64>
//! });
//! ```
//!
//! A mapping key names a step, a storage path and a Dask task: 1 to 128 ASCII letters,
//! digits and `_` ([`check_mapping_key`](crate::plan::step_key::check_mapping_key)).
//! A bad or repeated key fails the step that returned it, naming the key.

use std::marker::PhantomData;
use std::sync::Arc;

use super::pipeline::{Handle, InputSource, OutputRef, PipelineBuilder};
use super::types::{SolidType, Value};

/// What a solid returns to fan out: items, each under a mapping key, in order. Build it
/// with [`push`](Self::push), [`with`](Self::with) or by collecting `(key, value)` pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct DynamicOutput<T> {
    items: Vec<(String, T)>,
}

impl<T> Default for DynamicOutput<T> {
    fn default() -> Self {
        Self { items: Vec::new() }
    }
}

impl<T> DynamicOutput<T> {
    /// No items (a map over it runs no step; `collect` gives `[]`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds item `value` under `key`.
    pub fn push(&mut self, key: impl Into<String>, value: T) {
        self.items.push((key.into(), value));
    }

    /// Adds item `value` under `key`, builder style.
    pub fn with(mut self, key: impl Into<String>, value: T) -> Self {
        self.push(key, value);
        self
    }

    /// The number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are no items.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The items, in order.
    pub fn items(&self) -> &[(String, T)] {
        &self.items
    }
}

impl<K: Into<String>, T> FromIterator<(K, T)> for DynamicOutput<T> {
    fn from_iter<I: IntoIterator<Item = (K, T)>>(iter: I) -> Self {
        Self {
            items: iter.into_iter().map(|(k, v)| (k.into(), v)).collect(),
        }
    }
}

/// Splits a produced `DynamicOutput<T>` into its keyed items (the engine stores each
/// item on its own).
pub type SplitFn = fn(Value) -> Result<Vec<(String, Value)>, String>;

/// The [`SplitFn`] of `DynamicOutput<T>`.
pub(crate) fn split<T: SolidType>(value: Value) -> Result<Vec<(String, Value)>, String> {
    let typed = value.downcast::<DynamicOutput<T>>().map_err(|_| {
        format!(
            "the output is not a DynamicOutput<{}>",
            std::any::type_name::<T>()
        )
    })?;
    let output = Arc::try_unwrap(typed)
        .map_err(|_| "the dynamic output is shared and cannot be split".to_string())?;
    Ok(output
        .items
        .into_iter()
        .map(|(k, v)| (k, Arc::new(v) as Value))
        .collect())
}

/// A typed reference to a dynamic output (or to the per-item results of a map) in a
/// pipeline under construction. Fan out over it with [`PipelineBuilder::map`], gather
/// it with [`collect`](Self::collect).
pub struct DynamicHandle<T> {
    /// The invocation and output holding the items.
    source: OutputRef,
    /// The dynamic output the items come from (the same as `source`, or the dynamic
    /// output the mapped invocation `source.solid` maps over).
    over: OutputRef,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for DynamicHandle<T> {
    fn clone(&self) -> Self {
        Self {
            source: self.source.clone(),
            over: self.over.clone(),
            _type: PhantomData,
        }
    }
}

impl<T> DynamicHandle<T> {
    /// A handle to dynamic output `output` of invocation `solid` (used by generated code).
    pub fn output(solid: &str, output: &str) -> Self {
        let source = OutputRef {
            solid: solid.into(),
            output: output.into(),
        };
        Self {
            over: source.clone(),
            source,
            _type: PhantomData,
        }
    }

    /// Gathers every item, in item order, into one list: wire it into a `Vec<T>` input.
    pub fn collect(&self) -> Handle<Vec<T>> {
        Handle::from_source(InputSource::Collect {
            solid: self.source.solid.clone(),
            output: self.source.output.clone(),
        })
    }

    pub(crate) fn over(&self) -> &OutputRef {
        &self.over
    }
}

impl PipelineBuilder {
    /// Fans out over `items`: `body` wires the solids to run once per item, given the
    /// handle of one item, and returns the handle whose values
    /// [`collect`](DynamicHandle::collect) gathers or a further `map` maps over. Every solid
    /// invoked in `body` runs as one step per item, `<alias>[<key>].compute`; it may
    /// also read ordinary outputs, which every item's step shares. See the module docs.
    pub fn map<T, R>(
        &mut self,
        items: &DynamicHandle<T>,
        body: impl FnOnce(&mut PipelineBuilder, Handle<T>) -> Handle<R>,
    ) -> DynamicHandle<R> {
        let outer = self.enter_map(items.over().clone());
        let item = Handle::from_source(InputSource::Item {
            solid: items.source.solid.clone(),
            output: items.source.output.clone(),
        });
        let result = body(self, item).raw().0;
        self.leave_map(outer);
        let source = match result {
            InputSource::Output { solid, output } | InputSource::Item { solid, output } => {
                OutputRef { solid, output }
            }
            // Not a per-item value: `build` reports the map that returned it.
            _ => {
                self.note_bad_map(items.over());
                items.over().clone()
            }
        };
        DynamicHandle {
            source,
            over: items.over().clone(),
            _type: PhantomData,
        }
    }
}
