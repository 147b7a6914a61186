//! Run ids: the name of a run in run history, in storage paths and in step invocations.
//!
//! A run id becomes a directory name (`<base_dir>/<run_id>/intermediates/...`) and an
//! object-key segment, so one given by a user (`--run-id`, [`RunOptions::run_id`],
//! a step invocation) is checked before anything is written: not empty, at most
//! [`RunId::MAX_LEN`] characters of `A-Z a-z 0-9 - _ .`, not starting with `.`.
//!
//! [`RunOptions::run_id`]: super::run::RunOptions::run_id

use std::fmt;

/// A checked run id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RunId(String);

/// Why a string is not a run id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid run id {shown:?}: {reason}; use letters, digits, `-`, `_` and `.` (not first), at most {max} characters", max = RunId::MAX_LEN)]
pub struct InvalidRunId {
    shown: String,
    reason: &'static str,
}

impl RunId {
    /// The longest accepted run id (a UUID has 36 characters).
    pub const MAX_LEN: usize = 128;

    /// A fresh random id (a UUID v4).
    pub fn fresh() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    /// Checks a run id given by a user or another process.
    pub fn parse(id: &str) -> Result<Self, InvalidRunId> {
        let bad = |reason| {
            Err(InvalidRunId {
                shown: id.chars().take(40).collect(),
                reason,
            })
        };
        if id.is_empty() {
            return bad("it is empty");
        }
        if id.chars().count() > Self::MAX_LEN {
            return bad("it is too long");
        }
        if id.contains(['/', '\\']) {
            return bad("it contains a path separator");
        }
        if id.starts_with('.') {
            return bad("it starts with `.`");
        }
        if !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return bad("it contains a character outside the safe set");
        }
        Ok(Self(id.to_string()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<RunId> for String {
    fn from(id: RunId) -> Self {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_uuids_and_names_and_refuses_paths() {
        assert!(RunId::parse(RunId::fresh().as_str()).is_ok());
        assert!(RunId::parse("nightly-2026.12.01_a").is_ok());
        for bad in [
            "",
            "../../escaped/x",
            "a/b",
            "a\\b",
            ".",
            "..",
            ".hidden",
            "a b",
            "a\0b",
            "ü",
        ] {
            let err = RunId::parse(bad).unwrap_err().to_string();
            assert!(err.contains("invalid run id"), "{bad:?}: {err}");
        }
        assert!(RunId::parse(&"x".repeat(RunId::MAX_LEN)).is_ok());
        assert!(RunId::parse(&"x".repeat(RunId::MAX_LEN + 1)).is_err());
    }
}
