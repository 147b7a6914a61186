//! Validation of config values against a [`ConfigType`], collecting every error.

use serde_json::{Map, Value};

use super::error::ConfigError;
use super::schema::{ConfigType, Field};

/// Checks `value` against `ty`, pushing one error per problem into `errors`, and
/// returns the value with defaults filled in.
pub fn validate(
    ty: &ConfigType,
    value: &Value,
    path: &[String],
    errors: &mut Vec<ConfigError>,
) -> Value {
    match (ty, value) {
        (ConfigType::Any, v) => v.clone(),
        (ConfigType::Bool, Value::Bool(_)) => value.clone(),
        (ConfigType::Int { minimum, maximum }, Value::Number(n))
            if (n.is_i64() || n.is_u64())
                && in_range(n.as_f64().unwrap_or(f64::NAN), *minimum, *maximum) =>
        {
            value.clone()
        }
        (ConfigType::Float { minimum, maximum }, Value::Number(n))
            if n.as_f64()
                .is_some_and(|x| x.is_finite() && in_range(x, *minimum, *maximum)) =>
        {
            value.clone()
        }
        (ConfigType::String { min_length }, Value::String(s))
            if s.chars().count() as u64 >= min_length.unwrap_or(0) =>
        {
            value.clone()
        }
        (ConfigType::Enum { values }, Value::String(s)) if values.contains(s) => value.clone(),
        (ConfigType::Enum { values }, Value::String(s)) => {
            let mut err =
                ConfigError::new(path, format!("`{s}` is not one of {}", values.join(", ")));
            err.hint = did_you_mean(s, values.iter().map(String::as_str))
                .map(|m| format!("did you mean `{m}`?"));
            errors.push(err);
            value.clone()
        }
        (ConfigType::List { item }, Value::Array(items)) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| validate(item, v, &child(path, &i.to_string()), errors))
                .collect(),
        ),
        (ConfigType::Map { value: vt }, Value::Object(map)) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), validate(vt, v, &child(path, k), errors)))
                .collect(),
        ),
        // `{}` written as `~` or nothing at all in YAML means "no options".
        (ConfigType::Shape { fields }, Value::Null) if !fields.iter().any(|f| f.required) => {
            validate_shape(fields, &Map::new(), path, errors)
        }
        (ConfigType::Shape { fields }, Value::Object(map)) => {
            validate_shape(fields, map, path, errors)
        }
        (ConfigType::Selector { fields }, Value::Object(map)) => {
            validate_selector(fields, map, path, errors)
        }
        (ConfigType::Selector { fields }, Value::String(s)) => {
            // Shorthand: `execution: dask` means `execution: {dask: {}}`.
            let mut map = Map::new();
            map.insert(s.clone(), Value::Object(Map::new()));
            validate_selector(fields, &map, path, errors)
        }
        (ty, v) => {
            errors.push(ConfigError::new(
                path,
                format!("expected {}, found {}", ty.describe(), describe_value(v)),
            ));
            v.clone()
        }
    }
}

fn validate_shape(
    fields: &[Field],
    map: &Map<String, Value>,
    path: &[String],
    errors: &mut Vec<ConfigError>,
) -> Value {
    let mut out = Map::new();
    for (key, v) in map {
        match fields.iter().find(|f| &f.name == key) {
            Some(field) => {
                out.insert(
                    key.clone(),
                    validate(&field.ty, v, &child(path, key), errors),
                );
            }
            None => errors.push(unknown_key(key, fields, path)),
        }
    }
    for field in fields {
        if map.contains_key(&field.name) {
            continue;
        }
        if let Some(default) = &field.default {
            out.insert(field.name.clone(), default.clone());
        } else if let (true, ConfigType::Shape { fields: inner }) = (field.required, &field.ty) {
            // A missing required block: report the innermost missing keys, which say more.
            validate_shape(inner, &Map::new(), &child(path, &field.name), errors);
        } else if field.required {
            let mut err = ConfigError::new(
                &child(path, &field.name),
                format!(
                    "missing required key `{}` ({})",
                    field.name,
                    field.ty.describe()
                ),
            );
            if !field.description.is_empty() {
                err.hint = Some(field.description.clone());
            }
            errors.push(err);
        } else if field.ty.has_required_fields() {
            // Optional block whose contents have required keys: leave it out.
        } else if let ConfigType::Shape { fields: inner } = &field.ty {
            // Optional nested shape: fill its own defaults so consumers see one complete value.
            let filled = validate_shape(inner, &Map::new(), &child(path, &field.name), errors);
            if filled.as_object().is_some_and(|m| !m.is_empty()) {
                out.insert(field.name.clone(), filled);
            }
        }
    }
    Value::Object(out)
}

