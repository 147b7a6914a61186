//! Running one attempt of one step: load inputs, call the solid, store outputs.
//!
//! The in-process executor calls this on its worker threads; step mode (the step
//! protocol used by multiprocess and Dask) calls it in a child process. So a step
//! behaves the same everywhere.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::Instant;

use super::context::SolidContext;
use super::error::SolidError;
use super::event::{EventKind, Level};
use super::sink::EventSink;
use super::values::ValueStore;
use crate::config::RunConfig;
use crate::definition::pipeline::Pipeline;
use crate::definition::solid::Inputs;
use crate::definition::types::{TypeInfo, Value};
use crate::plan::{ExecutionPlan, ExecutionStep, StepInputSource};
use crate::storage::{IntermediateKey, IntermediateStorage};

/// Everything needed to run steps of one run.
#[derive(Clone)]
pub struct StepEnvironment {
    /// The run id.
    pub run_id: String,
    /// The pipeline.
    pub pipeline: Arc<Pipeline>,
    /// The compiled plan.
    pub plan: Arc<ExecutionPlan>,
    /// The validated run config.
    pub config: Arc<RunConfig>,
    /// Where outputs go when `memory` is `None`.
    pub storage: Arc<dyn IntermediateStorage>,
    /// In-memory outputs, used instead of storage for in-process `in_memory` runs.
    pub(crate) memory: Option<Arc<ValueStore>>,
    /// The event sink.
    pub events: EventSink,
}

impl StepEnvironment {
    /// Runs attempt `attempt` of step `index` of the plan. Emits `STEP_START`,
    /// `STEP_INPUT`, `STEP_OUTPUT` and, on success, `STEP_SUCCESS`; a failure is
    /// returned for the caller to turn into `STEP_UP_FOR_RETRY` or `STEP_FAILURE`.
    pub fn run_step(&self, index: usize, attempt: u32) -> Result<(), SolidError> {
        self.run(&self.plan.steps[index], attempt)
    }

    /// Runs attempt `attempt` of `step`, a step of the plan or one added while the run
    /// goes (a step of a fan-out); see [`run_step`](Self::run_step).
    pub fn run(&self, step: &ExecutionStep, attempt: u32) -> Result<(), SolidError> {
        let key = step.key.as_str();
        let started = Instant::now();
        self.events.emit(
            Some(key),
            Level::Info,
            format!("started {key} (attempt {attempt})"),
            EventKind::StepStart { attempt },
        );
        let invocation = self
            .pipeline
            .invocations()
            .get(step.invocation)
            .filter(|inv| inv.alias == step.solid)
            .ok_or_else(|| {
                SolidError::new(format!(
                    "solid `{}` is not in pipeline `{}`",
                    step.solid,
                    self.pipeline.name()
                ))
            })?;
        let def = &invocation.definition;
        let inputs = self.load_inputs(step, def)?;
        let solid_config = self.config.solids.get(&step.solid).map(|s| &s.config);
        let empty = serde_json::Value::Object(Default::default());
        let ctx = SolidContext::new(
            &self.run_id,
            key,
            &step.solid,
            attempt,
            solid_config.unwrap_or(&empty),
            &self.events,
        );
        let outputs = self
            .events
            .user_code(|| call_catching_panics(|| (def.compute)(&ctx, inputs)))?;
        let mut produced = outputs.into_values();
        for out in &def.outputs {
            let pos = produced
                .iter()
                .position(|(n, _)| n == &out.name)
                .ok_or_else(|| {
                    SolidError::new(format!(
                        "solid `{}` did not produce its output `{}`",
                        step.solid, out.name
                    ))
                })?;
            let (_, value) = produced.swap_remove(pos);
            if let Some(split) = out.dynamic {
                let items = split(value).map_err(|e| {
                    SolidError::new(format!(
                        "dynamic output `{}` of solid `{}`: {e}",
                        out.name, step.solid
                    ))
                })?;
                self.store_dynamic_output(step, &out.name, out.ty, items)?;
                continue;
            }
            if !out.ty.matches(&value) {
                return Err(SolidError::new(format!(
                    "output `{}` of solid `{}` is not a {}",
                    out.name, step.solid, out.ty.name
                )));
            }
            self.store_output(step, &out.name, out.ty, value)?;
        }
        let duration_ms = started.elapsed().as_millis() as u64;
        self.events.emit(
            Some(key),
            Level::Info,
            format!("{key} succeeded in {duration_ms} ms"),
            EventKind::StepSuccess {
                duration_ms,
                attempt,
            },
        );
        Ok(())
    }

