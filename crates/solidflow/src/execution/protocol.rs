//! The step protocol: how one step runs outside the parent process.
//!
//! The pipeline's own binary, started as `<binary> step`, reads one [`StepInvocation`]
//! as JSON from stdin, runs that step (inputs from storage, outputs to storage), and
//! writes [`StepMessage`]s as JSON lines to stdout: every event as it happens, then one
//! final `result`. Anything the solid prints to stdout is redirected to stderr so it
//! cannot corrupt the stream. Exit status: 0 when the step succeeded, 1 when it
//! failed, 3 for a protocol mismatch or unusable invocation. See `docs/step-protocol.md`.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::event::{ErrorInfo, Event};
use super::message_stream::MessageStream;
use super::run_id::RunId;
use super::scheduler::StepOutcome;
use super::sink::{EventListener, EventSink};
use super::step::StepEnvironment;
use crate::config::RunConfig;
use crate::definition::repository::Repository;
use crate::definition::storage::StorageContext;
use crate::plan::{ExecutionPlan, StepKey};

/// The protocol version; parent and child must agree.
pub const PROTOCOL_VERSION: u32 = 1;

/// Set on step processes to the parent's pid; step mode then dies with its parent.
/// (Also at [`crate::executor::PARENT_PID_ENV`], where the launchers that set it live.)
pub const PARENT_PID_ENV: &str = "SOLIDFLOW_PARENT_PID";

/// Everything a step process needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepInvocation {
    /// Must equal [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The run.
    pub run_id: String,
    /// The pipeline's name in the binary's repository.
    pub pipeline: String,
    /// The mode.
    pub mode: String,
    /// The step to run (`<alias>.compute`).
    pub step_key: String,
    /// The attempt number (1 for the first).
    pub attempt: u32,
    /// The validated run config (`RunConfig::value`) as far as this step reads it:
    /// every root key, but of `solids` only this step's own block
    /// ([`StepInvocation::for_attempt`]).
    pub run_config: serde_json::Value,
    /// The solidflow home, for storages that default to it.
    pub home: std::path::PathBuf,
    /// Upstream step key → the run whose intermediates hold its outputs, for upstream
    /// steps that are not this run's (a re-execution reads the steps it does not re-run
    /// from its parent, in place). Empty for every other step.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub input_runs: std::collections::BTreeMap<String, String>,
}

impl StepInvocation {
    /// The invocation of attempt `attempt` of `step` of the run in `env`: the one
    /// place every out-of-process executor builds it. The run config keeps only this
    /// step's block of `solids` (all a step process reads of it), so an invocation does
    /// not grow with the number of configured solids: with every solid's block, each
    /// step of a pipeline of 10,000 configured solids would carry all 10,000.
    pub fn for_attempt(
        env: &StepEnvironment,
        home: &Path,
        step: &crate::plan::ExecutionStep,
        attempt: u32,
    ) -> Self {
        Self {
            protocol: PROTOCOL_VERSION,
            run_id: env.run_id.clone(),
            pipeline: env.pipeline.name().to_string(),
            mode: env.config.mode.clone(),
            step_key: step.key.clone(),
            attempt,
            run_config: step_run_config(&env.config.value, &step.key),
            home: home.to_path_buf(),
            input_runs: step.input_runs(),
        }
    }
}

/// `value` (a run config) with only the block of the solid of step `step_key` under
/// `solids` (the step process reads no other: see `run_invocation`).
fn step_run_config(value: &serde_json::Value, step_key: &str) -> serde_json::Value {
    let (Some(root), Some(key)) = (value.as_object(), StepKey::parse(step_key)) else {
        return value.clone();
    };
    let alias = key.solid();
    let mut out = serde_json::Map::with_capacity(root.len());
    for (name, v) in root {
        if name != "solids" {
            out.insert(name.clone(), v.clone());
        } else if let Some(block) = v.get(alias) {
            let mut solids = serde_json::Map::with_capacity(1);
            solids.insert(alias.to_string(), block.clone());
            out.insert(name.clone(), solids.into());
        }
    }
    out.into()
}

/// One line a step process writes to stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StepMessage {
    /// An event, as it happens.
    Event {
        /// The event.
        event: Box<Event>,
    },
    /// The final outcome; always the last line.
    Result {
        /// Whether the step succeeded.
        ok: bool,
        /// The failure, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<ErrorInfo>,
        /// Set when the solid asked for a retry; the delay in seconds, if any
        /// (`null`: no particular delay).
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            deserialize_with = "present"
        )]
        retry_requested: Option<Option<f64>>,
    },
}

