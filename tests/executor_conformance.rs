//! Executor conformance suite: the same behaviour checked on every executor.
//!
//! The cases are the kit in `solidflow::conformance::executor` (the `conformance`
//! feature), which a third-party executor runs the same way. Each drives the real CLI of
//! the `conformance` pipeline binary (`src/bin/conformance.rs`, the kit's
//! `repository()`) with `execute <pipeline> --json` and checks exit code, events and side
//! effects. Here every case is one test, per executor and isolation.
//!
//! An executor joins with one `conformance_suite!` line at the bottom of this file: the
//! module name, the kit's `Target` (binary, config key, base run config, the groups of
//! cases it claims), and one macro per claimed group:
//!
//! ```ignore
//! conformance_suite!(
//!     multiprocess,
//!     target("multiprocess", "execution: {multiprocess: {}}\nstorage: {filesystem: {}}\n")
//!         .with_resources(ResourceConfigs::run_pool())
//!         .with_groups([Group::Isolated, Group::EscalatingCancel]),
//!     core_cases, resource_cases, isolated_cases, escalating_cancel_cases
//! );
//! ```
//!
//! The same executor in another isolation (warm step servers next to process-per-step)
//! is another line under another module name. Two tests keep the lists honest: each
//! suite's macros must be the groups its target claims, and each group macro must list
//! exactly the kit's cases of that group (`every_case_of_the_kit_is_instantiated`), so
//! a case added to the kit fails here until it has a test on every executor.
//!
//! The Dask cases need the venv from `scripts/python-env.sh` (or `SOLIDFLOW_PYTHON`);
//! without it they fail and say so. Each Dask case starts a local cluster (about a
//! second), so the Dask module sticks to 2 workers × 1 thread. Behaviour specific to one
//! executor is in the `*_only` modules at the end.
//!
//! Run: `cargo build --bins && cargo test --test executor_conformance`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;
use solidflow::conformance::executor::{
    self as kit, Group, Harness, Outcome, ResourceConfigs, Target, assert_dies, expect_canceled,
    read_pid, start_sleepers,
};

#[path = "support/dask.rs"]
mod dask_support;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_conformance"))
}

/// The `executor` target of the `conformance` binary with `base_config`; Dask targets
/// get the interpreter with dask + distributed (panics naming the fix if it is missing).
fn target(executor: &str, base_config: &str) -> Target {
    let target = Target::new(binary(), executor, base_config);
    if executor == "dask" {
        target.env(
            "SOLIDFLOW_PYTHON",
            dask_support::python().display().to_string(),
        )
    } else {
        target
    }
}

/// A fresh harness on `target(executor, base_config)`.
fn harness(executor: &str, base_config: &str) -> Harness {
    Harness::new(&target(executor, base_config))
}

/// Resources that belong to each worker, with the workers' threads as the concurrency
/// (Dask's local cluster). One worker with two threads has room for both steps; only
/// its `GPU` amount decides whether they overlap.
fn per_worker_resources() -> ResourceConfigs {
    ResourceConfigs {
        one_gpu: "{n_workers: 1, threads_per_worker: 2, resources: {GPU: 1}}".into(),
        two_gpus: "{n_workers: 1, threads_per_worker: 2, resources: {GPU: 2}}".into(),
        no_gpu: "{resources: {CPU: 8}}".into(),
    }
}

/// `cases!(tests, Group: a, b)` makes one test per case (run on the enclosing module's
/// `under_test()`); `cases!(group, ...)` is the group; `cases!(names, ...)` the group and
/// its case names, for the completeness check.
macro_rules! cases {
    (tests, $group:ident: $($case:ident),+ $(,)?) => {$(
        #[test]
        fn $case() {
            crate::kit::run_case(&under_test(), stringify!($case));
        }
    )+};
    (group, $group:ident: $($case:ident),+ $(,)?) => {
        crate::kit::Group::$group
    };
    (names, $group:ident: $($case:ident),+ $(,)?) => {
        (crate::kit::Group::$group, vec![$(stringify!($case)),+])
    };
}