    fn load_inputs(
        &self,
        step: &ExecutionStep,
        def: &crate::definition::solid::SolidDefinition,
    ) -> Result<Inputs, SolidError> {
        let mut values = BTreeMap::new();
        let mut prefetched = self.prefetch_step_inputs(step, def)?.into_iter();
        for (input, input_def) in step.inputs.iter().zip(&def.inputs) {
            let (value, source, source_run_id) = match &input.source {
                StepInputSource::Step {
                    step_key,
                    output,
                    run_id,
                } => {
                    let value = match prefetched.next().flatten() {
                        Some(value) => value,
                        None => {
                            self.load_output(run_id.as_deref(), step_key, output, input_def.ty)?
                        }
                    };
                    let source = match run_id {
                        Some(run) => format!("{step_key}.{output} of run {run}"),
                        None => format!("{step_key}.{output}"),
                    };
                    (value, source, run_id.clone())
                }
                StepInputSource::FanIn { sources } if sources.is_empty() => (
                    input_def
                        .ty
                        .from_json(serde_json::json!([]))
                        .map_err(SolidError::new)?,
                    "an empty fan-in".to_string(),
                    None,
                ),
                StepInputSource::FanIn { sources } => {
                    // A fan-in's upstream values are independent objects: up to the
                    // storage's `read_concurrency` of them are read at once (for S3,
                    // that many requests in flight).
                    let item_ty = self.fan_in_item_type(&step.solid, &input.name)?;
                    let limit = match self.memory {
                        Some(_) => 1,
                        None => self.storage.read_concurrency().max(1),
                    };
                    let items = map_bounded(sources, limit, |s| {
                        self.load_output(None, &s.step_key, &s.output, item_ty)
                    })?;
                    let value = item_ty.collect(items).map_err(SolidError::new)?;
                    (value, format!("fan-in of {} outputs", sources.len()), None)
                }
                StepInputSource::Mapped { step_key, .. } => {
                    return Err(SolidError::new(format!(
                        "{} is the template of a fan-out over {step_key}; it runs as one step per item, never itself",
                        step.key
                    )));
                }
                StepInputSource::Collect {
                    step_key,
                    output,
                    keys_from,
                    keys_run_id,
                    reused,
                } => {
                    let keys = self.dynamic_keys(
                        keys_run_id.as_deref(),
                        &keys_from.step_key,
                        &keys_from.output,
                    )?;
                    let item_ty = self.collect_item_type(&step.solid, &input.name)?;
                    let limit = match self.memory {
                        Some(_) => 1,
                        None => self.storage.read_concurrency().max(1),
                    };
                    let same_run =
                        crate::plan::StepKey::parse(step_key).is_none_or(|k| !k.is_template());
                    let items = map_bounded(&keys, limit, |k| {
                        let (key, out) = crate::plan::collect_item(step_key, output, k);
                        let run = match reused.get(k) {
                            Some(run) => Some(run.as_str()),
                            None if same_run => keys_run_id.as_deref(),
                            None => None,
                        };
                        self.load_output(run, &key, &out, item_ty)
                    })?;
                    let value = item_ty.collect(items).map_err(SolidError::new)?;
                    (
                        value,
                        format!("collect of {} items of {step_key}.{output}", keys.len()),
                        None,
                    )
                }
                StepInputSource::Config => {
                    let json = self
                        .config
                        .solids
                        .get(&step.solid)
                        .and_then(|s| s.inputs.get(&input.name))
                        .cloned()
                        .ok_or_else(|| {
                            SolidError::new(format!(
                                "input `{}` missing from run config",
                                input.name
                            ))
                        })?;
                    (
                        input_def.ty.from_json(json).map_err(SolidError::new)?,
                        "config".to_string(),
                        None,
                    )
                }
            };
            self.events.emit(
                Some(&step.key),
                Level::Debug,
                format!("input {} from {source}", input.name),
                EventKind::StepInput {
                    input: input.name.clone(),
                    type_name: input.type_name.into(),
                    source,
                    source_run_id,
                },
            );
            values.insert(input.name.clone(), value);
        }
        Ok(Inputs::new(values))
    }

