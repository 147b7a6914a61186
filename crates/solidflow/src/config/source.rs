//! Reading config documents (YAML or JSON) and merging them in order, remembering where
//! each value was written so errors can point at a file and line.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use serde_saphyr::Spanned;

use super::error::{ConfigError, ConfigErrors, SourceLocation};

/// Merged config documents plus the location of every path in them.
#[derive(Debug, Clone, Default)]
pub struct ConfigSources {
    /// The merged value.
    pub value: Value,
    locations: HashMap<Vec<String>, SourceLocation>,
}

impl ConfigSources {
    /// No config at all (every block takes its default).
    pub fn empty() -> Self {
        Self {
            value: Value::Object(Map::new()),
            locations: HashMap::new(),
        }
    }

    /// Config given as a value in code (the programmatic API); errors carry no file.
    pub fn from_value(value: Value) -> Self {
        Self {
            value,
            locations: HashMap::new(),
        }
    }

    /// Reads and merges files in order; later files override earlier ones key by key.
    pub fn from_files<P: AsRef<Path>>(paths: &[P]) -> Result<Self, ConfigErrors> {
        let mut sources = Self::empty();
        let mut errors = Vec::new();
        for path in paths {
            let path = path.as_ref();
            match std::fs::read_to_string(path) {
                Ok(text) => match sources.merge_text(&path.display().to_string(), &text) {
                    Ok(()) => {}
                    Err(e) => errors.push(e),
                },
                Err(e) => errors.push(ConfigError::new(
                    &[],
                    format!("cannot read config file {}: {e}", path.display()),
                )),
            }
        }
        if errors.is_empty() {
            Ok(sources)
        } else {
            Err(ConfigErrors { errors })
        }
    }

    /// Parses one YAML or JSON document (JSON is YAML) and merges it over what is here.
    pub fn merge_text(&mut self, file: &str, text: &str) -> Result<(), ConfigError> {
        if text.trim().is_empty() {
            return Ok(());
        }
        let node: Spanned<Node> = serde_saphyr::from_str(text).map_err(|e| {
            let mut err = ConfigError::new(
                &[],
                format!(
                    "{file} is not valid YAML/JSON: {}",
                    first_line(&e.to_string())
                ),
            );
            if let Some(loc) = e.location() {
                err.location = Some(SourceLocation {
                    file: file.into(),
                    line: loc.line(),
                    column: loc.column(),
                });
            }
            err
        })?;
        let mut incoming = HashMap::new();
        let value = node_to_value(node, file, &mut Vec::new(), &mut incoming);
        if !value.is_object() && !value.is_null() {
            return Err(ConfigError::new(
                &[],
                format!("{file}: the top level of run config must be a map"),
            ));
        }
        replace_switched_selectors(&mut self.value, &value);
        deep_merge(&mut self.value, value);
        self.locations.extend(incoming);
        Ok(())
    }

    /// These sources merged over `base` (a re-executed run's validated config): `base`
    /// first, then everything here, as if `base` were the first file. Nulls in `base`
    /// (optional fields validation filled in as unset) are dropped, so `base` validates
    /// again as written.
    pub fn layered_over(&self, base: Value) -> Self {
        fn drop_nulls(v: &mut Value) {
            if let Value::Object(map) = v {
                map.retain(|_, v| !v.is_null());
                map.values_mut().for_each(drop_nulls);
            }
        }
        let mut value = base;
        drop_nulls(&mut value);
        if !value.is_object() {
            value = Value::Object(Map::new());
        }
        if !self.value.is_null() {
            replace_switched_selectors(&mut value, &self.value);
            deep_merge(&mut value, self.value.clone());
        }
        Self {
            value,
            locations: self.locations.clone(),
        }
    }

    /// The location of `path`, or of its nearest ancestor that has one.
    pub fn locate(&self, path: &[String]) -> Option<&SourceLocation> {
        (0..=path.len())
            .rev()
            .find_map(|n| self.locations.get(&path[..n]))
    }