impl StepMessage {
    /// The final `result` line for `outcome`.
    pub(crate) fn result(outcome: StepOutcome) -> Self {
        match outcome {
            StepOutcome::Succeeded => Self::Result {
                ok: true,
                error: None,
                retry_requested: None,
            },
            StepOutcome::Failed(error) => Self::Result {
                ok: false,
                error: Some(error),
                retry_requested: None,
            },
            StepOutcome::RetryRequested { error, delay } => Self::Result {
                ok: false,
                error: Some(error),
                retry_requested: Some(delay.map(|d| d.as_secs_f64())),
            },
        }
    }

    /// What a `result` line reports (`None` for an event). A failure without details
    /// is described by `no_details`.
    pub(crate) fn outcome(self, no_details: impl FnOnce() -> String) -> Option<StepOutcome> {
        let Self::Result {
            ok,
            error,
            retry_requested,
        } = self
        else {
            return None;
        };
        if ok {
            return Some(StepOutcome::Succeeded);
        }
        let error = error.unwrap_or_else(|| ErrorInfo {
            message: no_details(),
            causes: vec![],
            kind: "error".into(),
            location: None,
        });
        Some(match retry_requested {
            Some(delay) => StepOutcome::RetryRequested {
                error,
                delay: delay.map(|s| Duration::from_secs_f64(s.max(0.0))),
            },
            None => StepOutcome::Failed(error),
        })
    }
}

/// A field that is present (even as `null`) is `Some`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(d).map(Some)
}

/// Runs the step described by `invocation` from `repository`, writing messages to `out`.
/// Returns the process exit status.
pub fn run_invocation(
    repository: &Repository,
    invocation: StepInvocation,
    out: Box<dyn Write + Send>,
) -> i32 {
    let writer = Arc::new(MessageStream::new(out));
    let fail = |writer: &MessageStream, message: String, code: i32| {
        let error = ErrorInfo {
            message,
            causes: vec![],
            kind: "error".into(),
            location: None,
        };
        writer.finish(&StepMessage::result(StepOutcome::Failed(error)));
        code
    };
    if invocation.protocol != PROTOCOL_VERSION {
        return fail(
            &writer,
            format!(
                "step protocol mismatch: the parent speaks version {} but this binary speaks {PROTOCOL_VERSION}; run the same solidflow build on both sides",
                invocation.protocol
            ),
            3,
        );
    }
    // The run id names directories and object keys this process writes.
    if let Err(e) = RunId::parse(&invocation.run_id) {
        return fail(&writer, format!("step invocation: {e}"), 3);
    }
    let Some(pipeline) = repository.pipeline(&invocation.pipeline) else {
        return fail(
            &writer,
            format!(
                "this binary has no pipeline `{}`; is it the right executable?",
                invocation.pipeline
            ),
            3,
        );
    };
    // The parent validated the config; re-validating and planning the whole pipeline in
    // every step process would cost time in proportion to the pipeline's size per step,
    // so only this step's solid block is read.
    let no_step = || {
        format!(
            "pipeline `{}` has no step `{}`; is it the right executable?",
            pipeline.name(),
            invocation.step_key
        )
    };
    let alias = StepKey::parse(&invocation.step_key).map(|k| k.solid().to_string());
    let config = match alias.and_then(|alias| {
        RunConfig::from_validated_for_solid(
            pipeline,
            &invocation.mode,
            invocation.run_config.clone(),
            &alias,
        )
    }) {
        Some(Ok(c)) => Arc::new(c),
        Some(Err(e)) => return fail(&writer, e, 3),
        None => return fail(&writer, no_step(), 3),
    };
    let Some(mut plan) = ExecutionPlan::for_step(pipeline, &config, &invocation.step_key) else {
        return fail(&writer, no_step(), 3);
    };
    plan.steps[0].read_inputs_from(&invocation.input_runs);
    let (plan, index) = (Arc::new(plan), 0);
    let Some(mode) = pipeline.mode(Some(&invocation.mode)) else {
        return fail(
            &writer,
            format!(
                "pipeline `{}` has no mode `{}`",
                pipeline.name(),
                invocation.mode
            ),
            3,
        );
    };
    let Some(storage_def) = mode.storage(&config.storage.name) else {
        return fail(
            &writer,
            format!(
                "mode `{}` has no storage `{}`",
                mode.name, config.storage.name
            ),
            3,
        );
    };
    let storage = match (storage_def.build)(
        &config.storage.config,
        &StorageContext {
            home: invocation.home.clone(),
        },
    ) {
        Ok(s) => s,
        Err(e) => return fail(&writer, e.to_string(), 1),
    };
    let events = EventSink::new(
        &invocation.run_id,
        pipeline.name(),
        vec![writer.clone() as Arc<dyn EventListener>],
    );
    let env = StepEnvironment {
        run_id: invocation.run_id.clone(),
        pipeline: Arc::new(pipeline.clone()),
        plan,
        config,
        storage,
        memory: None,
        events,
    };
    let outcome = StepOutcome::of(env.run_step(index, invocation.attempt));
    let code = if outcome == StepOutcome::Succeeded {
        0
    } else {
        1
    };
    writer.finish(&StepMessage::result(outcome));
    code
}

