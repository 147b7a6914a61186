//! Step keys: the one place that knows how a step is named in a plan and on Dask. A
//! step key is `<solid alias>.compute` (the seed's format). Storage uses the plan key
//! verbatim as the path segment of a step's outputs
//! ([`IntermediateKey`](crate::storage::IntermediateKey)).

use std::fmt;

/// The key of the step that runs solid invocation `alias`: `<alias>.compute`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StepKey(String);

impl StepKey {
    /// What every step key ends with.
    pub const SUFFIX: &'static str = ".compute";

    /// The key of invocation `alias`.
    pub fn of(alias: &str) -> Self {
        Self(format!("{alias}{}", Self::SUFFIX))
    }

    /// Reads a key in plan format back, if it is one.
    pub fn parse(key: &str) -> Option<Self> {
        key.strip_suffix(Self::SUFFIX)
            .filter(|alias| !alias.is_empty())
            .map(|_| Self(key.to_string()))
    }

    /// The key as the plan, events and run history show it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The alias of the solid invocation this step runs.
    pub fn solid(&self) -> &str {
        self.0.strip_suffix(Self::SUFFIX).unwrap_or(&self.0)
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
        assert_eq!(StepKey::parse("hello_world.compute"), Some(key.clone()));
        assert_eq!(StepKey::parse(".compute"), None);
        assert_eq!(StepKey::parse("hello_world"), None);
        assert_eq!(
            StepKey::dask_key("hello", key.as_str(), "r1", 2),
            "hello-hello_world.compute-r1-a2"
        );
    }
}