    /// Fills in the location of every error from the sources.
    pub fn annotate(&self, errors: &mut [ConfigError]) {
        for e in errors {
            if e.location.is_none() {
                e.location = self.locate(&e.path).cloned();
            }
        }
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// Root keys that are selectors: a later document that picks another choice replaces
/// the earlier choice instead of adding a second one (`-c base.yaml -c multiprocess.yaml`).
const SELECTORS: [&str; 2] = ["storage", "execution"];

fn replace_switched_selectors(base: &mut Value, incoming: &Value) {
    for key in SELECTORS {
        let (Some(old), Some(new)) = (
            base.get(key).and_then(Value::as_object),
            incoming.get(key).and_then(Value::as_object),
        ) else {
            continue;
        };
        if new.keys().any(|k| !old.contains_key(k)) {
            base.as_object_mut().expect("base is a map").remove(key);
        }
    }
}

/// Recursively merges `incoming` into `base`: maps merge key by key; anything else replaces.
pub fn deep_merge(base: &mut Value, incoming: Value) {
    match (base, incoming) {
        (Value::Object(b), Value::Object(i)) => {
            for (k, v) in i {
                match b.get_mut(&k) {
                    Some(existing) => deep_merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (_, Value::Null) => {}
        (b, i) => *b = i,
    }
}

/// A YAML node with the location of every child.
enum Node {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<Node>>),
    Map(Vec<(Spanned<KeyString>, Spanned<Node>)>),
}

fn node_to_value(
    node: Spanned<Node>,
    file: &str,
    path: &mut Vec<String>,
    locations: &mut HashMap<Vec<String>, SourceLocation>,
) -> Value {
    let loc = node.referenced;
    if loc.line() > 0 {
        locations.insert(
            path.clone(),
            SourceLocation {
                file: file.into(),
                line: loc.line(),
                column: loc.column(),
            },
        );
    }
    match node.value {
        Node::Null => Value::Null,
        Node::Bool(b) => Value::Bool(b),
        Node::Int(i) => Value::from(i),
        Node::UInt(u) => Value::from(u),
        Node::Float(f) => serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        Node::Str(s) => Value::String(s),
        Node::Seq(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    path.push(i.to_string());
                    let v = node_to_value(item, file, path, locations);
                    path.pop();
                    v
                })
                .collect(),
        ),
        Node::Map(entries) => Value::Object(
            entries
                .into_iter()
                .map(|(key, item)| {
                    let k = key.value.0;
                    path.push(k.clone());
                    let v = node_to_value(item, file, path, locations);
                    // Point errors about a key at the key itself, not at its value.
                    if key.referenced.line() > 0 {
                        let loc = SourceLocation {
                            file: file.into(),
                            line: key.referenced.line(),
                            column: key.referenced.column(),
                        };
                        locations.insert(path.clone(), loc);
                    }
                    path.pop();
                    (k, v)
                })
                .collect(),
        ),
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        Ok(Node::UInt(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Node>>()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<KeyString>>()? {
            entries.push((key, map.next_value::<Spanned<Node>>()?));
        }
        Ok(Node::Map(entries))
    }
}

/// Map keys: YAML allows `1: x` or `true: x`; config keys are always treated as strings.
struct KeyString(String);

impl<'de> Deserialize<'de> for KeyString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyString;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyString, E> {
                Ok(KeyString(v.into()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyString, E> {
                Ok(KeyString(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyString, E> {
                Ok(KeyString(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<KeyString, E> {
                Ok(KeyString(v.to_string()))
            }
        }
        d.deserialize_string(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merges_documents_in_order_and_remembers_lines() {
        let mut s = ConfigSources::empty();
        s.merge_text(
            "base.yaml",
            "storage:\n  filesystem: {}\nsolids:\n  a:\n    config:\n      n: 1\n      m: 2\n",
        )
        .unwrap();
        s.merge_text("prod.yaml", "solids:\n  a:\n    config:\n      n: 5\n")
            .unwrap();
        assert_eq!(
            s.value,
            json!({"storage": {"filesystem": {}}, "solids": {"a": {"config": {"n": 5, "m": 2}}}})
        );
        let path: Vec<String> = ["solids", "a", "config", "n"].map(String::from).to_vec();
        let loc = s.locate(&path).unwrap();
        assert_eq!((loc.file.as_str(), loc.line), ("prod.yaml", 4));
        let m: Vec<String> = ["solids", "a", "config", "m"].map(String::from).to_vec();
        assert_eq!(s.locate(&m).unwrap().line, 7);
    }

    #[test]
    fn a_later_document_switches_selectors_and_merges_the_same_choice() {
        let mut s = ConfigSources::empty();
        s.merge_text("a.yaml", "execution: {in_process: {config: {max_concurrent: 2}}}\nstorage: {filesystem: {config: {base_dir: /a}}}").unwrap();
        s.merge_text(
            "b.yaml",
            "execution: {multiprocess: {}}\nstorage: {filesystem: {config: {shared: true}}}",
        )
        .unwrap();
        assert_eq!(s.value["execution"], json!({"multiprocess": {}}));
        assert_eq!(
            s.value["storage"],
            json!({"filesystem": {"config": {"base_dir": "/a", "shared": true}}})
        );
    }

    #[test]
    fn json_is_accepted_and_syntax_errors_have_a_location() {
        let mut s = ConfigSources::empty();
        s.merge_text(
            "c.json",
            r#"{"execution": {"dask": {"config": {"address": "tcp://h:8786"}}}}"#,
        )
        .unwrap();
        assert_eq!(
            s.value["execution"]["dask"]["config"]["address"],
            "tcp://h:8786"
        );
        let err = s.merge_text("bad.yaml", "a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.message.contains("bad.yaml"), "{err}");
        assert!(err.location.is_some());
    }
}
