//! The run config of one pipeline in one mode: its schema, and the validated result.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{ConfigError, ConfigErrors};
use super::schema::{ConfigType, Field};
use super::source::ConfigSources;
use super::validate::validate;
use crate::definition::pipeline::{InputSource, Pipeline};
use crate::definition::retry::RetryPolicy;

/// The block selected by a selector key, e.g. `execution: {dask: {config: {...}}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selected {
    /// The key (`dask`).
    pub name: String,
    /// The contents of its `config:` block with defaults filled in (`{}` if none).
    pub config: Value,
}

/// The per-solid part of run config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SolidRunConfig {
    /// `solids.<alias>.config`, validated against the solid's schema.
    pub config: Value,
    /// `solids.<alias>.inputs`, one JSON value per config-provided input.
    pub inputs: BTreeMap<String, Value>,
    /// `solids.<alias>.retry`, overriding the solid's retry policy.
    pub retry: Option<RetryPolicy>,
}

/// A run config that passed validation for one pipeline and mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// The mode the config was validated for.
    pub mode: String,
    /// The whole config with defaults filled in, as recorded in run history.
    pub value: Value,
    /// The `storage:` choice.
    pub storage: Selected,
    /// The `execution:` choice.
    pub execution: Selected,
    /// Per-solid config, by alias; a solid with nothing in run config (no config, no
    /// inputs, no retry) has no entry, which means the defaults.
    pub solids: BTreeMap<String, SolidRunConfig>,
    /// The console log level from `loggers.console.config.log_level`.
    pub log_level: String,
}

/// The schema of the run config for `pipeline` in mode `mode`.
pub fn run_config_schema(
    pipeline: &Pipeline,
    mode: Option<&str>,
) -> Result<ConfigType, ConfigError> {
    let mode = pipeline
        .mode(mode)
        .ok_or_else(|| unknown_mode(pipeline, mode.unwrap_or_default()))?;
    let solids = pipeline.invocations().iter().map(|inv| {
        let mut fields = Vec::new();
        if let Some(schema) = &inv.definition.config {
            let mut f = Field::optional("config", schema.clone());
            f.required = schema.has_required_fields();
            if let Some(config) = &inv.config {
                // Set when the pipeline was built; run config overrides it key by key.
                f = f.default(config.clone());
            }
            fields.push(f.doc(format!("Config of solid `{}`.", inv.alias)));
        }
        let config_inputs: Vec<Field> = inv
            .definition
            .inputs
            .iter()
            .filter(|i| inv.inputs.get(&i.name) == Some(&InputSource::Config))
            .map(|i| {
                Field::required(&i.name, ConfigType::Any)
                    .doc(format!("Value of type {}.", i.ty.name))
            })
            .collect();
        if !config_inputs.is_empty() {
            fields.push(
                Field::required("inputs", ConfigType::shape(config_inputs))
                    .doc("Inputs not wired to an upstream output."),
            );
        }
        fields.push(
            Field::optional("retry", RetryPolicy::config_schema())
                .doc("Overrides the solid's retry policy."),
        );
        let ty = ConfigType::shape(fields);
        let required = ty.has_required_fields();
        let mut f = Field::optional(&inv.alias, ty);
        f.required = required;
        f.doc(if inv.definition.description.is_empty() {
            String::new()
        } else {
            inv.definition.description.clone()
        })
    });
    let solids_ty = ConfigType::shape(solids);
    let solids_required = solids_ty.has_required_fields();
    let selector = |defs: Vec<(&str, &str, ConfigType)>, default: &str| {
        let default_value = serde_json::json!({ default: {} });
        let choices = defs.into_iter().map(|(name, doc, config)| {
            Field::optional(name, ConfigType::config_block(config)).doc(doc)
        });
        Field::optional("", ConfigType::selector(choices)).default(default_value)
    };
    let storage_defs = mode
        .storages
        .iter()
        .map(|s| (s.name, s.description, (s.config)()))
        .collect();
    let executor_defs = mode
        .executors
        .iter()
        .map(|e| (e.name, e.description, (e.config)()))
        .collect();
    let mut storage = selector(
        storage_defs,
        mode.storages.first().map_or("in_memory", |s| s.name),
    );
    storage.name = "storage".into();
    let mut execution = selector(
        executor_defs,
        mode.executors.first().map_or("in_process", |e| e.name),
    );
    execution.name = "execution".into();
    let loggers = ConfigType::shape([Field::optional(
        "console",
        ConfigType::config_block(ConfigType::shape([Field::optional(
            "log_level",
            ConfigType::one_of(["DEBUG", "INFO", "WARNING", "ERROR"]),
        )
        .default("INFO")
        .doc("Lowest level printed to the console.")])),
    )]);
    let mut solids_field =
        Field::optional("solids", solids_ty).doc("Per-solid config, inputs and retry policy.");
    solids_field.required = solids_required;
    Ok(ConfigType::shape([
        solids_field,
        storage.doc("Where intermediates are stored."),
        execution.doc("How steps are executed."),
        Field::optional("loggers", loggers).doc("Console logging."),
        Field::optional("resources", ConfigType::map(ConfigType::Any))
            .doc("Resource config, by resource name (reserved)."),
    ]))
}

