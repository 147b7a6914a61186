//! Executor conformance suite: the same behaviour checked on every executor.
//!
//! Each case drives the real CLI of the `conformance` pipeline binary
//! (`src/bin/conformance.rs`) with `execute <pipeline> --json`, reads the event stream
//! from its stdout while it runs, and checks exit code, events and side effects. Every
//! test gets its own `SOLIDFLOW_HOME` and work directory; waits are on conditions with
//! deadlines, never fixed sleeps.
//!
//! An executor joins with one line at the bottom of this file:
//!
//! ```ignore
//! conformance_suite!(multiprocess, "execution: {multiprocess: {}}\nstorage: {filesystem: {}}\n",
//!     scheduling_cases, isolated_cases);
//! ```
//!
//! The module name is the executor's config key (used to add `resources` to its config);
//! `conformance_suite!(multiprocess_warm as multiprocess, "<config>", ...)` runs the same
//! executor again under another module name, with another base config (a mode, an
//! isolation setting).
//! Every executor gets the core cases; the names after the config add groups of cases:
//!
//! - `scheduling_cases`: executors that schedule steps themselves, with `max_concurrent`
//!   and a `resources:` pool for the whole run (`in_process`, `multiprocess`).
//! - `worker_resource_cases`: executors whose resources belong to each worker and whose
//!   concurrency is the workers' threads (`dask`). The same three questions (do resources
//!   serialize steps, do independent steps overlap, is an impossible requirement refused
//!   before any step runs) asked with `n_workers`/`threads_per_worker`/per-worker
//!   `resources`.
//! - `isolated_cases`: executors that run each step in its own process (crash
//!   containment, captured stdout/stderr, killing a step's process group, refusing
//!   `in_memory` storage).
//! - `escalating_cancel_cases` / `grace_cancel_cases`: how steps that ignore SIGTERM end
//!   on Ctrl-C: on a second Ctrl-C (`multiprocess`), or after a grace period (`dask`).
//!
//! The Dask cases need the venv from `scripts/python-env.sh` (or `SOLIDFLOW_PYTHON`);
//! without it they fail and say so. Each Dask case starts a local cluster (about a
//! second), so the Dask module sticks to 2 workers × 1 thread.
//!
//! Run: `cargo test --test executor_conformance`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

#[path = "support/dask.rs"]
mod dask_support;
#[path = "support/live_run.rs"]
mod live_run;
#[path = "support/outcome.rs"]
mod outcome;

use live_run::{LiveRun, assert_dies, read_pid};
use outcome::Outcome;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_conformance"))
}

/// One test's private world: a home, a work dir shared with the solids, and the base
/// config selecting the executor under test.
pub struct Harness {
    _tmp: tempfile::TempDir,
    home: PathBuf,
    work: PathBuf,
    executor: &'static str,
    base: PathBuf,
    env: Vec<(String, String)>,
}

impl Harness {
    pub fn new(executor: &'static str, base_config: &str) -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let home = tmp.path().join("home");
        let work = tmp.path().join("work");
        std::fs::create_dir_all(&work).expect("work dir");
        let base = tmp.path().join("base.yaml");
        std::fs::write(&base, base_config).expect("write base config");
        let mut env = Vec::new();
        if executor == "dask" {
            // The interpreter with dask + distributed (panics naming the fix if missing).
            let python = dask_support::python();
            env.push(("SOLIDFLOW_PYTHON".into(), python.display().to_string()));
        }
        Self {
            _tmp: tmp,
            home,
            work,
            executor,
            base,
            env,
        }
    }

    /// Adds an environment variable for the pipeline process (and its step processes).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// `execution: {<executor>: {config: <yaml>}}`, to merge over the base config.
    pub fn executor_config(&self, yaml: &str) -> String {
        format!("execution: {{{}: {{config: {yaml}}}}}\n", self.executor)
    }

    /// Starts `execute <pipeline> --json` with the base config and `extra` merged over it.
    pub fn start(&self, pipeline: &str, extra: &str) -> LiveRun {
        let extra_path = self
            .work
            .join(format!("extra-{pipeline}-{}.yaml", fastish_id()));
        std::fs::write(&extra_path, extra).expect("write extra config");
        let mut command = Command::new(binary());
        command
            .args(["execute", pipeline, "--json", "-c"])
            .arg(&self.base)
            .arg("-c")
            .arg(&extra_path)
            .env("SOLIDFLOW_HOME", &self.home)
            .env("SF_CONFORMANCE_DIR", &self.work);
        for (k, v) in &self.env {
            command.env(k, v);
        }
        LiveRun::start(command)
    }

    /// Runs to completion.
    pub fn run(&self, pipeline: &str, extra: &str) -> Outcome {
        self.start(pipeline, extra).finish()
    }

    /// A file in the work directory.
    pub fn work(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }
}

fn fastish_id() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// What the cases ask of a finished run, beyond the shared [`Outcome`].
trait Expect {
    fn step<'a>(&'a self, step: &str, event_type: &'a str) -> Vec<&'a Value>;
    fn one<'a>(&'a self, step: &str, event_type: &'a str) -> &'a Value;
    fn has_message(&self, step: &str, needle: &str) -> bool;
    fn expect_canceled(&self);
    fn expect_code(&self, code: i32);
}

impl Expect for Outcome {
    fn step<'a>(&'a self, step: &str, event_type: &'a str) -> Vec<&'a Value> {
        self.of_type(event_type)
            .filter(|e| e["step_key"] == step)
            .collect()
    }

