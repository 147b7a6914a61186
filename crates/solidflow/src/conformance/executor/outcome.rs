//! The result of running a pipeline binary with `--json`: exit code, events and output,
//! with helpers for assertions and failure messages.

use std::time::Duration;

use serde_json::Value;

/// One finished run of a pipeline binary.
pub struct Outcome {
    /// The exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// The events printed with `--json`, in order.
    pub events: Vec<Value>,
    /// Raw stdout.
    pub stdout: String,
    /// Raw stderr.
    pub stderr: String,
    /// How long the run took.
    pub elapsed: Duration,
}

impl Outcome {
    /// Builds an outcome from a finished process's output; every stdout line must be JSON.
    pub fn new(code: Option<i32>, stdout: String, stderr: String, elapsed: Duration) -> Self {
        let events = stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        Self {
            code,
            events,
            stdout,
            stderr,
            elapsed,
        }
    }

    /// The events of one type, in order.
    pub fn of_type<'a>(&'a self, event_type: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.events
            .iter()
            .filter(move |e| e["event_type"] == event_type)
    }

    /// Exit code, events (one line each) and stderr, for assertion messages.
    pub fn describe(&self) -> String {
        let events: Vec<String> = self
            .events
            .iter()
            .map(|e| {
                format!(
                    "{} {} {} {}",
                    e["event_type"], e["step_key"], e["worker"], e["message"]
                )
            })
            .collect();
        format!(
            "exit {:?} after {:?}\nevents:\n{}\nstderr:\n{}",
            self.code,
            self.elapsed,
            events.join("\n"),
            self.stderr
        )
    }

    /// The PIPELINE_FAILURE messages and stderr: what a user reads when a run fails.
    pub fn failure_text(&self) -> String {
        let failures: Vec<String> = self
            .of_type("PIPELINE_FAILURE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect();
        format!("{}\n{}", failures.join("\n"), self.stderr)
    }

    /// The events of one type for one step (`"total.compute"`), in order.
    pub fn step<'a>(&'a self, step: &str, event_type: &'a str) -> Vec<&'a Value> {
        self.of_type(event_type)
            .filter(|e| e["step_key"] == step)
            .collect()
    }

    /// The one event of a type for a step; panics, listing the events, if there is not
    /// exactly one.
    pub fn one<'a>(&'a self, step: &str, event_type: &'a str) -> &'a Value {
        let found = self.step(step, event_type);
        assert_eq!(
            found.len(),
            1,
            "expected one {event_type} for {step}; events:\n{}",
            self.describe()
        );
        found[0]
    }

    /// Whether an event of `step` has a message containing `needle`.
    pub fn has_message(&self, step: &str, needle: &str) -> bool {
        self.events.iter().any(|e| {
            e["step_key"] == step && e["message"].as_str().is_some_and(|m| m.contains(needle))
        })
    }

    /// Panics, with stderr and the events, unless the process exited with `code`.
    pub fn expect_code(&self, code: i32) {
        assert_eq!(
            self.code,
            Some(code),
            "exit code; stderr:\n{}\nevents:\n{}",
            self.stderr,
            self.describe()
        );
    }
}