    /// The stored values of a step's single-output inputs (`StepInputSource::Step`), in
    /// input order, read up to the storage's `read_concurrency` at once: a step wired
    /// to many upstream steps one input each is a fan-in too. Empty when values are in
    /// memory or there is at most one such input (the input loop reads them then).
    fn prefetch_step_inputs(
        &self,
        step: &ExecutionStep,
        def: &crate::definition::solid::SolidDefinition,
    ) -> Result<Vec<Option<Value>>, SolidError> {
        let reads: Vec<_> = step
            .inputs
            .iter()
            .zip(&def.inputs)
            .filter_map(|(input, input_def)| match &input.source {
                StepInputSource::Step {
                    step_key,
                    output,
                    run_id,
                } => Some((
                    run_id.as_deref(),
                    step_key.as_str(),
                    output.as_str(),
                    input_def.ty,
                )),
                _ => None,
            })
            .collect();
        let limit = self.storage.read_concurrency().max(1);
        if self.memory.is_some() || reads.len() <= 1 || limit <= 1 {
            return Ok(Vec::new());
        }
        let values = map_bounded(&reads, limit, |&(run_id, step_key, output, ty)| {
            self.load_output(run_id, step_key, output, ty)
        })?;
        Ok(values.into_iter().map(Some).collect())
    }

    /// Reads output `output` of `step_key`, from memory or from storage; from the
    /// storage of `run_id` when the value belongs to another run (a re-execution's
    /// parent), even when this run keeps its own values in memory.
    fn load_output(
        &self,
        run_id: Option<&str>,
        step_key: &str,
        output: &str,
        ty: crate::definition::types::TypeInfo,
    ) -> Result<Value, SolidError> {
        match self.memory.as_ref().filter(|_| run_id.is_none()) {
            Some(mem) => mem.get(step_key, output).ok_or_else(|| {
                SolidError::new(format!(
                    "output `{output}` of `{step_key}` is not in memory"
                ))
            }),
            None => {
                let key = IntermediateKey::new(run_id.unwrap_or(&self.run_id), step_key, output);
                let reader = self.storage.read(&key)?;
                ty.decode(reader).map_err(|e| {
                    SolidError::new(format!(
                        "cannot decode {} as {}",
                        self.storage.location(&key),
                        ty.name
                    ))
                    .caused_by(e.to_string())
                })
            }
        }
    }