fn validate_selector(
    fields: &[Field],
    map: &Map<String, Value>,
    path: &[String],
    errors: &mut Vec<ConfigError>,
) -> Value {
    let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
    if map.len() != 1 {
        let found = if map.is_empty() {
            "none".to_string()
        } else {
            map.keys()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        errors.push(ConfigError::new(
            path,
            format!(
                "expected exactly one of {} but found {found}",
                names.join(", ")
            ),
        ));
        return Value::Object(map.clone());
    }
    let (key, v) = map.iter().next().expect("one entry");
    match fields.iter().find(|f| &f.name == key) {
        Some(field) => {
            let mut out = Map::new();
            out.insert(
                key.clone(),
                validate(&field.ty, v, &child(path, key), errors),
            );
            Value::Object(out)
        }
        None => {
            errors.push(unknown_key(key, fields, path));
            Value::Object(map.clone())
        }
    }
}

fn unknown_key(key: &str, fields: &[Field], path: &[String]) -> ConfigError {
    let names = fields.iter().map(|f| f.name.as_str());
    let mut err = ConfigError::new(&child(path, key), format!("unknown key `{key}`"));
    err.hint = Some(match did_you_mean(key, names.clone()) {
        Some(m) => format!("did you mean `{m}`?"),
        None if fields.is_empty() => "this block takes no keys".to_string(),
        None => format!("expected one of: {}", names.collect::<Vec<_>>().join(", ")),
    });
    err
}

/// The closest of `candidates` to `word`, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

fn in_range(x: f64, minimum: Option<f64>, maximum: Option<f64>) -> bool {
    minimum.is_none_or(|lo| x >= lo) && maximum.is_none_or(|hi| x <= hi)
}

/// Appends one segment to a config path.
pub fn child(path: &[String], segment: &str) -> Vec<String> {
    let mut p = path.to_vec();
    p.push(segment.to_string());
    p
}

/// Describes a JSON value for "found ..." messages.
pub fn describe_value(v: &Value) -> String {
    match v {
        Value::Null => "nothing (null)".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.chars().count() > 60 => {
            format!("a string of {} characters", s.chars().count())
        }
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a map".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> ConfigType {
        ConfigType::shape([
            Field::required("address", ConfigType::STRING),
            Field::optional("timeout", ConfigType::FLOAT).default(30),
            Field::optional(
                "resources",
                ConfigType::map(ConfigType::Float {
                    minimum: Some(0.0),
                    maximum: None,
                }),
            ),
        ])
    }

    #[test]
    fn fills_defaults_and_accepts_valid_values() {
        let mut errors = vec![];
        let v = validate(
            &schema(),
            &json!({"address": "tcp://x:1"}),
            &[],
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(v, json!({"address": "tcp://x:1", "timeout": 30}));
    }

    #[test]
    fn reports_every_error_with_path_and_hint() {
        let mut errors = vec![];
        validate(
            &schema(),
            &json!({"adress": 1, "timeout": "soon", "resources": {"GPU": "x"}}),
            &[],
            &mut errors,
        );
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 4, "{text:#?}");
        assert!(
            text.iter()
                .any(|t| t.contains("adress") && t.contains("did you mean `address`"))
        );
        assert!(
            text.iter()
                .any(|t| t.contains("timeout") && t.contains("expected a number"))
        );
        assert!(text.iter().any(|t| t.contains("resources.GPU")));
        assert!(
            text.iter()
                .any(|t| t.contains("missing required key `address`"))
        );
    }

    #[test]
    fn numbers_outside_their_range_are_refused_with_the_path() {
        let mut errors = vec![];
        validate(
            &schema(),
            &json!({"address": "", "timeout": 1e30, "resources": {"GPU": -1}}),
            &[],
            &mut errors,
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].dotted_path(), "resources.GPU");
        assert!(
            errors[0]
                .message
                .contains("expected a number ≥ 0, found the number -1")
        );
        let bounded = ConfigType::Int {
            minimum: Some(0.0),
            maximum: Some(10.0),
        };
        for (v, ok) in [
            (json!(0), true),
            (json!(10), true),
            (json!(-1), false),
            (json!(11), false),
            (json!(2.5), false),
            (json!(18446744073709551615u64), false),
        ] {
            let mut errors = vec![];
            validate(&bounded, &v, &["n".into()], &mut errors);
            assert_eq!(errors.is_empty(), ok, "{v}: {errors:?}");
        }
        let non_empty = ConfigType::String {
            min_length: Some(1),
        };
        let mut errors = vec![];
        validate(&non_empty, &json!(""), &["base_dir".into()], &mut errors);
        assert_eq!(
            errors[0].to_string(),
            "base_dir: expected a non-empty string, found the string \"\""
        );
    }

    #[test]
    fn selector_needs_exactly_one_key() {
        let sel = ConfigType::selector([
            Field::optional("in_process", ConfigType::empty()),
            Field::optional("dask", ConfigType::empty()),
        ]);
        let mut errors = vec![];
        validate(
            &sel,
            &json!({"in_process": {}, "dask": {}}),
            &[],
            &mut errors,
        );
        assert_eq!(errors.len(), 1);
        assert!(errors[0].message.contains("exactly one"));
        errors.clear();
        validate(&sel, &json!({"dsak": {}}), &[], &mut errors);
        assert_eq!(errors[0].hint.as_deref(), Some("did you mean `dask`?"));
    }
}