/// Every executor.
macro_rules! core_cases {
    ($what:ident) => {
        cases! {$what, Core:
            success,
            failure_skips_dependents_and_finishes_independent_branch,
            panic_reports_message_and_location,
            retries_policy_explicit_and_run_config_override,
            retries_exhausted_fail,
            events_are_live,
            cancel_stops_steps_and_leaves_no_orphans,
        }
    };
}

/// Resources and concurrency, with the configs of the target's `ResourceConfigs`.
macro_rules! resource_cases {
    ($what:ident) => {
        cases! {$what, Resources:
            resources_serialize_steps,
            concurrency_overlaps_independent_steps,
            impossible_resources_rejected_before_the_run,
        }
    };
}

/// Executors that run every step in its own process.
macro_rules! isolated_cases {
    ($what:ident) => {
        cases! {$what, Isolated:
            in_memory_storage_is_refused_up_front,
            abort_is_contained,
            kill9_is_contained,
            segfault_is_contained,
            stdout_and_stderr_are_captured,
            grandchildren_are_killed_on_cancel,
        }
    };
}

/// Cancellation that waits for steps to exit on SIGTERM, and kills them at once on a
/// second Ctrl-C (multiprocess).
macro_rules! escalating_cancel_cases {
    ($what:ident) => {
        cases! {$what, EscalatingCancel: second_interrupt_kills_at_once}
    };
}

/// Cancellation that SIGKILLs steps by itself after a grace period (Dask).
macro_rules! grace_cancel_cases {
    ($what:ident) => {
        cases! {$what, GraceCancel: term_ignoring_steps_die_after_one_interrupt}
    };
}

/// `conformance_suite!(<module>, <Target>, <group macros>...)`: one test per case of
/// each group, and a check that the groups are those the target claims.
macro_rules! conformance_suite {
    ($name:ident, $target:expr, $($group:ident),+ $(,)?) => {
        mod $name {
            use super::*;

            fn under_test() -> Target {
                $target
            }

            $($group!(tests);)+

            #[test]
            fn instantiates_the_groups_the_target_claims() {
                assert_eq!(under_test().groups(), [$($group!(group)),+]);
            }
        }
    };
}

/// A case added to the kit must be added to its group's macro above, too.
#[test]
fn every_case_of_the_kit_is_instantiated() {
    let listed = [
        core_cases!(names),
        resource_cases!(names),
        isolated_cases!(names),
        escalating_cancel_cases!(names),
        grace_cancel_cases!(names),
    ];
    for (group, names) in &listed {
        assert_eq!(
            &kit::case_names(*group),
            names,
            "the kit's {group:?} cases differ from this file's macro for them"
        );
    }
    for case in kit::CASES {
        assert!(
            listed.iter().any(|(group, _)| *group == case.group),
            "the kit's group {:?} has no macro here",
            case.group
        );
    }
}

