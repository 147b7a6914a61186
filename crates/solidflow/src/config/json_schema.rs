//! Turns the JSON Schema of a serde config type (derived with `schemars::JsonSchema`)
//! into a [`ConfigType`], so a config type is validated, documented and defaulted from
//! one source: its Rust definition. Solid configs, executor and storage `config:`
//! blocks and retry policies all go through here.
//!
//! What is read: `type`, `properties`/`required`/`additionalProperties`, `items`,
//! `default` and `description`; `enum` and `oneOf`/`anyOf` of `const` strings (enum
//! variants with doc comments) as [`ConfigType::Enum`]; `oneOf` of one-key objects
//! (serde's externally tagged enums) as [`ConfigType::Selector`]; `minimum`/`maximum`
//! (`#[schemars(range(...))]`, and the bounds of integer formats such as `uint32`) and
//! `minLength` (`#[schemars(length(min = 1))]`).

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::{ConfigError, ConfigErrors};
use super::schema::{ConfigType, Field};
use super::validate::validate;

/// The config schema of `T`.
pub fn config_type_of<T: schemars::JsonSchema>() -> ConfigType {
    let schema = schemars::schema_for!(T);
    let root = schema.as_value();
    let defs = root
        .get("$defs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    convert(root, &defs, 0)
}

/// Validates a config block against `T`'s schema and deserializes it, defaults filled
/// in. `path` is where the block sits in run config (`["execution", "dask", "config"]`),
/// for the error messages. Factories call this on blocks that were validated already;
/// it makes them safe for values that did not come through run config, too.
pub fn parse_block<T>(value: &Value, path: &[&str]) -> Result<T, ConfigErrors>
where
    T: schemars::JsonSchema + DeserializeOwned,
{
    let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
    let mut errors = Vec::new();
    let value = if value.is_null() {
        Value::Object(Map::new())
    } else {
        value.clone()
    };
    let filled = validate(&config_type_of::<T>(), &value, &path, &mut errors);
    if !errors.is_empty() {
        return Err(ConfigErrors { errors });
    }
    serde_json::from_value(filled).map_err(|e| ConfigError::new(&path, e.to_string()).into())
}

/// The JSON Schema of a resource map (`{GPU: 1, memory_gb: 16}`): names to amounts
/// from 0 to 10^9. For `#[schemars(schema_with = "...")]` on resource fields.
pub fn resources_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1e9}
    })
}

fn convert(schema: &Value, defs: &Map<String, Value>, depth: usize) -> ConfigType {
    if depth > 32 {
        return ConfigType::Any; // recursive types: stop checking deep down
    }
    let Some(obj) = schema.as_object() else {
        return ConfigType::Any;
    };
    if let Some(r) = obj.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or(r);
        return defs
            .get(name)
            .map(|d| convert(d, defs, depth + 1))
            .unwrap_or(ConfigType::Any);
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(options) = obj.get(key).and_then(Value::as_array) {
            return convert_alternatives(options, defs, depth);
        }
    }
    if let Some(value) = obj.get("const").and_then(Value::as_str) {
        return ConfigType::one_of([value]);
    }
    if let Some(values) = obj.get("enum").and_then(Value::as_array) {
        let strings: Vec<String> = values
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        if strings.len() == values.len() {
            return ConfigType::one_of(strings);
        }
        return ConfigType::Any;
    }
    let ty = match obj.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(Value::Array(types)) => {
            let non_null: Vec<&str> = types
                .iter()
                .filter_map(Value::as_str)
                .filter(|t| *t != "null")
                .collect();
            if non_null.len() == 1 {
                non_null[0]
            } else {
                return ConfigType::Any;
            }
        }
        _ => return ConfigType::Any,
    };
    match ty {
        "boolean" => ConfigType::Bool,
        "integer" => {
            let (minimum, maximum) = bounds(obj);
            ConfigType::Int { minimum, maximum }
        }
        "number" => {
            let (minimum, maximum) = bounds(obj);
            ConfigType::Float { minimum, maximum }
        }
        "string" => ConfigType::String {
            min_length: obj.get("minLength").and_then(Value::as_u64),
        },
        "array" => ConfigType::list(
            obj.get("items")
                .map(|i| convert(i, defs, depth + 1))
                .unwrap_or(ConfigType::Any),
        ),
        "object" => {
            let Some(props) = obj.get("properties").and_then(Value::as_object) else {
                let value = obj
                    .get("additionalProperties")
                    .map(|v| convert(v, defs, depth + 1))
                    .unwrap_or(ConfigType::Any);
                return ConfigType::map(value);
            };
            let required: Vec<&str> = obj
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            ConfigType::shape(props.iter().map(|(name, prop)| {
                let mut field = if required.contains(&name.as_str()) {
                    Field::required(name, convert(prop, defs, depth + 1))
                } else {
                    Field::optional(name, convert(prop, defs, depth + 1))
                };
                if let Some(d) = prop.get("description").and_then(Value::as_str) {
                    field = field.doc(d);
                }
                if let Some(default) = prop.get("default").filter(|d| !d.is_null()) {
                    field = field.default(default.clone());
                }
                field
            }))
        }
        _ => ConfigType::Any,
    }
}