    fn one<'a>(&'a self, step: &str, event_type: &'a str) -> &'a Value {
        let found = self.step(step, event_type);
        assert_eq!(
            found.len(),
            1,
            "expected one {event_type} for {step}; events:\n{}",
            self.describe()
        );
        found[0]
    }

    fn has_message(&self, step: &str, needle: &str) -> bool {
        self.events.iter().any(|e| {
            e["step_key"] == step && e["message"].as_str().is_some_and(|m| m.contains(needle))
        })
    }

    /// The `cancel` pipeline was interrupted: exit 130, one PIPELINE_CANCELED, and both
    /// sleeping steps failed as interrupted.
    fn expect_canceled(&self) {
        self.expect_code(130);
        assert_eq!(
            self.of_type("PIPELINE_CANCELED").count(),
            1,
            "{}",
            self.describe()
        );
        for step in ["sleep_a.compute", "sleep_b.compute"] {
            assert_eq!(
                self.one(step, "STEP_FAILURE")["data"]["error"]["kind"],
                "interrupted"
            );
        }
    }

    fn expect_code(&self, code: i32) {
        assert_eq!(
            self.code,
            Some(code),
            "exit code; stderr:\n{}\nevents:\n{}",
            self.stderr,
            self.describe()
        );
    }
}

/// Starts the `cancel` pipeline and waits until both of its sleeping steps run; returns
/// the run and the two step processes' pids.
fn start_sleepers(h: &Harness) -> (LiveRun, [u32; 2]) {
    let mut run = h.start("cancel", "");
    for who in ["sleep_a", "sleep_b"] {
        run.wait_event("both sleepers", |e| {
            e["message"] == format!("{who} sleeping")
        });
    }
    let pids = [
        read_pid(&h.work("sleep_a.pid")),
        read_pid(&h.work("sleep_b.pid")),
    ];
    (run, pids)
}

/// The cases, as plain functions over a harness.
pub mod cases {
    use super::*;

    pub fn success(h: &Harness) {
        let out = h.run("success", "");
        out.expect_code(0);
        for step in [
            "numbers.compute",
            "sum_evens.compute",
            "sum_odds.compute",
            "total.compute",
        ] {
            out.one(step, "STEP_SUCCESS");
        }
        assert!(
            out.has_message("total.compute", "total=55"),
            "values flow between steps:\n{}",
            out.describe()
        );
        assert_eq!(out.of_type("PIPELINE_SUCCESS").count(), 1);
        let start = out
            .of_type("PIPELINE_START")
            .next()
            .expect("PIPELINE_START");
        assert_eq!(start["data"]["executor"], h.executor);
    }

    pub fn failure_skips_dependents_and_finishes_independent_branch(h: &Harness) {
        let out = h.run("failure", "");
        out.expect_code(1);
        let failure = out.one("boom.compute", "STEP_FAILURE");
        assert_eq!(failure["data"]["error"]["kind"], "error");
        assert!(
            failure["data"]["error"]["message"]
                .as_str()
                .unwrap()
                .contains("boom: the source is unavailable")
        );
        assert_eq!(failure["data"]["error"]["causes"][0], "connection refused");
        let skipped = out.one("downstream.compute", "STEP_SKIPPED");
        assert_eq!(skipped["data"]["upstream"][0], "boom.compute");
        out.one("numbers.compute", "STEP_SUCCESS");
        out.one("sum_evens.compute", "STEP_SUCCESS");
        let end = out
            .of_type("PIPELINE_FAILURE")
            .next()
            .expect("PIPELINE_FAILURE");
        assert_eq!(
            end["data"]["failed_steps"],
            serde_json::json!(["boom.compute"])
        );
    }

    pub fn panic_reports_message_and_location(h: &Harness) {
        let out = h.run("panic", "");
        out.expect_code(1);
        let error = &out.one("kaboom.compute", "STEP_FAILURE")["data"]["error"];
        assert_eq!(error["kind"], "panic");
        assert!(
            error["message"].as_str().unwrap().contains("kaboom 42"),
            "{error}"
        );
        assert!(
            error["location"]
                .as_str()
                .unwrap()
                .contains("conformance.rs"),
            "{error}"
        );
        out.one("downstream.compute", "STEP_SKIPPED");
        out.one("sum_evens.compute", "STEP_SUCCESS");
    }

    pub fn retries_policy_explicit_and_run_config_override(h: &Harness) {
        let out = h.run(
            "retries",
            "solids: {overridden: {retry: {max_retries: 2}}}\n",
        );
        out.expect_code(0);
        // flaky: policy max_retries = 2, fails attempts 1 and 2.
        let up: Vec<u64> = out
            .step("flaky.compute", "STEP_UP_FOR_RETRY")
            .iter()
            .map(|e| e["data"]["attempt"].as_u64().unwrap())
            .collect();
        assert_eq!(up, [1, 2], "{}", out.describe());
        let restarted: Vec<u64> = out
            .step("flaky.compute", "STEP_RESTARTED")
            .iter()
            .map(|e| e["data"]["attempt"].as_u64().unwrap())
            .collect();
        assert_eq!(restarted, [2, 3]);
        assert_eq!(
            out.one("flaky.compute", "STEP_SUCCESS")["data"]["attempt"],
            3
        );
        for n in 1..=3 {
            assert!(
                out.has_message("flaky.compute", &format!("flaky attempt {n}")),
                "attempt {n} visible in ctx"
            );
        }
        // asks_retry: no policy, explicit SolidError::retry.
        assert_eq!(out.step("asks_retry.compute", "STEP_UP_FOR_RETRY").len(), 1);
        assert_eq!(
            out.one("asks_retry.compute", "STEP_SUCCESS")["data"]["attempt"],
            2
        );
        // overridden: no policy in code, max_retries: 2 from run config.
        assert_eq!(out.step("overridden.compute", "STEP_UP_FOR_RETRY").len(), 2);
        assert_eq!(
            out.one("overridden.compute", "STEP_SUCCESS")["data"]["attempt"],
            3
        );
        assert!(out.has_message(
            "attempts.compute",
            "attempts flaky=3 asks_retry=2 overridden=3"
        ));
        assert!(out.of_type("STEP_FAILURE").next().is_none());
    }