conformance_suite!(
    in_process,
    target(
        "in_process",
        "execution: {in_process: {config: {max_concurrent: 4}}}\nstorage: {in_memory: {}}\n"
    )
    .with_resources(ResourceConfigs::run_pool()),
    core_cases,
    resource_cases
);
conformance_suite!(
    multiprocess,
    target(
        "multiprocess",
        "execution: {multiprocess: {config: {max_concurrent: 4}}}\nstorage: {filesystem: {}}\n"
    )
    .with_resources(ResourceConfigs::run_pool())
    .with_groups([Group::Isolated, Group::EscalatingCancel]),
    core_cases,
    resource_cases,
    isolated_cases,
    escalating_cancel_cases
);
// The same executor with warm step servers (`isolation: warm`): every case again.
conformance_suite!(
    multiprocess_warm,
    target(
        "multiprocess",
        "execution: {multiprocess: {config: {max_concurrent: 4, isolation: warm}}}\nstorage: {filesystem: {}}\n"
    )
    .with_resources(ResourceConfigs::run_pool())
    .with_groups([Group::Isolated, Group::EscalatingCancel]),
    core_cases,
    resource_cases,
    isolated_cases,
    escalating_cancel_cases
);
// Warm step servers that run each step themselves (`isolation: in_server`): every case.
conformance_suite!(
    multiprocess_in_server,
    target(
        "multiprocess",
        "execution: {multiprocess: {config: {max_concurrent: 4, isolation: in_server}}}\nstorage: {filesystem: {}}\n"
    )
    .with_resources(ResourceConfigs::run_pool())
    .with_groups([Group::Isolated, Group::EscalatingCancel]),
    core_cases,
    resource_cases,
    isolated_cases,
    escalating_cancel_cases
);
conformance_suite!(
    dask,
    target(
        "dask",
        "execution: {dask: {config: {n_workers: 2, threads_per_worker: 1}}}\nstorage: {filesystem: {}}\n"
    )
    .with_resources(per_worker_resources())
    .with_groups([Group::Isolated, Group::GraceCancel]),
    core_cases,
    resource_cases,
    isolated_cases,
    grace_cancel_cases
);
// Dask with warm step servers on the workers (`isolation: warm`).
conformance_suite!(
    dask_warm,
    target(
        "dask",
        "execution: {dask: {config: {n_workers: 2, threads_per_worker: 1, isolation: warm}}}\nstorage: {filesystem: {}}\n"
    )
    .with_resources(per_worker_resources())
    .with_groups([Group::Isolated, Group::GraceCancel]),
    core_cases,
    resource_cases,
    isolated_cases,
    grace_cancel_cases
);
// Dask with step servers that run each step themselves (`isolation: in_server`), on
// the pipes they keep between steps (`run_on_kept_pipes`).
conformance_suite!(
    dask_in_server,
    target(
        "dask",
        "execution: {dask: {config: {n_workers: 2, threads_per_worker: 1, isolation: in_server}}}\nstorage: {filesystem: {}}\n"
    )
    .with_resources(per_worker_resources())
    .with_groups([Group::Isolated, Group::GraceCancel]),
    core_cases,
    resource_cases,
    isolated_cases,
    grace_cancel_cases
);

/// The kit's one-call entry point, as a third-party executor would use it: every core
/// case on `in_process`, one after the other.
#[test]
fn run_all_passes_on_in_process() {
    kit::run_all(&target(
        "in_process",
        "execution: {in_process: {config: {max_concurrent: 4}}}\nstorage: {in_memory: {}}\n",
    ));
}

/// Behaviour specific to the multiprocess executor and the step protocol.
mod multiprocess_only {
    use super::*;

