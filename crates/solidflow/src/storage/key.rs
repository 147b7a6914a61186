//! The address of one intermediate value.

use std::fmt;

/// Address of a step output: `<run_id>/intermediates/<step_key>/<output>`.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct IntermediateKey {
    /// The run that produced the value.
    pub run_id: String,
    /// The step that produced it, e.g. `hello_world.compute`.
    pub step_key: String,
    /// The output name, e.g. `result`.
    pub output: String,
}

impl IntermediateKey {
    /// Builds a key from its three parts.
    pub fn new(
        run_id: impl Into<String>,
        step_key: impl Into<String>,
        output: impl Into<String>,
    ) -> Self {
        Self {
            run_id: run_id.into(),
            step_key: step_key.into(),
            output: output.into(),
        }
    }

    /// The relative path of the value inside a storage root.
    pub fn relative_path(&self) -> String {
        format!(
            "{}/intermediates/{}/{}",
            self.run_id,
            crate::plan::StepKey::path_segment(&self.step_key),
            self.output
        )
    }

    /// Parses a relative path produced by [`relative_path`](Self::relative_path).
    pub fn parse(path: &str) -> Option<Self> {
        let mut parts = path.trim_start_matches('/').split('/');
        let run_id = parts.next()?;
        (parts.next()? == "intermediates").then_some(())?;
        let step_key = parts.next()?;
        let output = parts.next()?;
        parts
            .next()
            .is_none()
            .then(|| Self::new(run_id, step_key, output))
    }
}

impl fmt::Display for IntermediateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.relative_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_round_trips() {
        let key = IntermediateKey::new("r1", "a.compute", "result");
        assert_eq!(key.relative_path(), "r1/intermediates/a.compute/result");
        assert_eq!(IntermediateKey::parse(&key.relative_path()), Some(key));
        assert_eq!(IntermediateKey::parse("r1/other/a/b"), None);
    }
}