    pub fn retries_exhausted_fail(h: &Harness) {
        // Without the override, `overridden` fails for good on its first attempt.
        let out = h.run("retries", "");
        out.expect_code(1);
        assert!(
            out.step("overridden.compute", "STEP_UP_FOR_RETRY")
                .is_empty()
        );
        assert_eq!(
            out.one("overridden.compute", "STEP_FAILURE")["data"]["attempt"],
            1
        );
        out.one("attempts.compute", "STEP_SKIPPED");
    }

    fn interval(h: &Harness, who: &str) -> (u128, u128, bool) {
        let start: u128 = std::fs::read_to_string(h.work(&format!("{who}.start")))
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let end = std::fs::read_to_string(h.work(&format!("{who}.end"))).unwrap();
        let mut parts = end.split(' ');
        (
            start,
            parts.next().unwrap().parse().unwrap(),
            parts.next().unwrap() == "true",
        )
    }

    /// `executor_config` gives room for both steps but only one GPU.
    pub fn resources_serialize_steps(h: &Harness, executor_config: &str) {
        // Two GPU:1 steps, plenty of slots, one GPU: they must not overlap. Each waits up
        // to 1 s for the other to start, so an overlapping scheduler would be caught by
        // the `saw_peer` flag as well as by the recorded intervals.
        let extra = h.executor_config(executor_config)
            + "solids: {left: {config: {wait_secs: 1}}, right: {config: {wait_secs: 1}}}\n";
        let out = h.run("pair", &extra);
        out.expect_code(0);
        let (ls, le, lsaw) = interval(h, "left");
        let (rs, re, rsaw) = interval(h, "right");
        assert!(!lsaw && !rsaw, "a GPU:1 step saw its peer running");
        assert!(
            le <= rs || re <= ls,
            "GPU:1 steps overlapped: left {ls}..{le}, right {rs}..{re}"
        );
    }

    /// `executor_config` gives room for both steps and two GPUs.
    pub fn concurrency_overlaps_independent_steps(h: &Harness, executor_config: &str) {
        // With two GPUs both start together: each waits (up to 60 s) for the other.
        let extra = h.executor_config(executor_config)
            + "solids: {left: {config: {wait_secs: 60}}, right: {config: {wait_secs: 60}}}\n";
        let out = h.run("pair", &extra);
        out.expect_code(0);
        assert!(
            out.has_message("left.compute", "left: saw_peer=true"),
            "{}",
            out.describe()
        );
        assert!(
            out.has_message("right.compute", "right: saw_peer=true"),
            "{}",
            out.describe()
        );
    }

    /// `executor_config` offers no GPU at all.
    pub fn impossible_resources_rejected_before_the_run(h: &Harness, executor_config: &str) {
        let extra = h.executor_config(executor_config)
            + "solids: {left: {config: {wait_secs: 1}}, right: {config: {wait_secs: 1}}}\n";
        let out = h.run("pair", &extra);
        assert_ne!(out.code, Some(0));
        assert!(
            out.stderr.contains("requires GPU=1"),
            "stderr: {}",
            out.stderr
        );
        assert!(
            out.of_type("STEP_START").next().is_none(),
            "no step may start"
        );
        assert!(!h.work("left.start").exists());
    }

    pub fn events_are_live(h: &Harness) {
        let mut run = h.start("live", "");
        run.wait_event("the log line `waiting for go`", |e| {
            e["event_type"] == "LOG_MESSAGE" && e["message"] == "waiting for go"
        });
        std::fs::write(h.work("go"), "go").unwrap();
        let out = run.finish();
        out.expect_code(0);
        out.one("waits_for_go.compute", "STEP_SUCCESS");
    }

    pub fn cancel_stops_steps_and_leaves_no_orphans(h: &Harness) {
        let (run, pids) = start_sleepers(h);
        run.signal(libc::SIGINT);
        let out = run.finish();
        out.expect_canceled();
        out.one("downstream.compute", "STEP_SKIPPED");
        for pid in pids {
            assert_dies(pid, "a step process");
        }
        // The run history records the cancellation.
        let runs = Command::new(binary())
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .args(["runs", "--json"])
            .env("SOLIDFLOW_HOME", &h.home)
            .output()
            .unwrap();
        let runs = String::from_utf8_lossy(&runs.stdout);
        assert!(runs.contains("\"CANCELED\""), "run history: {runs}");
    }

    // --- cases for executors that run each step in its own process ----------------------

    /// `in_memory` lives in one process: refused before the run, naming what to pick.
    pub fn in_memory_storage_is_refused_up_front(h: &Harness) {
        let h = Harness::new(
            h.executor,
            &format!(
                "execution: {{{}: {{}}}}\nstorage: {{in_memory: {{}}}}\n",
                h.executor
            ),
        );
        let out = h.run("success", "");
        out.expect_code(2);
        assert!(out.stderr.contains("`in_memory` storage"), "{}", out.stderr);
        assert!(
            out.stderr.contains("storage: {filesystem: {}}") && out.stderr.contains("s3"),
            "the error names the fix: {}",
            out.stderr
        );
        assert!(out.of_type("PIPELINE_START").next().is_none());
    }

