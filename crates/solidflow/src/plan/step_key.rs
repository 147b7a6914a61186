//! Step keys: the one place that knows how a step is named in a plan, in storage and
//! on Dask.
//!
//! A static step's key is `<solid alias>.compute` (the seed's format). A step mapped
//! over a dynamic output (one step per item, see
//! [`DynamicHandle`](crate::definition::dynamic::DynamicHandle)) is
//! `<alias>[<mapping key>].compute`; before the run its template is shown as
//! `<alias>[?].compute`. Item `<key>` of a dynamic output `<output>` is stored as the
//! output `<output>[<key>]` of the step that produced it. A mapping key is 1 to 128
//! ASCII letters, digits and `_` (Dagster's rule), so every key is also a valid
//! path segment and Dask key.

use std::fmt;

/// The key of one step of a plan (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StepKey(String);

/// The mapping-key placeholder of a template step.
const TEMPLATE: &str = "?";

/// The longest mapping key.
pub const MAX_MAPPING_KEY: usize = 128;

impl StepKey {
    /// What every step key ends with.
    pub const SUFFIX: &'static str = ".compute";

    /// The key of invocation `alias`.
    pub fn of(alias: &str) -> Self {
        Self(format!("{alias}{}", Self::SUFFIX))
    }

    /// The key of the step that runs mapped invocation `alias` for item `mapping_key`.
    pub fn mapped(alias: &str, mapping_key: &str) -> Self {
        Self(format!("{alias}[{mapping_key}]{}", Self::SUFFIX))
    }

    /// The key of the template of mapped invocation `alias`, as the plan shows it
    /// before the run: `<alias>[?].compute`.
    pub fn template(alias: &str) -> Self {
        Self::mapped(alias, TEMPLATE)
    }

    /// Reads a key in plan format back, if it is one.
    pub fn parse(key: &str) -> Option<Self> {
        let head = key.strip_suffix(Self::SUFFIX)?;
        let alias = match head.strip_suffix(']') {
            Some(rest) => {
                let (alias, mapping) = rest.split_once('[')?;
                (mapping == TEMPLATE || check_mapping_key(mapping).is_ok()).then_some(alias)?
            }
            None => head,
        };
        (!alias.is_empty()).then(|| Self(key.to_string()))
    }

    /// The key as the plan, events and run history show it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The alias of the solid invocation this step runs.
    pub fn solid(&self) -> &str {
        let head = self.0.strip_suffix(Self::SUFFIX).unwrap_or(&self.0);
        match head.strip_suffix(']').and_then(|h| h.split_once('[')) {
            Some((alias, _)) => alias,
            None => head,
        }
    }

    /// The mapping key of a mapped step (`?` for a template), `None` for a static step.
    pub fn mapping_key(&self) -> Option<&str> {
        let head = self.0.strip_suffix(Self::SUFFIX).unwrap_or(&self.0);
        head.strip_suffix(']')
            .and_then(|h| h.split_once('['))
            .map(|(_, k)| k)
    }

    /// Whether this is the template of a mapped invocation (`<alias>[?].compute`).
    pub fn is_template(&self) -> bool {
        self.mapping_key() == Some(TEMPLATE)
    }

    /// The segment of a storage path that holds this step's outputs:
    /// `<run_id>/intermediates/<segment>/<output>`. Step keys are made of path-safe
    /// characters, so it is the key itself.
    pub fn path_segment(key: &str) -> &str {
        key
    }

    /// The output name under which item `mapping_key` of dynamic output `output` is
    /// stored: `<output>[<mapping_key>]`. The output `<output>` itself holds the list
    /// of keys, in order.
    pub fn item_output(output: &str, mapping_key: &str) -> String {
        format!("{output}[{mapping_key}]")
    }

    /// The Dask task key of one attempt of step `key`, which runs solid definition
    /// `solid`: `<solid>-<key>-<run id>-a<attempt>`. Unique per run and attempt, so a
    /// retry is a new task and two runs on one scheduler never collide. Dask names a
    /// key's task prefix and group after its first word (up to the `-` before the step
    /// key, whose `.` ends the prefix), so tasks group by solid definition in the
    /// dashboard, and the scheduler keeps one prefix record per solid, not one per
    /// step ever run.
    pub fn dask_key(solid: &str, key: &str, run_id: &str, attempt: u32) -> String {
        format!("{solid}-{key}-{run_id}-a{attempt}")
    }
}

/// Checks that `key` can name an item of a dynamic output: 1 to [`MAX_MAPPING_KEY`]
/// ASCII letters, digits or `_`. The error says what is wrong with it.
pub fn check_mapping_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("a mapping key must not be empty".into());
    }
    if key.len() > MAX_MAPPING_KEY {
        return Err(format!(
            "a mapping key has at most {MAX_MAPPING_KEY} characters, this one has {}",
            key.len()
        ));
    }
    match key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
    {
        Some(c) => Err(format!(
            "a mapping key may hold only ASCII letters, digits and `_`, but it contains {c:?} (replace it, e.g. with `_`)"
        )),
        None => Ok(()),
    }
}

impl fmt::Display for StepKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<StepKey> for String {
    fn from(key: StepKey) -> Self {
        key.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owns_the_plan_storage_and_dask_formats() {
        let key = StepKey::of("hello_world");
        assert_eq!(key.as_str(), "hello_world.compute");
        assert_eq!(key.solid(), "hello_world");
        assert_eq!(key.mapping_key(), None);
        assert_eq!(StepKey::parse("hello_world.compute"), Some(key.clone()));
        assert_eq!(StepKey::parse(".compute"), None);
        assert_eq!(StepKey::parse("hello_world"), None);
        assert_eq!(
            StepKey::dask_key("hello", key.as_str(), "r1", 2),
            "hello-hello_world.compute-r1-a2"
        );
        assert_eq!(StepKey::path_segment(key.as_str()), "hello_world.compute");
    }

    #[test]
    fn owns_the_dynamic_formats() {
        let key = StepKey::mapped("double", "part_3");
        assert_eq!(key.as_str(), "double[part_3].compute");
        assert_eq!(key.solid(), "double");
        assert_eq!(key.mapping_key(), Some("part_3"));
        assert!(!key.is_template());
        assert_eq!(StepKey::parse("double[part_3].compute"), Some(key));
        let template = StepKey::template("double");
        assert_eq!(template.as_str(), "double[?].compute");
        assert!(template.is_template());
        assert_eq!(StepKey::parse("double[?].compute"), Some(template));
        assert_eq!(StepKey::parse("double[a b].compute"), None);
        assert_eq!(StepKey::parse("[a].compute"), None);
        assert_eq!(StepKey::item_output("result", "a"), "result[a]");
    }

    #[test]
    fn mapping_keys_are_checked_with_a_reason() {
        assert!(check_mapping_key("part_01").is_ok());
        assert!(check_mapping_key("").unwrap_err().contains("empty"));
        assert!(check_mapping_key("a/b").unwrap_err().contains("'/'"));
        assert!(
            check_mapping_key(&"x".repeat(129))
                .unwrap_err()
                .contains("at most 128")
        );
    }
}