/// `anyOf`/`oneOf`: an optional value, an enum of documented strings, or a selector.
fn convert_alternatives(options: &[Value], defs: &Map<String, Value>, depth: usize) -> ConfigType {
    let resolved: Vec<&Value> = options
        .iter()
        .map(|o| resolve(o, defs))
        .filter(|o| o.get("type") != Some(&Value::from("null")))
        .collect();
    if let [only] = resolved.as_slice() {
        return convert(only, defs, depth + 1);
    }
    let consts: Option<Vec<&str>> = resolved
        .iter()
        .map(
            |o| match (o.get("const"), o.get("enum").and_then(Value::as_array)) {
                (Some(c), _) => c.as_str(),
                (None, Some(values)) if values.len() == 1 => values[0].as_str(),
                _ => None,
            },
        )
        .collect();
    if let Some(values) = consts {
        return ConfigType::one_of(values);
    }
    let choices: Option<Vec<Field>> = resolved
        .iter()
        .map(|o| {
            let props = o.get("properties")?.as_object()?;
            let (name, inner) = props.iter().next().filter(|_| props.len() == 1)?;
            let doc = o
                .get("description")
                .or_else(|| inner.get("description"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            Some(Field::optional(name, convert(inner, defs, depth + 1)).doc(doc))
        })
        .collect();
    choices.map_or(ConfigType::Any, ConfigType::selector)
}

fn resolve<'a>(schema: &'a Value, defs: &'a Map<String, Value>) -> &'a Value {
    schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| defs.get(r.rsplit('/').next().unwrap_or(r)))
        .unwrap_or(schema)
}

/// `minimum`/`maximum` (an exclusive bound counts as inclusive of the next value),
/// else the range of the integer `format`.
fn bounds(obj: &Map<String, Value>) -> (Option<f64>, Option<f64>) {
    let number = |key: &str| obj.get(key).and_then(Value::as_f64);
    let (lo, hi) = match obj.get("format").and_then(Value::as_str) {
        Some("uint8") => (Some(0.0), Some(u8::MAX as f64)),
        Some("uint16") => (Some(0.0), Some(u16::MAX as f64)),
        Some("uint32") => (Some(0.0), Some(u32::MAX as f64)),
        // Wider integers need no maximum: JSON integers beyond 64 bits are not integers here.
        Some("uint64" | "uint" | "uint128") => (Some(0.0), None),
        Some("int8") => (Some(i8::MIN as f64), Some(i8::MAX as f64)),
        Some("int16") => (Some(i16::MIN as f64), Some(i16::MAX as f64)),
        Some("int32") => (Some(i32::MIN as f64), Some(i32::MAX as f64)),
        _ => (None, None),
    };
    let minimum = number("minimum")
        .or_else(|| number("exclusiveMinimum").map(f64::next_up))
        .or(lo);
    let maximum = number("maximum")
        .or_else(|| number("exclusiveMaximum").map(f64::next_down))
        .or(hi);
    (minimum, maximum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validate::validate;
    use serde_json::json;

    /// Settings of a test solid.
    #[allow(dead_code)]
    #[derive(serde::Deserialize, schemars::JsonSchema)]
    struct Settings {
        /// Where to read from.
        path: String,
        #[serde(default = "ten")]
        limit: u32,
        mode: Option<Mode>,
    }

    /// How to run.
    #[allow(dead_code)]
    #[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
    #[serde(rename_all = "lowercase")]
    enum Mode {
        /// Skip the checks.
        Fast,
        /// Check everything.
        Safe,
    }

    /// Where to send things.
    #[allow(dead_code)]
    #[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
    #[serde(rename_all = "lowercase")]
    enum Target {
        /// A file.
        File { path: String },
        /// Nowhere.
        Null {},
    }

    #[allow(dead_code)]
    #[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct Bounded {
        workers: u32,
        #[schemars(range(min = 0.1, max = 60))]
        timeout: f64,
        #[schemars(length(min = 1))]
        dir: String,
        mode: Mode,
        target: Option<Target>,
    }

    fn ten() -> u32 {
        10
    }

    #[test]
    fn derives_fields_defaults_and_docs() {
        let ty = config_type_of::<Settings>();
        let mut errors = vec![];
        let v = validate(&ty, &json!({"path": "/x"}), &[], &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(v["limit"], 10);
        validate(
            &ty,
            &json!({"limit": "many", "mode": "slow"}),
            &[],
            &mut errors,
        );
        let text = format!("{errors:?}");
        assert_eq!(errors.len(), 3, "{text}");
        assert!(text.contains("Where to read from"));
    }

    #[test]
    fn documented_enums_are_enums_and_their_values_are_listed() {
        let ty = config_type_of::<Bounded>();
        let ConfigType::Shape { fields } = &ty else {
            panic!("{ty:?}")
        };
        let mode = fields.iter().find(|f| f.name == "mode").unwrap();
        assert_eq!(mode.ty.describe(), "one of fast, safe");
        let target = fields.iter().find(|f| f.name == "target").unwrap();
        assert_eq!(
            target.ty.describe(),
            "a map with exactly one of: file, null"
        );
        let mut errors = vec![];
        let good = json!({"workers": 1, "timeout": 1, "dir": "d", "mode": "safe", "target": {"file": {"path": "x"}}});
        validate(&ty, &good, &[], &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        validate(
            &ty,
            &json!({"workers": 1, "timeout": 1, "dir": "d", "mode": "slow", "target": {"fil": {}}}),
            &[],
            &mut errors,
        );
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 2, "{text:#?}");
        assert!(
            text[0].starts_with("mode: `slow` is not one of fast, safe"),
            "{text:#?}"
        );
        assert!(text[1].contains("target.fil: unknown key"), "{text:#?}");
    }

    #[test]
    fn unsigned_ranges_and_lengths_are_enforced() {
        let ty = config_type_of::<Bounded>();
        let mut errors = vec![];
        validate(
            &ty,
            &json!({"workers": -1, "timeout": 1e30, "dir": "", "mode": "fast"}),
            &[],
            &mut errors,
        );
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 3, "{text:#?}");
        assert!(
            text[0].starts_with(
                "workers: expected an integer from 0 to 4294967295, found the number -1"
            ),
            "{text:#?}"
        );
        assert!(
            text[1].starts_with("timeout: expected a number from 0.1 to 60"),
            "{text:#?}"
        );
        assert!(
            text[2].starts_with("dir: expected a non-empty string"),
            "{text:#?}"
        );
        let err = parse_block::<Bounded>(&json!({"workers": 4294967296u64}), &["x"]).unwrap_err();
        assert!(
            err.to_string().contains("x.workers: expected an integer"),
            "{err}"
        );
    }
}