/// Keeps the real stdout for protocol messages and points fd 1 at stderr, so whatever
/// user code prints cannot corrupt the message stream.
pub(crate) fn protocol_stdout() -> std::io::Result<Box<dyn Write + Send>> {
    use std::os::fd::{FromRawFd, OwnedFd};
    std::io::stdout().flush()?;
    // SAFETY: fcntl/dup2 on the process's own standard descriptors; the duplicate is
    // owned by the returned File and closed exactly once. It is close-on-exec so that
    // processes the solid starts do not hold the message pipe open.
    unsafe {
        let fd = libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3);
        if fd < 0 || libc::dup2(2, 1) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Box::new(std::fs::File::from(OwnedFd::from_raw_fd(fd))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steps_run_config_holds_its_own_solid_block_and_every_other_root_key() {
        let value = serde_json::json!({
            "solids": {"a": {"config": {"n": 1}}, "b": {"config": {"n": 2}}},
            "storage": {"filesystem": {"config": {"base_dir": "/x"}}},
            "execution": {"multiprocess": {}},
        });
        let a = step_run_config(&value, "a.compute");
        assert_eq!(a["solids"], serde_json::json!({"a": {"config": {"n": 1}}}));
        assert_eq!(
            (&a["storage"], &a["execution"]),
            (&value["storage"], &value["execution"])
        );
        // A mapped step of a dynamic fan-out reads its solid's block.
        let mapped = step_run_config(&value, "b[part_1].compute");
        assert_eq!(
            mapped["solids"],
            serde_json::json!({"b": {"config": {"n": 2}}})
        );
        // A solid with nothing configured gets no `solids` at all.
        let none = step_run_config(&value, "c.compute");
        assert!(none.get("solids").is_none() && none["storage"] == value["storage"]);
    }

    /// The golden examples in `tests/fixtures/protocol/`, shared with the bridge's tests.
    fn fixture(name: &str) -> Vec<serde_json::Value> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/protocol")
            .join(name);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn step_messages_round_trip_exactly() {
        for golden in fixture("step-messages.jsonl") {
            let message: StepMessage = serde_json::from_value(golden.clone()).unwrap();
            assert_eq!(serde_json::to_value(&message).unwrap(), golden);
        }
    }

    #[test]
    fn result_lines_become_outcomes_and_back() {
        let outcomes: Vec<StepOutcome> = fixture("step-messages.jsonl")
            .into_iter()
            .filter_map(|v| {
                serde_json::from_value::<StepMessage>(v)
                    .unwrap()
                    .outcome(|| unreachable!("every failure has details"))
            })
            .collect();
        assert_eq!(outcomes[0], StepOutcome::Succeeded);
        assert!(matches!(&outcomes[1], StepOutcome::Failed(e) if e.kind == "panic"));
        assert!(matches!(
            &outcomes[2],
            StepOutcome::RetryRequested { delay: Some(d), .. } if *d == Duration::from_millis(500)
        ));
        assert!(matches!(
            &outcomes[3],
            StepOutcome::RetryRequested { delay: None, .. }
        ));
        for (outcome, golden) in outcomes
            .into_iter()
            .zip(fixture("step-messages.jsonl").into_iter().skip(2))
        {
            assert_eq!(
                serde_json::to_value(StepMessage::result(outcome)).unwrap(),
                golden
            );
        }
        let failed = StepMessage::Result {
            ok: false,
            error: None,
            retry_requested: None,
        };
        assert!(matches!(
            failed.outcome(|| "no details".into()),
            Some(StepOutcome::Failed(e)) if e.message == "no details"
        ));
    }

    #[test]
    fn the_invocation_round_trips_exactly() {
        for golden in fixture("step-invocation.jsonl") {
            let invocation: StepInvocation = serde_json::from_value(golden.clone()).unwrap();
            assert_eq!(invocation.protocol, PROTOCOL_VERSION);
            assert_eq!(serde_json::to_value(&invocation).unwrap(), golden);
        }
    }
}