    /// The path of `step`'s log file, as its launch `ENGINE_EVENT` names it.
    fn announced_log_file(out: &Outcome, step: &str) -> String {
        let launch = out
            .step(step, "ENGINE_EVENT")
            .into_iter()
            .find(|e| e["data"]["details"]["log_file"].is_string())
            .expect("an ENGINE_EVENT naming the step's log file");
        launch["data"]["details"]["log_file"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The step's stderr file is named in an event as soon as its process starts.
    #[test]
    fn step_log_file_is_announced() {
        let h = harness(
            "multiprocess",
            "execution: {multiprocess: {}}\nstorage: {filesystem: {}}\n",
        );
        let out = h.run("noisy", "");
        out.expect_code(0);
        let path = announced_log_file(&out, "noisy.compute");
        assert!(
            path.ends_with("noisy.compute.log") && path.contains("/logs/"),
            "{path}"
        );
        let log = std::fs::read_to_string(&path).unwrap();
        assert!(log.contains("noisy says hello on stderr"), "{log}");
    }

    /// The log file is created with the step's first stderr line: a step that writes
    /// nothing to stderr leaves none (an inode per step is not free).
    #[test]
    fn a_quiet_step_leaves_no_log_file() {
        let h = harness(
            "multiprocess",
            "execution: {multiprocess: {}}\nstorage: {filesystem: {}}\n",
        );
        let out = h.run("success", "");
        out.expect_code(0);
        let path = announced_log_file(&out, "numbers.compute");
        assert!(!std::path::Path::new(&path).exists(), "{path}");
    }

    #[test]
    fn default_concurrency_is_one_per_core() {
        let h = harness(
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
        let h = harness(
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
        let h = harness(
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

    fn warm(config: &str) -> Target {
        target(
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
        let h = Harness::new(&warm("max_concurrent: 1"));
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
        let h = Harness::new(&warm("max_concurrent: 1"));
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
        let target = warm("max_concurrent: 1, max_steps_per_server: 1");
        kit::cases::success(&target);
        let h = Harness::new(&target);
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
        let h = Harness::new(&warm("max_concurrent: 2").env("SF_CONFORMANCE_GRANDCHILD", "1"));
        let (run, pids) = start_sleepers(&h);
        let servers = servers(run.events());
        assert_eq!(servers.len(), 2, "two slots: {servers:?}");
        let grandchildren = [
            read_pid(&h.work("sleep_a.grandchild.pid")),
            read_pid(&h.work("sleep_b.grandchild.pid")),
        ];
        run.signal(libc::SIGINT);
        let out = run.finish();
        expect_canceled(&out);
        out.one("downstream.compute", "STEP_SKIPPED");
        for pid in pids.into_iter().chain(grandchildren).chain(servers) {
            assert_dies(pid, "a warm step, its child, or its server");
        }
    }
}

/// `isolation: in_server`: the slot's step server runs each step itself.
mod multiprocess_in_server_only {
    use super::*;

    /// One server runs every step of a run on one slot: what a step leaves in it (the
    /// message stream's background flush, kept between steps) is not taken for threads
    /// the step left running, so the server does not retire after each step.
    #[test]
    fn one_server_runs_step_after_step() {
        let h = Harness::new(&target(
            "multiprocess",
            "execution: {multiprocess: {config: {max_concurrent: 1, isolation: in_server}}}\nstorage: {filesystem: {}}\n",
        ));
        let out = h.run("success", "");
        out.expect_code(0);
        let servers: Vec<&Value> = out
            .of_type("ENGINE_EVENT")
            .filter(|e| {
                e["data"]["details"]["isolation"] == "in_server"
                    && e["data"]["details"]["server"].is_u64()
            })
            .map(|e| &e["data"]["details"]["server"])
            .collect();
        assert_eq!(servers.len(), 4, "{servers:?}");
        assert!(servers.iter().all(|s| *s == servers[0]), "{servers:?}");
        assert!(
            out.of_type("ENGINE_EVENT")
                .all(|e| e["data"]["details"]["recycled"].is_null()),
            "no server was replaced"
        );
    }

    /// A step that aborts takes its server down: a crash with the server's pid (the
    /// step's process) and the signal, as with `process`; the remaining steps run on a
    /// new server, and no server outlives the run.
    #[test]
    fn an_aborting_step_is_a_crash_and_a_new_server_runs_the_rest() {
        let h = Harness::new(&target(
            "multiprocess",
            "execution: {multiprocess: {config: {max_concurrent: 1, isolation: in_server}}}\nstorage: {filesystem: {}}\n",
        ));
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

    fn warm(config: &str) -> Target {
        target(
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
        let h = Harness::new(&warm("allowed_failures: 0"));
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
        expect_canceled(&out);
        for pid in pids.into_iter().chain(servers) {
            assert_dies(pid, "a warm step or its worker's step server");
        }
    }

    /// A server per step (`max_steps_per_server: 1`): the results are right.
    #[test]
    fn recycled_worker_servers_keep_results_right() {
        kit::cases::success(&warm("max_steps_per_server: 1"));
    }
}
