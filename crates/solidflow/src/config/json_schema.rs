//! Turns the JSON Schema of a serde config type (derived with `schemars::JsonSchema`)
//! into a [`ConfigType`], so a solid's typed config is validated, documented and
//! defaulted like every other block.

use serde_json::{Map, Value};

use super::schema::{ConfigType, Field};

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
            let non_null: Vec<&Value> = options
                .iter()
                .filter(|o| o.get("type") != Some(&Value::from("null")))
                .collect();
            return if non_null.len() == 1 {
                convert(non_null[0], defs, depth + 1)
            } else {
                ConfigType::Any
            };
        }
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
        "integer" => ConfigType::Int,
        "number" => ConfigType::Float,
        "string" => ConfigType::String,
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
                if let Some(default) = prop.get("default") {
                    field = field.default(default.clone());
                }
                field
            }))
        }
        _ => ConfigType::Any,
    }
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

    #[allow(dead_code)]
    #[derive(serde::Deserialize, schemars::JsonSchema)]
    #[serde(rename_all = "lowercase")]
    enum Mode {
        Fast,
        Safe,
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
}
