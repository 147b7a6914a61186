//! The cases, as plain functions over a [`Target`]; each makes its own [`Harness`] and
//! panics, with the events and stderr it saw, when the executor misbehaves.

use super::harness::{Harness, Target};
use super::live_run::{LiveRun, assert_dies, read_pid};
use super::outcome::Outcome;

/// Starts the `cancel` pipeline and waits until both of its sleeping steps run; returns
/// the run and the two step processes' pids (read from `sleep_a.pid`, `sleep_b.pid`).
pub fn start_sleepers(h: &Harness) -> (LiveRun, [u32; 2]) {
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

/// The `cancel` pipeline was interrupted: exit 130, one `PIPELINE_CANCELED`, and both
/// sleeping steps failed as `interrupted`.
pub fn expect_canceled(out: &Outcome) {
    out.expect_code(130);
    assert_eq!(
        out.of_type("PIPELINE_CANCELED").count(),
        1,
        "{}",
        out.describe()
    );
    for step in ["sleep_a.compute", "sleep_b.compute"] {
        assert_eq!(
            out.one(step, "STEP_FAILURE")["data"]["error"]["kind"],
            "interrupted"
        );
    }
}

// --- core cases: every executor ------------------------------------------------------

/// `success` runs: every step succeeds, values flow (`total=55`), and `PIPELINE_START`
/// names the executor.
pub fn success(target: &Target) {
    let h = &Harness::new(target);
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
    assert_eq!(start["data"]["executor"], target.executor());
}

/// A failing step is a `STEP_FAILURE` with its message and causes; its dependent is
/// skipped, the independent branch finishes, and the run fails with exit 1.
pub fn failure_skips_dependents_and_finishes_independent_branch(target: &Target) {
    let h = &Harness::new(target);
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

/// A panicking step is a `panic` failure with the message and the source location.
pub fn panic_reports_message_and_location(target: &Target) {
    let h = &Harness::new(target);
    let out = h.run("panic", "");
    out.expect_code(1);
    let error = &out.one("kaboom.compute", "STEP_FAILURE")["data"]["error"];
    assert_eq!(error["kind"], "panic");
    assert!(
        error["message"].as_str().unwrap().contains("kaboom 42"),
        "{error}"
    );
    assert!(
        error["location"].as_str().unwrap().contains("pipelines.rs"),
        "{error}"
    );
    out.one("downstream.compute", "STEP_SKIPPED");
    out.one("sum_evens.compute", "STEP_SUCCESS");
}

/// Retries from a solid's policy, from `SolidError::retry`, and from run config
/// (`solids.<name>.retry`), with `STEP_UP_FOR_RETRY`/`STEP_RESTARTED` and the attempt
/// number visible to the solid.
pub fn retries_policy_explicit_and_run_config_override(target: &Target) {
    let h = &Harness::new(target);
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

/// A step out of retries fails for good and its dependent is skipped.
pub fn retries_exhausted_fail(target: &Target) {
    let h = &Harness::new(target);
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

/// With [`ResourceConfigs::one_gpu`](super::ResourceConfigs::one_gpu), the two `GPU: 1`
/// steps of `pair` never overlap.
pub fn resources_serialize_steps(target: &Target) {
    let h = &Harness::new(target);
    let executor_config = &target.resources().one_gpu;
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

/// With [`ResourceConfigs::two_gpus`](super::ResourceConfigs::two_gpus), both steps of
/// `pair` run at the same time.
pub fn concurrency_overlaps_independent_steps(target: &Target) {
    let h = &Harness::new(target);
    let executor_config = &target.resources().two_gpus;
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

/// With [`ResourceConfigs::no_gpu`](super::ResourceConfigs::no_gpu), the run is refused
/// before any step starts.
pub fn impossible_resources_rejected_before_the_run(target: &Target) {
    let h = &Harness::new(target);
    let executor_config = &target.resources().no_gpu;
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

/// A step's log line arrives while the step still runs (it waits for a file the case
/// writes only after seeing the line).
pub fn events_are_live(target: &Target) {
    let h = &Harness::new(target);
    let mut run = h.start("live", "");
    run.wait_event("the log line `waiting for go`", |e| {
        e["event_type"] == "LOG_MESSAGE" && e["message"] == "waiting for go"
    });
    std::fs::write(h.work("go"), "go").unwrap();
    let out = run.finish();
    out.expect_code(0);
    out.one("waits_for_go.compute", "STEP_SUCCESS");
}

/// Ctrl-C (SIGINT to the pipeline process) while two steps sleep: the run ends canceled
/// with 130, the steps are gone, the dependent step is skipped and run history says
/// `CANCELED`.
pub fn cancel_stops_steps_and_leaves_no_orphans(target: &Target) {
    let h = &Harness::new(target);
    let (run, pids) = start_sleepers(h);
    run.signal(libc::SIGINT);
    let out = run.finish();
    expect_canceled(&out);
    out.one("downstream.compute", "STEP_SKIPPED");
    for pid in pids {
        assert_dies(pid, "a step process");
    }
    // The run history records the cancellation.
    let runs = h
        .command()
        .args(["runs", "--json"])
        .output()
        .expect("run `runs --json`");
    let runs = String::from_utf8_lossy(&runs.stdout);
    assert!(runs.contains("\"CANCELED\""), "run history: {runs}");
}

// --- cases for executors that run each step in its own process ----------------------

/// `in_memory` lives in one process: refused before the run, naming what to pick.
pub fn in_memory_storage_is_refused_up_front(target: &Target) {
    let h = Harness::new(&target.clone().with_base_config(&format!(
        "execution: {{{}: {{}}}}\nstorage: {{in_memory: {{}}}}\n",
        target.executor()
    )));
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

/// A step that aborts (SIGABRT) is a `crash` failure; the rest of the run goes on.
pub fn abort_is_contained(target: &Target) {
    crash_is_contained(target, "abort", "6");
}

/// A step killed by SIGKILL (as by the OOM killer) is a `crash` failure.
pub fn kill9_is_contained(target: &Target) {
    crash_is_contained(target, "kill9", "9");
}

/// A step that segfaults is a `crash` failure.
pub fn segfault_is_contained(target: &Target) {
    crash_is_contained(target, "segv", "11");
}

fn crash_is_contained(target: &Target, how: &str, signal: &str) {
    let h = &Harness::new(target);
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

/// What a step prints on stdout and stderr becomes `[stderr]` log messages (stdout does
/// not corrupt the step protocol) and is kept in `<home>/logs/<run>/`; the step ran in
/// a process of its own.
pub fn stdout_and_stderr_are_captured(target: &Target) {
    let h = &Harness::new(target);
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
    let log_dir = h.home().join("logs").join(&run_id);
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
        log.contains("noisy says hello on stderr") && log.contains("noisy says hello on stdout"),
        "the step's log files in {} lack its output: {log}",
        log_dir.display()
    );
    // Every step ran in its own process, not in the parent.
    let parent = out.of_type("PIPELINE_START").next().unwrap()["pid"].clone();
    let child = out.one("noisy.compute", "STEP_SUCCESS")["pid"].clone();
    assert_ne!(parent, child);
}

/// Ctrl-C also ends what the steps started (a shell that ignores SIGTERM).
pub fn grandchildren_are_killed_on_cancel(target: &Target) {
    let h = &Harness::new(&target.clone().env("SF_CONFORMANCE_GRANDCHILD", "1"));
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
pub fn term_ignoring_steps_die_after_one_interrupt(target: &Target) {
    let h = &Harness::new(&target.clone().env("SF_CONFORMANCE_IGNORE_TERM", "1"));
    let (run, pids) = start_sleepers(h);
    run.signal(libc::SIGINT);
    let out = run.finish();
    expect_canceled(&out);
    for pid in pids {
        assert_dies(pid, "a step process that ignores SIGTERM");
    }
}

/// For executors that wait for SIGTERM'd steps until a second Ctrl-C (multiprocess).
pub fn second_interrupt_kills_at_once(target: &Target) {
    let h = &Harness::new(&target.clone().env("SF_CONFORMANCE_IGNORE_TERM", "1"));
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
