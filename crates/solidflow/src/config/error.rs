//! Config errors: what is wrong, at which path, in which file and line.

use std::fmt;

/// Where in a source file a config value was written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SourceLocation {
    /// The file (or `<inline>` for programmatic config).
    pub file: String,
    /// 1-based line.
    pub line: u64,
    /// 1-based column.
    pub column: u64,
}

/// One problem in the run config.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ConfigError {
    /// The config path segments, e.g. `["execution", "dask", "config", "adress"]`.
    pub path: Vec<String>,
    /// What is wrong.
    pub message: String,
    /// How to fix it, when known ("did you mean ...").
    pub hint: Option<String>,
    /// Where the offending value was written, when known.
    pub location: Option<SourceLocation>,
}

impl ConfigError {
    /// An error at `path`.
    pub fn new(path: &[String], message: impl Into<String>) -> Self {
        Self {
            path: path.to_vec(),
            message: message.into(),
            hint: None,
            location: None,
        }
    }

    /// The dotted path, or `<root>` for the top level.
    pub fn dotted_path(&self) -> String {
        if self.path.is_empty() {
            "<root>".into()
        } else {
            self.path.join(".")
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)?;
        } else {
            write!(f, "{}: {}", self.dotted_path(), self.message)?;
        }
        if let Some(loc) = &self.location {
            write!(f, " (at {}:{}:{})", loc.file, loc.line, loc.column)?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; {hint}")?;
        }
        Ok(())
    }
}

/// Every problem found in a run config, reported together.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors {
    /// The problems, in the order found.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        writeln!(
            f,
            "run config is invalid ({n} error{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        Self { errors: vec![e] }
    }
}