    /// How a scheduler of this run reads the item keys of a fan-out.
    pub(crate) fn key_resolver(&self) -> super::scheduler::KeyResolver<'_> {
        Box::new(move |template: &ExecutionStep| {
            let d = template.dynamic.as_ref().ok_or_else(|| {
                SolidError::new(format!("{} is not a fan-out", template.key)).info()
            })?;
            self.dynamic_keys(d.over_run_id.as_deref(), &d.over.step_key, &d.over.output)
                .map_err(|e| {
                    SolidError::new(format!(
                        "cannot read the item keys of {}.{} for {}",
                        d.over.step_key, d.over.output, template.key
                    ))
                    .caused_by(e.to_string())
                    .info()
                })
        })
    }

    /// The item keys of dynamic output `output` of `step_key`, in order, from run
    /// `run_id` (this run when `None`).
    pub(crate) fn dynamic_keys(
        &self,
        run_id: Option<&str>,
        step_key: &str,
        output: &str,
    ) -> Result<Vec<String>, SolidError> {
        let value = self.load_output(run_id, step_key, output, TypeInfo::of::<Vec<String>>())?;
        value.downcast_ref::<Vec<String>>().cloned().ok_or_else(|| {
            SolidError::new(format!(
                "the keys of dynamic output `{output}` of `{step_key}` are not a list"
            ))
        })
    }

    /// The type of one item of collect input `input` of invocation `alias`: the type
    /// of the collected output.
    fn collect_item_type(&self, alias: &str, input: &str) -> Result<TypeInfo, SolidError> {
        let missing = || {
            SolidError::new(format!(
                "collect input `{input}` of `{alias}` has no upstream type"
            ))
        };
        let inv = self.pipeline.invocation(alias).ok_or_else(missing)?;
        let Some(crate::definition::pipeline::InputSource::Collect { solid, output }) =
            inv.inputs.get(input)
        else {
            return Err(missing());
        };
        self.pipeline
            .invocation(solid)
            .and_then(|u| u.definition.find_output(output))
            .map(|o| o.ty)
            .ok_or_else(missing)
    }

    /// Stores the items of dynamic output `output` each on its own (as output
    /// `<output>[<key>]`), then the list of keys as `output`: a step mapped over it
    /// finds its item, and the executor the keys. A bad or repeated key fails the
    /// step, naming it.
    fn store_dynamic_output(
        &self,
        step: &ExecutionStep,
        output: &str,
        ty: TypeInfo,
        items: Vec<(String, Value)>,
    ) -> Result<(), SolidError> {
        let mut seen = std::collections::HashSet::with_capacity(items.len());
        for (key, _) in &items {
            crate::plan::step_key::check_mapping_key(key).map_err(|e| {
                SolidError::new(format!(
                    "{}: dynamic output `{output}` has an item with the bad mapping key {key:?}: {e}",
                    step.key
                ))
            })?;
            if !seen.insert(key.as_str()) {
                return Err(SolidError::new(format!(
                    "{}: dynamic output `{output}` has two items with the mapping key {key:?}; mapping keys must be unique",
                    step.key
                )));
            }
        }
        let keys: Vec<String> = items.iter().map(|(k, _)| k.clone()).collect();
        let count = keys.len();
        let limit = match self.memory {
            Some(_) => 1,
            // Items are independent objects: written as many at once as reads are.
            None => self.storage.read_concurrency().max(1),
        };
        map_bounded(&items, limit, |(key, value)| {
            let name = crate::plan::StepKey::item_output(output, key);
            self.put(&step.key, &name, ty, value.clone()).map(|_| ())
        })?;
        let list = TypeInfo::of::<Vec<String>>();
        let stored = self.put(&step.key, output, list, Arc::new(keys))?;
        let message = format!("output {output}: {count} dynamic items");
        self.output_event(step, output, ty, stored, message);
        Ok(())
    }

    fn output_event(
        &self,
        step: &ExecutionStep,
        output: &str,
        ty: TypeInfo,
        (location, bytes): (Option<String>, Option<u64>),
        message: String,
    ) {
        self.events.emit(
            Some(&step.key),
            Level::Debug,
            message,
            EventKind::StepOutput {
                output: output.into(),
                type_name: ty.name.into(),
                location,
                bytes,
            },
        );
    }

    /// Writes one value to memory or storage; where and how many bytes, for storage.
    fn put(
        &self,
        step_key: &str,
        output: &str,
        ty: TypeInfo,
        value: Value,
    ) -> Result<(Option<String>, Option<u64>), SolidError> {
        Ok(match &self.memory {
            Some(mem) => {
                let value = ty.share(value).map_err(|e| {
                    SolidError::new(format!("output `{output}` of `{step_key}` failed"))
                        .caused_by(e)
                })?;
                mem.put(step_key, output, value);
                (None, None)
            }
            None => {
                let key = IntermediateKey::new(&self.run_id, step_key, output);
                let bytes = self.storage.write(&key, &mut |w| ty.encode(&value, w))?;
                (Some(self.storage.location(&key)), Some(bytes))
            }
        })
    }

    /// The type of one item of fan-in input `input` of invocation `alias`: the type of
    /// its first upstream output (the pipeline checked they all match).
    fn fan_in_item_type(
        &self,
        alias: &str,
        input: &str,
    ) -> Result<crate::definition::types::TypeInfo, SolidError> {
        let missing = || {
            SolidError::new(format!(
                "fan-in input `{input}` of `{alias}` has no upstream type"
            ))
        };
        let inv = self.pipeline.invocation(alias).ok_or_else(missing)?;
        let first = inv
            .inputs
            .get(input)
            .and_then(|s| s.upstream_outputs().into_iter().next());
        let first = first.ok_or_else(missing)?;
        self.pipeline
            .invocation(&first.solid)
            .and_then(|u| u.definition.find_output(&first.output))
            .map(|o| o.ty)
            .ok_or_else(missing)
    }

    fn store_output(
        &self,
        step: &ExecutionStep,
        output: &str,
        ty: TypeInfo,
        value: Value,
    ) -> Result<(), SolidError> {
        let stored = self.put(&step.key, output, ty, value)?;
        self.output_event(step, output, ty, stored, format!("output {output}"));
        Ok(())
    }
}

