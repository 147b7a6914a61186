//! Errors raised by solids, and how they become events.

use std::time::Duration;

use super::event::ErrorInfo;

/// Why a solid's compute failed.
///
/// Any `std::error::Error` converts into it with `?`, keeping its cause chain.
/// [`SolidError::retry`] asks the executor to try the step again even when its retry
/// policy would not.
#[derive(Debug, Clone)]
pub struct SolidError {
    /// What failed.
    pub message: String,
    /// Causes, outermost first.
    pub causes: Vec<String>,
    /// Set when the solid explicitly asked for a retry, with an optional delay.
    pub retry_requested: Option<Option<Duration>>,
    /// The panic location, when the failure is a panic.
    pub panic_location: Option<String>,
}

impl SolidError {
    /// A failure with a message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            causes: Vec::new(),
            retry_requested: None,
            panic_location: None,
        }
    }

    /// A failure that asks to be retried (after `delay`, if given). Retries still stop
    /// at the policy's `max_retries`, or after 1 retry when the solid has no policy.
    pub fn retry(message: impl Into<String>, delay: Option<Duration>) -> Self {
        Self {
            retry_requested: Some(delay),
            ..Self::new(message)
        }
    }

    /// Adds a cause.
    pub fn caused_by(mut self, cause: impl Into<String>) -> Self {
        self.causes.push(cause.into());
        self
    }

    /// The failure as event data.
    pub fn info(&self) -> ErrorInfo {
        ErrorInfo {
            message: self.message.clone(),
            causes: self.causes.clone(),
            kind: if self.panic_location.is_some() {
                "panic"
            } else {
                "error"
            }
            .into(),
            location: self.panic_location.clone(),
        }
    }
}

impl std::fmt::Display for SolidError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        for c in &self.causes {
            write!(f, ": {c}")?;
        }
        Ok(())
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for SolidError {
    fn from(e: E) -> Self {
        let mut causes = Vec::new();
        let mut source = e.source();
        while let Some(s) = source {
            causes.push(s.to_string());
            source = s.source();
        }
        Self {
            message: e.to_string(),
            causes,
            retry_requested: None,
            panic_location: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("load failed")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn keeps_cause_chain() {
        let e: SolidError = Outer(std::io::Error::other("disk gone")).into();
        assert_eq!(e.message, "load failed");
        assert_eq!(e.causes, vec!["disk gone".to_string()]);
        assert_eq!(e.to_string(), "load failed: disk gone");
    }
}