fn unknown_mode(pipeline: &Pipeline, mode: &str) -> ConfigError {
    let names: Vec<&str> = pipeline.modes().iter().map(|m| m.name.as_str()).collect();
    ConfigError::new(
        &[],
        format!(
            "pipeline `{}` has no mode `{mode}`; modes: {}",
            pipeline.name(),
            names.join(", ")
        ),
    )
}

impl RunConfig {
    /// Validates merged config for `pipeline` in `mode` (the default mode for `None`),
    /// reporting every problem at once, each with its path and source location.
    pub fn validate(
        pipeline: &Pipeline,
        mode: Option<&str>,
        sources: &ConfigSources,
    ) -> Result<Self, ConfigErrors> {
        let schema = run_config_schema(pipeline, mode)?;
        let mode_name = pipeline
            .mode(mode)
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let mut errors = Vec::new();
        let mut root = Value::Object(Map::new());
        for inv in pipeline.invocations() {
            if let Some(config) = &inv.config {
                let layer = serde_json::json!({"solids": {&inv.alias: {"config": config}}});
                super::source::deep_merge(&mut root, layer);
            }
        }
        if !sources.value.is_null() {
            super::source::deep_merge(&mut root, sources.value.clone());
        }
        let value = validate(&schema, &root, &[], &mut errors);
        for inv in pipeline.invocations() {
            let inputs = value
                .get("solids")
                .and_then(|s| s.get(&inv.alias))
                .and_then(|b| b.get("inputs"))
                .and_then(Value::as_object);
            for (name, v) in inputs.into_iter().flatten() {
                if let Some(def) = inv.definition.find_input(name)
                    && let Err(e) = def.ty.from_json(v.clone())
                {
                    let path = ["solids", &inv.alias, "inputs", name].map(String::from);
                    errors.push(ConfigError::new(
                        &path,
                        format!("not a valid {}: {e}", def.ty.name),
                    ));
                }
            }
        }
        sources.annotate(&mut errors);
        if !errors.is_empty() {
            return Err(ConfigErrors { errors });
        }
        Self::from_validated(pipeline, &mode_name, value)
            .map_err(|e| ConfigError::new(&[], e).into())
    }

    /// Rebuilds a run config from a value that [`validate`](Self::validate) already
    /// produced (`RunConfig::value`), without validating it again. Step processes use
    /// this: the parent validated the config, and validation costs time in proportion to
    /// the pipeline's size on every step.
    pub fn from_validated(pipeline: &Pipeline, mode: &str, value: Value) -> Result<Self, String> {
        Self::from_validated_solids(pipeline.invocations(), mode, value)
    }

    /// Like [`from_validated`](Self::from_validated), but reads the block of solid
    /// `alias` only: all a step process running that solid needs, whatever the size of
    /// the pipeline. `None` if the pipeline has no such solid.
    pub fn from_validated_for_solid(
        pipeline: &Pipeline,
        mode: &str,
        value: Value,
        alias: &str,
    ) -> Option<Result<Self, String>> {
        let inv = pipeline.invocation(alias)?;
        Some(Self::from_validated_solids(
            std::slice::from_ref(inv),
            mode,
            value,
        ))
    }

    fn from_validated_solids(
        invocations: &[crate::definition::pipeline::Invocation],
        mode: &str,
        value: Value,
    ) -> Result<Self, String> {
        let mut solids = BTreeMap::new();
        for inv in invocations {
            let Some(block) = value.get("solids").and_then(|s| s.get(&inv.alias)) else {
                // Nothing configured: readers treat a missing entry as the defaults.
                continue;
            };
            let field = |key: &str| block.get(key);
            let inputs = field("inputs")
                .and_then(Value::as_object)
                .into_iter()
                .flatten();
            let retry = field("retry").map(|r| {
                inv.definition
                    .retry_policy
                    .clone()
                    .unwrap_or_default()
                    .overridden_by(r)
            });
            let cfg = SolidRunConfig {
                config: field("config")
                    .cloned()
                    .unwrap_or(Value::Object(Map::new())),
                inputs: inputs.map(|(k, v)| (k.clone(), v.clone())).collect(),
                retry,
            };
            solids.insert(inv.alias.clone(), cfg);
        }
        let selected = |key: &str| {
            let (name, block) = value
                .get(key)
                .and_then(Value::as_object)
                .and_then(|m| m.iter().next())
                .ok_or_else(|| format!("run config has no `{key}` choice; was it validated?"))?;
            Ok::<_, String>(Selected {
                name: name.clone(),
                config: block
                    .get("config")
                    .cloned()
                    .unwrap_or(Value::Object(Map::new())),
            })
        };
        let log_level = value
            .pointer("/loggers/console/config/log_level")
            .and_then(Value::as_str)
            .unwrap_or("INFO")
            .to_string();
        Ok(Self {
            mode: mode.to_string(),
            storage: selected("storage")?,
            execution: selected("execution")?,
            solids,
            log_level,
            value,
        })
    }
}