/// `f` applied to every item, at most `limit` at a time on scoped threads; results in
/// item order. The first error (by item order) is returned; after any error, items not
/// yet started are skipped.
fn map_bounded<I: Sync, T: Send, E: Send>(
    items: &[I],
    limit: usize,
    f: impl Fn(&I) -> Result<T, E> + Sync,
) -> Result<Vec<T>, E> {
    if items.len() <= 1 || limit <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let mut results: Vec<Option<Result<T, E>>> = items.iter().map(|_| None).collect();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..limit.min(items.len()))
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    while !failed.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        let result = f(item);
                        if result.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        done.push((i, result));
                    }
                    done
                })
            })
            .collect();
        for worker in workers {
            // A panic in `f` is a bug in storage or codec code: pass it on.
            let done = worker
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            for (i, result) in done {
                results[i] = Some(result);
            }
        }
    });
    let mut out = Vec::with_capacity(items.len());
    for result in results {
        match result {
            Some(r) => out.push(r?),
            // Skipped after an error, which comes earlier or later in item order.
            None => continue,
        }
    }
    Ok(out)
}

thread_local! {
    static PANIC_INFO: RefCell<Option<(String, Option<String>)>> = const { RefCell::new(None) };
    static IN_STEP: RefCell<bool> = const { RefCell::new(false) };
}

/// Calls `f`, turning a panic into a [`SolidError`] with the panic message and location.
pub(crate) fn call_catching_panics<T>(
    f: impl FnOnce() -> Result<T, SolidError>,
) -> Result<T, SolidError> {
    install_panic_hook();
    IN_STEP.with(|s| *s.borrow_mut() = true);
    let result = catch_unwind(AssertUnwindSafe(f));
    IN_STEP.with(|s| *s.borrow_mut() = false);
    result.unwrap_or_else(|_| {
        let (message, location) = PANIC_INFO
            .with(|p| p.borrow_mut().take())
            .unwrap_or(("panic".into(), None));
        Err(SolidError {
            panic_location: location.or(Some("unknown".into())),
            ..SolidError::new(format!("solid panicked: {message}"))
        })
    })
}

fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_STEP.with(|s| *s.borrow()) {
                // Inside a step the panic becomes a STEP_FAILURE event; don't also print it.
                let message = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".into());
                let location = info
                    .location()
                    .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
                PANIC_INFO.with(|p| *p.borrow_mut() = Some((message, location)));
            } else {
                previous(info);
            }
        }));
    });
}