    pub fn crash_is_contained(h: &Harness, how: &str, signal: &str) {
        let out = h.run(
            "crash",
            &format!("solids: {{crash: {{config: {{how: {how}}}}}}}\n"),
        );
        out.expect_code(1);
        let error = &out.one("crash.compute", "STEP_FAILURE")["data"]["error"];
        assert_eq!(error["kind"], "crash", "{error}");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("killed by signal {signal}")),
            "{message}"
        );
        assert!(message.contains("without reporting a result"), "{message}");
        out.one("downstream.compute", "STEP_SKIPPED");
        out.one("numbers.compute", "STEP_SUCCESS");
        out.one("sum_evens.compute", "STEP_SUCCESS");
        assert!(out.has_message(
            "crash.compute",
            &format!("[stderr] about to crash by {how}")
        ));
    }

    pub fn stdout_and_stderr_are_captured(h: &Harness) {
        let out = h.run("noisy", "");
        out.expect_code(0);
        // Printing to stdout did not corrupt the protocol: it arrives as stderr.
        assert!(
            out.has_message("noisy.compute", "[stderr] noisy says hello on stdout"),
            "{}",
            out.describe()
        );
        assert!(out.has_message("noisy.compute", "[stderr] noisy says hello on stderr"));
        assert!(out.has_message("noisy.compute", "noisy logged normally"));
        // The complete output is also kept in the run's log directory, in files named
        // after the step (the live stream may drop lines; the files do not).
        let run_id = out.of_type("PIPELINE_START").next().unwrap()["run_id"]
            .as_str()
            .unwrap()
            .to_string();
        let log_dir = h.home.join("logs").join(&run_id);
        let mut log = String::new();
        for entry in std::fs::read_dir(&log_dir)
            .unwrap_or_else(|e| panic!("no step logs in {}: {e}", log_dir.display()))
        {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("noisy.compute.") {
                log.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
        assert!(
            log.contains("noisy says hello on stderr")
                && log.contains("noisy says hello on stdout"),
            "the step's log files in {} lack its output: {log}",
            log_dir.display()
        );
        // Every step ran in its own process, not in the parent.
        let parent = out.of_type("PIPELINE_START").next().unwrap()["pid"].clone();
        let child = out.one("noisy.compute", "STEP_SUCCESS")["pid"].clone();
        assert_ne!(parent, child);
    }

    pub fn grandchildren_are_killed_on_cancel(h: &Harness) {
        let (run, _) = start_sleepers(h);
        let pids: Vec<u32> = [
            "sleep_a.pid",
            "sleep_b.pid",
            "sleep_a.grandchild.pid",
            "sleep_b.grandchild.pid",
        ]
        .iter()
        .map(|f| read_pid(&h.work(f)))
        .collect();
        run.signal(libc::SIGINT);
        let out = run.finish();
        out.expect_code(130);
        assert_eq!(
            out.of_type("PIPELINE_CANCELED").count(),
            1,
            "{}",
            out.describe()
        );
        for pid in pids {
            assert_dies(pid, "a step process or its child");
        }
    }

    /// For executors that kill a step's process group after a grace period on their own
    /// (Dask: SIGTERM, then SIGKILL after the grace): one Ctrl-C takes down steps that
    /// ignore SIGTERM, and the run ends canceled.
    pub fn term_ignoring_steps_die_after_one_interrupt(h: &Harness) {
        let (run, pids) = start_sleepers(h);
        run.signal(libc::SIGINT);
        let out = run.finish();
        out.expect_canceled();
        for pid in pids {
            assert_dies(pid, "a step process that ignores SIGTERM");
        }
    }

    /// For executors that wait for SIGTERM'd steps until a second Ctrl-C (multiprocess).
    pub fn second_interrupt_kills_at_once(h: &Harness) {
        let (mut run, pids) = start_sleepers(h);
        run.signal(libc::SIGINT);
        // The steps ignore SIGTERM; wait until the executor has started canceling.
        run.wait_event("the cancel notice", |e| {
            e["event_type"] == "ENGINE_EVENT"
                && e["message"].as_str().unwrap_or("").starts_with("canceling")
        });
        run.signal(libc::SIGINT);
        let out = run.finish();
        out.expect_code(130);
        assert!(
            out.stderr.contains("interrupted again"),
            "stderr: {}",
            out.stderr
        );
        for pid in pids {
            assert_dies(pid, "a step process");
        }
    }
}

/// Tests for every executor; expects `fn harness() -> Harness` in the enclosing module.
macro_rules! core_cases {
    () => {
        #[test]
        fn success() {
            cases::success(&harness());
        }
        #[test]
        fn failure_skips_dependents_and_finishes_independent_branch() {
            cases::failure_skips_dependents_and_finishes_independent_branch(&harness());
        }
        #[test]
        fn panic_reports_message_and_location() {
            cases::panic_reports_message_and_location(&harness());
        }
        #[test]
        fn retries_policy_explicit_and_run_config_override() {
            cases::retries_policy_explicit_and_run_config_override(&harness());
        }
        #[test]
        fn retries_exhausted_fail() {
            cases::retries_exhausted_fail(&harness());
        }
        #[test]
        fn events_are_live() {
            cases::events_are_live(&harness());
        }
        #[test]
        fn cancel_stops_steps_and_leaves_no_orphans() {
            cases::cancel_stops_steps_and_leaves_no_orphans(&harness());
        }
    };
}

/// Resources and concurrency for executors with `max_concurrent` and one `resources:`
/// pool for the run.
macro_rules! scheduling_cases {
    () => {
        #[test]
        fn resources_serialize_steps() {
            cases::resources_serialize_steps(
                &harness(),
                "{max_concurrent: 4, resources: {GPU: 1}}",
            );
        }
        #[test]
        fn concurrency_overlaps_independent_steps() {
            cases::concurrency_overlaps_independent_steps(
                &harness(),
                "{max_concurrent: 2, resources: {GPU: 2}}",
            );
        }
        #[test]
        fn impossible_resources_rejected_before_the_run() {
            cases::impossible_resources_rejected_before_the_run(
                &harness(),
                "{resources: {CPU: 8}}",
            );
        }
    };
}

/// The same three questions for an executor whose resources are per worker and whose
/// concurrency is the workers' threads (Dask's local cluster). One worker with two
/// threads has room for both steps; only its `GPU` amount decides whether they overlap.
macro_rules! worker_resource_cases {
    () => {
        #[test]
        fn resources_serialize_steps() {
            cases::resources_serialize_steps(
                &harness(),
                "{n_workers: 1, threads_per_worker: 2, resources: {GPU: 1}}",
            );
        }
        #[test]
        fn concurrency_overlaps_independent_steps() {
            cases::concurrency_overlaps_independent_steps(
                &harness(),
                "{n_workers: 1, threads_per_worker: 2, resources: {GPU: 2}}",
            );
        }
        #[test]
        fn impossible_resources_rejected_before_the_run() {
            cases::impossible_resources_rejected_before_the_run(
                &harness(),
                "{resources: {CPU: 8}}",
            );
        }
    };
}

/// Tests for executors that run every step in its own process.
macro_rules! isolated_cases {
    () => {
        #[test]
        fn in_memory_storage_is_refused_up_front() {
            cases::in_memory_storage_is_refused_up_front(&harness());
        }
        #[test]
        fn abort_is_contained() {
            cases::crash_is_contained(&harness(), "abort", "6");
        }
        #[test]
        fn kill9_is_contained() {
            cases::crash_is_contained(&harness(), "kill9", "9");
        }
        #[test]
        fn segfault_is_contained() {
            cases::crash_is_contained(&harness(), "segv", "11");
        }
        #[test]
        fn stdout_and_stderr_are_captured() {
            cases::stdout_and_stderr_are_captured(&harness());
        }
        #[test]
        fn grandchildren_are_killed_on_cancel() {
            cases::grandchildren_are_killed_on_cancel(
                &harness().env("SF_CONFORMANCE_GRANDCHILD", "1"),
            );
        }
    };
}

/// Cancellation that waits for steps to exit on SIGTERM, and kills them at once on a
/// second Ctrl-C (multiprocess).
macro_rules! escalating_cancel_cases {
    () => {
        #[test]
        fn second_interrupt_kills_at_once() {
            cases::second_interrupt_kills_at_once(
                &harness().env("SF_CONFORMANCE_IGNORE_TERM", "1"),
            );
        }
    };
}

/// Cancellation that SIGKILLs steps by itself after a grace period (Dask).
macro_rules! grace_cancel_cases {
    () => {
        #[test]
        fn term_ignoring_steps_die_after_one_interrupt() {
            cases::term_ignoring_steps_die_after_one_interrupt(
                &harness().env("SF_CONFORMANCE_IGNORE_TERM", "1"),
            );
        }
    };
}

/// Instantiates the suite for one executor: `conformance_suite!(<config key>, "<base run
/// config>", <case groups>...)`; see the module docs for the groups. A second
/// configuration of the same executor gets its own module name:
/// `conformance_suite!(<module> as <config key>, ...)`.
macro_rules! conformance_suite {
    ($name:ident as $key:ident, $config:expr $(, $group:ident)* $(,)?) => {
        mod $name {
            use super::*;

            fn harness() -> Harness {
                Harness::new(stringify!($key), $config)
            }

            core_cases!();
            $($group!();)*
        }
    };
    ($name:ident, $config:expr $(, $group:ident)* $(,)?) => {
        conformance_suite!($name as $name, $config $(, $group)*);
    };
}

conformance_suite!(
    in_process,
    "execution: {in_process: {config: {max_concurrent: 4}}}\nstorage: {in_memory: {}}\n",
    scheduling_cases
);
conformance_suite!(
    multiprocess,
    "execution: {multiprocess: {config: {max_concurrent: 4}}}\nstorage: {filesystem: {}}\n",
    scheduling_cases,
    isolated_cases,
    escalating_cancel_cases
);
// The same executor with warm step servers (`isolation: warm`): every case again.
conformance_suite!(
    multiprocess_warm as multiprocess,
    "execution: {multiprocess: {config: {max_concurrent: 4, isolation: warm}}}\nstorage: {filesystem: {}}\n",
    scheduling_cases,
    isolated_cases,
    escalating_cancel_cases
);
// Warm step servers that run each step themselves (`isolation: in_server`): every case.
conformance_suite!(
    multiprocess_in_server as multiprocess,
    "execution: {multiprocess: {config: {max_concurrent: 4, isolation: in_server}}}\nstorage: {filesystem: {}}\n",
    scheduling_cases,
    isolated_cases,
    escalating_cancel_cases
);
conformance_suite!(
    dask,
    "execution: {dask: {config: {n_workers: 2, threads_per_worker: 1}}}\nstorage: {filesystem: {}}\n",
    worker_resource_cases,
    isolated_cases,
    grace_cancel_cases
);
// Dask with warm step servers on the workers (`isolation: warm`).
conformance_suite!(
    dask_warm as dask,
    "execution: {dask: {config: {n_workers: 2, threads_per_worker: 1, isolation: warm}}}\nstorage: {filesystem: {}}\n",
    worker_resource_cases,
    isolated_cases,
    grace_cancel_cases
);

/// Behaviour specific to the multiprocess executor and the step protocol.
mod multiprocess_only {
    use super::*;

    /// The step's stderr file is named in an event as soon as its process starts.
    #[test]
    fn step_log_file_is_announced() {
        let h = Harness::new(
            "multiprocess",
            "execution: {multiprocess: {}}\nstorage: {filesystem: {}}\n",
        );
        let out = h.run("noisy", "");
        out.expect_code(0);
        let launch = out
            .step("noisy.compute", "ENGINE_EVENT")
            .into_iter()
            .find(|e| e["data"]["details"]["log_file"].is_string())
            .expect("an ENGINE_EVENT naming the step's log file");
        let path = launch["data"]["details"]["log_file"].as_str().unwrap();
        assert!(
            path.ends_with("noisy.compute.log") && path.contains("/logs/"),
            "{path}"
        );
        let log = std::fs::read_to_string(path).unwrap();
        assert!(log.contains("noisy says hello on stderr"), "{log}");
    }

    #[test]
    fn default_concurrency_is_one_per_core() {
        let h = Harness::new(
            "multiprocess",
            "execution: {multiprocess: {}}\nstorage: {filesystem: {}}\n",
        );
        let out = h.run("success", "");
        out.expect_code(0);
        let cores = std::thread::available_parallelism().unwrap().get();
        let engine = out
            .of_type("ENGINE_EVENT")
            .find(|e| e["data"]["details"]["max_concurrent"].is_u64())
            .expect("executor engine event");
        assert_eq!(engine["data"]["details"]["max_concurrent"], cores);
    }

    /// A parent killed outright (no chance to clean up) still takes its steps with it.
    #[test]
    fn step_processes_die_with_a_killed_parent() {
        let h = Harness::new(
            "multiprocess",
            "execution: {multiprocess: {config: {max_concurrent: 2}}}\nstorage: {filesystem: {}}\n",
        );
        let (run, pids) = start_sleepers(&h);
        assert!(!pids.contains(&run.pid()));
        run.signal(libc::SIGKILL);
        let out = run.finish();
        assert_eq!(out.code, None, "killed by a signal");
        for pid in pids {
            assert_dies(pid, "a step process of a killed parent");
        }
    }

    /// Runs `conformance step` by hand, as a remote worker would, with `invocation` on stdin.
    fn run_step(invocation: &Value) -> std::process::Output {
        let mut child = Command::new(binary())
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .arg("step")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(invocation.to_string().as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// Runs `conformance step` by hand with an invocation whose protocol version is wrong.
    #[test]
    fn protocol_version_mismatch_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let invocation = serde_json::json!({
            "protocol": 999,
            "run_id": "r1",
            "pipeline": "success",
            "mode": "default",
            "step_key": "numbers.compute",
            "attempt": 1,
            "run_config": {"storage": {"filesystem": {}}},
            "home": tmp.path(),
        });
        let out = run_step(&invocation);
        assert_eq!(out.status.code(), Some(3));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last: Value =
            serde_json::from_str(stdout.lines().last().expect("a result line")).unwrap();
        assert_eq!(last["type"], "result");
        assert_eq!(last["ok"], false);
        let message = last["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("step protocol mismatch") && message.contains("999"),
            "{message}"
        );
    }

    /// A step invocation run by hand (as a remote worker would) writes events then a result.
    #[test]
    fn step_mode_runs_one_step_from_an_invocation() {
        let tmp = tempfile::tempdir().unwrap();
        let invocation = serde_json::json!({
            "protocol": 1,
            "run_id": "r2",
            "pipeline": "success",
            "mode": "default",
            "step_key": "numbers.compute",
            "attempt": 1,
            "run_config": {"storage": {"filesystem": {}}, "execution": {"multiprocess": {}}},
            "home": tmp.path(),
        });
        let out = run_step(&invocation);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.first().unwrap()["event"]["event_type"], "STEP_START");
        assert!(
            lines
                .iter()
                .any(|l| l["event"]["event_type"] == "STEP_OUTPUT")
        );
        assert_eq!(lines.last().unwrap()["type"], "result");
        assert_eq!(lines.last().unwrap()["ok"], true);
        assert!(
            tmp.path()
                .join("storage/r2/intermediates/numbers.compute/result")
                .is_file()
        );
    }
}

/// Behaviour specific to the Dask executor: which storage it accepts for which cluster.
mod dask_only {
    use super::dask_support::{DaskCluster, WorkerSpec};
    use super::*;

    /// `filesystem` storage declared `shared: true` with an absolute base_dir runs on an
    /// existing cluster, and the intermediates land in that directory. (The refusal of
    /// plain `filesystem` for a non-loopback address is a unit test of the Dask
    /// executor's check: tests only use loopback addresses.)
    #[test]
    fn shared_filesystem_runs_on_an_existing_cluster() {
        let cluster = DaskCluster::start(&[WorkerSpec::plain("w1")]);
        let h = Harness::new(
            "dask",
            &format!(
                "execution: {{dask: {{config: {{address: '{}'}}}}}}\n",
                cluster.address
            ),
        );

        // Workers on other machines may start in another directory: base_dir is absolute.
        let shared = h.work("shared-storage");
        let out = h.run(
            "success",
            &format!(
                "storage: {{filesystem: {{config: {{base_dir: '{}', shared: true}}}}}}\n",
                shared.display()
            ),
        );
        out.expect_code(0);
        assert!(
            out.has_message("total.compute", "total=55"),
            "{}",
            out.describe()
        );
        let worker = cluster.worker_address(0);
        assert_eq!(
            out.one("total.compute", "STEP_SUCCESS")["worker"],
            worker,
            "{}",
            out.describe()
        );
        let run_id = out.of_type("PIPELINE_START").next().unwrap()["run_id"]
            .as_str()
            .unwrap()
            .to_string();
        for step in ["numbers", "sum_evens", "sum_odds", "total"] {
            let path = shared.join(format!("{run_id}/intermediates/{step}.compute/result"));
            assert!(path.is_file(), "{} is missing", path.display());
        }
    }
}

/// Runs the `crash` pipeline with an aborting step: it fails as a `crash` that names
/// signal 6. Returns the run and the crash message.
fn aborted_run(h: &Harness) -> (Outcome, String) {
    let out = h.run("crash", "solids: {crash: {config: {how: abort}}}\n");
    out.expect_code(1);
    let error = &out.one("crash.compute", "STEP_FAILURE")["data"]["error"];
    assert_eq!(error["kind"], "crash", "{error}");
    let message = error["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("killed by signal 6") && message.contains("without reporting a result"),
        "{message}"
    );
    (out, message)
}

/// Warm step servers (`isolation: warm`): what a server does when a step crashes, when
/// it dies itself, when it is recycled, and on Ctrl-C.
mod multiprocess_warm_only {
    use super::*;

    fn warm(config: &str) -> Harness {
        Harness::new(
            "multiprocess",
            &format!(
                "execution: {{multiprocess: {{config: {{isolation: warm, {config}}}}}}}\nstorage: {{filesystem: {{}}}}\n"
            ),
        )
    }

    /// The "started step process" events' details: `(step key, details)`.
    fn launches(events: &[Value]) -> Vec<(String, Value)> {
        events
            .iter()
            .filter(|e| {
                e["event_type"] == "ENGINE_EVENT"
                    && e["data"]["details"]["isolation"] == "warm"
                    && e["data"]["details"]["server"].is_u64()
            })
            .map(|e| {
                (
                    e["step_key"].as_str().unwrap_or_default().to_string(),
                    e["data"]["details"].clone(),
                )
            })
            .collect()
    }

    fn servers(events: &[Value]) -> Vec<u32> {
        let mut pids: Vec<u32> = launches(events)
            .iter()
            .map(|(_, d)| d["server"].as_u64().unwrap() as u32)
            .collect();
        pids.dedup();
        pids
    }

    /// A step that aborts is a crash with its own pid and signal, as with `process`; the
    /// server was not in that process, so it serves the remaining steps, and it is gone
    /// after the run.
    #[test]
    fn an_aborting_step_is_a_crash_and_the_server_serves_on() {
        let h = warm("max_concurrent: 1");
        let (out, message) = aborted_run(&h);
        let message = message.as_str();
        let launched = launches(&out.events);
        let crash_pid = launched
            .iter()
            .find(|(k, _)| k == "crash.compute")
            .map(|(_, d)| d["pid"].clone())
            .expect("crash.compute was launched");
        assert!(
            message.contains(&format!("step process {crash_pid} ")),
            "{message}"
        );
        assert!(
            launched.iter().all(|(_, d)| d["forked"] == true),
            "{launched:?}"
        );
        let servers = servers(&out.events);
        assert_eq!(servers.len(), 1, "one slot, one server: {launched:?}");
        out.one("numbers.compute", "STEP_SUCCESS");
        out.one("sum_evens.compute", "STEP_SUCCESS");
        out.one("downstream.compute", "STEP_SKIPPED");
        assert_dies(servers[0], "the step server after the run");
    }

    /// A server killed under a running step: the step fails as a crash (its process died
    /// with the server), its retry runs on a new server, and the run succeeds.
    #[test]
    fn a_killed_server_crashes_its_step_and_a_new_server_runs_the_retry() {
        let h = warm("max_concurrent: 1");
        let mut run = h.start(
            "live",
            "solids: {waits_for_go: {retry: {max_retries: 1}}}\n",
        );
        let launch = run.wait_event("the warm launch", |e| {
            e["event_type"] == "ENGINE_EVENT" && e["data"]["details"]["server"].is_u64()
        });
        run.wait_event("the log line `waiting for go`", |e| {
            e["event_type"] == "LOG_MESSAGE" && e["message"] == "waiting for go"
        });
        let server = launch["data"]["details"]["server"].as_u64().unwrap() as u32;
        let step = launch["data"]["details"]["pid"].as_u64().unwrap() as u32;
        // SAFETY: kill(2) by pid on the server, a live child of the pipeline process.
        assert_eq!(
            unsafe { libc::kill(server as libc::pid_t, libc::SIGKILL) },
            0
        );
        run.wait_event("the retry", |e| e["event_type"] == "STEP_UP_FOR_RETRY");
        std::fs::write(h.work("go"), "go").unwrap();
        let out = run.finish();
        out.expect_code(0);
        assert_dies(step, "the step process of a killed server");
        let retry = &out.one("waits_for_go.compute", "STEP_UP_FOR_RETRY")["data"]["error"];
        assert_eq!(retry["kind"], "crash", "{retry}");
        assert!(
            out.has_message(
                "waits_for_go.compute",
                &format!("step server {server} was killed by signal 9")
            ),
            "{}",
            out.describe()
        );
        let servers = servers(&out.events);
        assert_eq!(servers.len(), 2, "a new server for the retry: {servers:?}");
        assert_eq!(
            out.one("waits_for_go.compute", "STEP_SUCCESS")["data"]["attempt"],
            2
        );
    }

    /// `max_steps_per_server: 1` replaces the server after every step; the results are
    /// those of any other run.
    #[test]
    fn recycled_servers_keep_results_right() {
        let h = warm("max_concurrent: 1, max_steps_per_server: 1");
        cases::success(&h);
        let out = h.run("success", "");
        out.expect_code(0);
        let servers = servers(&out.events);
        assert_eq!(servers.len(), 4, "one server per step: {servers:?}");
        let recycled = out
            .of_type("ENGINE_EVENT")
            .filter(|e| e["data"]["details"]["recycled"] == true)
            .count();
        assert_eq!(recycled, 4, "{}", out.describe());
        for pid in servers {
            assert_dies(pid, "a recycled step server");
        }
    }

    /// Ctrl-C while warm steps run: the steps (and what they started) are stopped, the
    /// run ends canceled with 130, and no server outlives the run.
    #[test]
    fn ctrl_c_during_warm_steps_stops_them_and_the_servers() {
        let h = warm("max_concurrent: 2").env("SF_CONFORMANCE_GRANDCHILD", "1");
        let (run, pids) = start_sleepers(&h);
        let servers = servers(run.events());
        assert_eq!(servers.len(), 2, "two slots: {servers:?}");
        let grandchildren = [
            read_pid(&h.work("sleep_a.grandchild.pid")),
            read_pid(&h.work("sleep_b.grandchild.pid")),
        ];
        run.signal(libc::SIGINT);
        let out = run.finish();
        out.expect_canceled();
        out.one("downstream.compute", "STEP_SKIPPED");
        for pid in pids.into_iter().chain(grandchildren).chain(servers) {
            assert_dies(pid, "a warm step, its child, or its server");
        }
    }
}

/// `isolation: in_server`: the slot's step server runs each step itself.
mod multiprocess_in_server_only {
    use super::*;

    /// A step that aborts takes its server down: a crash with the server's pid (the
    /// step's process) and the signal, as with `process`; the remaining steps run on a
    /// new server, and no server outlives the run.
    #[test]
    fn an_aborting_step_is_a_crash_and_a_new_server_runs_the_rest() {
        let h = Harness::new(
            "multiprocess",
            "execution: {multiprocess: {config: {max_concurrent: 1, isolation: in_server}}}\nstorage: {filesystem: {}}\n",
        );
        let (out, message) = aborted_run(&h);
        let message = message.as_str();
        let launches: Vec<(String, Value)> = out
            .of_type("ENGINE_EVENT")
            .filter(|e| {
                e["data"]["details"]["isolation"] == "in_server"
                    && e["data"]["details"]["server"].is_u64()
            })
            .map(|e| {
                let key = e["step_key"].as_str().unwrap_or_default().to_string();
                (key, e["data"]["details"].clone())
            })
            .collect();
        assert!(
            launches.iter().all(|(_, d)| d["pid"] == d["server"]),
            "every step ran in its server: {launches:?}"
        );
        let crashed = launches
            .iter()
            .position(|(k, _)| k == "crash.compute")
            .expect("crash.compute was launched");
        let crash_pid = &launches[crashed].1["pid"];
        assert!(
            message.contains(&format!("step process {crash_pid} ")),
            "{message}"
        );
        for (key, details) in &launches[crashed + 1..] {
            assert_ne!(&details["server"], crash_pid, "{key} ran on a new server");
        }
        out.one("numbers.compute", "STEP_SUCCESS");
        out.one("sum_evens.compute", "STEP_SUCCESS");
        out.one("downstream.compute", "STEP_SKIPPED");
        for (_, details) in &launches {
            assert_dies(
                details["server"].as_u64().unwrap() as u32,
                "a step server after the run",
            );
        }
    }
}

/// Dask with `isolation: warm`: the steps are forked by step servers on the workers.
mod dask_warm_only {
    use super::*;

    fn warm(config: &str) -> Harness {
        Harness::new(
            "dask",
            &format!(
                "execution: {{dask: {{config: {{n_workers: 2, threads_per_worker: 1, isolation: warm, {config}}}}}}}\nstorage: {{filesystem: {{}}}}\n"
            ),
        )
    }

    fn parent_of(pid: u32) -> u32 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("a live step");
        let (_, rest) = stat.rsplit_once(") ").expect("stat format");
        rest.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Each step process is a child of a `step-server` on its worker; on Ctrl-C the run
    /// ends canceled and neither the steps nor the servers outlive it.
    #[test]
    fn steps_are_forked_by_worker_servers_and_ctrl_c_leaves_nothing() {
        let h = warm("allowed_failures: 0");
        let (run, pids) = start_sleepers(&h);
        let servers: Vec<u32> = pids.iter().map(|&p| parent_of(p)).collect();
        for server in &servers {
            let cmdline = std::fs::read(format!("/proc/{server}/cmdline")).unwrap();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            assert!(
                cmdline.contains("step-server"),
                "parent {server}: {cmdline}"
            );
        }
        run.signal(libc::SIGINT);
        let out = run.finish();
        out.expect_canceled();
        for pid in pids.into_iter().chain(servers) {
            assert_dies(pid, "a warm step or its worker's step server");
        }
    }

    /// A server per step (`max_steps_per_server: 1`): the results are right.
    #[test]
    fn recycled_worker_servers_keep_results_right() {
        cases::success(&warm("max_steps_per_server: 1"));
    }
}
