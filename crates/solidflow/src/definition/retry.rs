//! Retry policies: how often and how patiently a failed step is tried again.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::json_schema::config_type_of;
use crate::config::schema::{ConfigType, Field};

/// The longest wait before a retry, whatever the policy computes (one day).
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(24 * 60 * 60);

/// How a failed step is retried.
///
/// The delay before attempt `n + 1` is `delay * backoff^(n - 1)`, stretched by a random
/// factor in `[1 - jitter, 1 + jitter]`, and never more than [`MAX_RETRY_DELAY`].
/// The `retry:` block of run config has these keys, with these ranges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0 = never retry).
    #[serde(default)]
    #[schemars(range(max = 1000))]
    pub max_retries: u32,
    /// Seconds to wait before the first retry.
    #[serde(default)]
    #[schemars(range(min = 0, max = 86400))]
    pub delay: f64,
    /// Multiplier applied to the delay after each retry.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1000))]
    pub backoff: f64,
    /// Fraction of random spread applied to each delay (0 to 1).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1))]
    pub jitter: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 0,
            delay: 0.0,
            backoff: 1.0,
            jitter: 0.0,
        }
    }
}

impl RetryPolicy {
    /// Retry up to `max_retries` times with no delay.
    pub fn new(max_retries: u32) -> Self {
        Self {
            max_retries,
            ..Self::default()
        }
    }

    /// Waits `seconds` before the first retry.
    pub fn delay(mut self, seconds: f64) -> Self {
        self.delay = seconds;
        self
    }

    /// Multiplies the delay by `factor` after each retry.
    pub fn backoff(mut self, factor: f64) -> Self {
        self.backoff = factor;
        self
    }

    /// Spreads each delay randomly by up to `fraction` either way.
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction;
        self
    }

    /// The wait before attempt `next_attempt` (2 for the first retry). `unit` in [0, 1)
    /// is the random draw used for jitter.
    pub fn delay_before(&self, next_attempt: u32, unit: f64) -> Duration {
        let exponent = next_attempt.saturating_sub(2) as i32;
        let base = self.delay.max(0.0) * self.backoff.max(0.0).powi(exponent);
        let spread = 1.0 + self.jitter.clamp(0.0, 1.0) * (2.0 * unit - 1.0);
        // NaN, infinity and huge products (a policy built in code is not range-checked).
        Duration::try_from_secs_f64((base * spread).max(0.0))
            .unwrap_or(MAX_RETRY_DELAY)
            .min(MAX_RETRY_DELAY)
    }

    /// The schema of a `retry:` block in run config: the policy's keys and ranges, with
    /// no defaults, because a block overrides only the keys it names.
    pub fn config_schema() -> ConfigType {
        // Derived once: every solid's block of the run config schema holds a copy, and
        // deriving it costs more than the rest of a solid's schema.
        static SCHEMA: std::sync::OnceLock<ConfigType> = std::sync::OnceLock::new();
        SCHEMA
            .get_or_init(|| match config_type_of::<Self>() {
                ConfigType::Shape { fields } => {
                    ConfigType::shape(fields.into_iter().map(|f| Field { default: None, ..f }))
                }
                other => other,
            })
            .clone()
    }

    /// This policy with the keys of a validated `retry:` block applied on top.
    pub fn overridden_by(&self, block: &serde_json::Value) -> Self {
        let mut p = self.clone();
        if let Some(v) = block.get("max_retries").and_then(|v| v.as_u64()) {
            p.max_retries = v as u32;
        }
        if let Some(v) = block.get("delay").and_then(|v| v.as_f64()) {
            p.delay = v;
        }
        if let Some(v) = block.get("backoff").and_then(|v| v.as_f64()) {
            p.backoff = v;
        }
        if let Some(v) = block.get("jitter").and_then(|v| v.as_f64()) {
            p.jitter = v;
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_by_backoff_within_jitter() {
        let p = RetryPolicy::new(3).delay(1.0).backoff(2.0).jitter(0.5);
        assert_eq!(p.delay_before(2, 0.5), Duration::from_secs(1));
        assert_eq!(p.delay_before(3, 0.5), Duration::from_secs(2));
        assert_eq!(p.delay_before(4, 0.0), Duration::from_secs(2));
        assert_eq!(p.delay_before(4, 1.0), Duration::from_secs(6));
        let huge = RetryPolicy::new(3).delay(1e30).backoff(1e308);
        assert_eq!(huge.delay_before(4, 0.5), MAX_RETRY_DELAY);
        assert_eq!(
            RetryPolicy::new(1).delay(f64::NAN).delay_before(2, 0.5),
            Duration::ZERO
        );
    }

    #[test]
    fn the_retry_block_has_ranges_and_no_defaults() {
        let mut errors = vec![];
        let v = crate::config::validate::validate(
            &RetryPolicy::config_schema(),
            &serde_json::json!({"delay": -1, "backoff": 1e308}),
            &["retry".into()],
            &mut errors,
        );
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 2, "{text:#?}");
        assert!(text[0].starts_with("retry.delay: expected a number from 0 to 86400"));
        assert!(v.get("max_retries").is_none(), "{v}");
    }

    #[test]
    fn config_overrides_keys_it_names() {
        let p = RetryPolicy::new(1)
            .delay(5.0)
            .overridden_by(&serde_json::json!({"max_retries": 4}));
        assert_eq!((p.max_retries, p.delay), (4, 5.0));
    }
}
