//! Processes a solid starts never outlive its step, and nothing of solidflow's is left
//! in `$TMPDIR` (issue 10, items 1, 3 and 4).
//!
//! The `faults` binary's `orphans` pipeline runs `spawner`, which starts two shells that
//! ignore SIGTERM/SIGINT/SIGHUP: one in the step's process group (`child`) and one in a
//! new session (`daemon`, as `setsid` daemons do), and writes their pids. Each test then
//! ends the step one way — it returns, its pipeline process is SIGKILLed, its Dask
//! worker is SIGKILLed, or the pipeline's process group gets Ctrl-C (SIGINT) — and
//! checks that the step process and both shells are gone, with generous deadlines. Every
//! process of a test (pipeline, bridge, local cluster, scheduler, workers) gets the
//! test's own `$TMPDIR`, checked for solidflow leftovers after each fault.
//!
//! Needs the venv from `scripts/python-env.sh` (or `SOLIDFLOW_PYTHON`) for the Dask
//! cases; without it they fail and say so.
//!
//! Run: `cargo test --test faults_processes -- --test-threads=2`.

#[path = "support/dask.rs"]
mod dask_support;
#[path = "support/fault_world.rs"]
mod fault_world;

use dask_support::{DaskCluster, WorkerSpec};
use fault_world::World;
use solidflow::conformance::executor::{LiveRun, assert_dies, read_pid};

/// Starts `faults execute orphans --json` with `execution` and `spawner` doing `then`.
fn start(w: &World, execution: &str, then: &str) -> LiveRun {
    w.execute(
        "orphans",
        &format!(
            "execution: {execution}\nstorage: {{filesystem: {{}}}}\n\
             solids: {{spawner: {{config: {{then: {then}}}}}}}\n"
        ),
    )
}

/// Waits until the spawner's shells run; returns (step, child, daemon) pids.
fn spawned(w: &World, run: &mut LiveRun) -> [u32; 3] {
    run.wait_log("spawner spawned");
    [
        read_pid(&w.work("spawner.pid")),
        read_pid(&w.work("spawner.child.pid")),
        read_pid(&w.work("spawner.daemon.pid")),
    ]
}

fn assert_all_die(pids: [u32; 3]) {
    for (pid, what) in pids.iter().zip([
        "the step process",
        "the solid's child process",
        "the solid's daemon (setsid) process",
    ]) {
        assert_dies(*pid, what);
    }
}

const MULTIPROCESS: &str = "{multiprocess: {}}";
const DASK_LOCAL: &str = "{dask: {config: {n_workers: 1, threads_per_worker: 1}}}";

/// A step that returns while its children run: they are killed when it ends, and the
/// downstream step runs without waiting for them.
fn step_end(execution: &str) {
    let w = World::new();
    let mut run = start(&w, execution, "return");
    let pids = spawned(&w, &mut run);
    let out = run.finish();
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert_eq!(out.of_type("STEP_SUCCESS").count(), 2, "{}", out.describe());
    assert_all_die(pids);
}

/// The pipeline process is SIGKILLed mid-step.
fn parent_kill(execution: &str) {
    let w = World::new();
    let mut run = start(&w, execution, "wait");
    let pids = spawned(&w, &mut run);
    run.signal(libc::SIGKILL);
    let _ = run.finish();
    assert_all_die(pids);
    w.assert_tmpdir_clean("a SIGKILL of the pipeline process");
}

/// Ctrl-C: SIGINT to the pipeline's whole process group, as a terminal sends it. The run
/// ends canceled (exit 130) and leaves nothing behind.
fn ctrl_c(execution: &str) {
    let w = World::new();
    let mut run = start(&w, execution, "wait");
    let pids = spawned(&w, &mut run);
    run.signal_group(libc::SIGINT);
    let out = run.finish();
    assert_eq!(out.code, Some(130), "{}", out.describe());
    assert_eq!(
        out.of_type("PIPELINE_CANCELED").count(),
        1,
        "{}",
        out.describe()
    );
    assert_all_die(pids);
    w.assert_tmpdir_clean("Ctrl-C");
}

#[test]
fn multiprocess_step_end_kills_the_solids_processes() {
    step_end(MULTIPROCESS);
}

#[test]
fn multiprocess_parent_kill_kills_the_solids_processes() {
    parent_kill(MULTIPROCESS);
}

#[test]
fn multiprocess_ctrl_c_kills_the_solids_processes() {
    ctrl_c(MULTIPROCESS);
}

#[test]
fn dask_step_end_kills_the_solids_processes() {
    step_end(DASK_LOCAL);
}

#[test]
fn dask_parent_kill_kills_the_solids_processes() {
    parent_kill(DASK_LOCAL);
}

/// Item 3: Ctrl-C on `dask: {}` ends the run canceled with exit 130 every time, and
/// leaves no process behind; repeated to catch a race.
#[test]
fn dask_ctrl_c_exits_130_every_time_and_kills_the_solids_processes() {
    for _ in 0..3 {
        ctrl_c("{dask: {}}");
    }
}

/// An existing cluster's worker is SIGKILLed (nanny and worker) while the step runs.
/// Scheduler and worker share the test's `$TMPDIR`, which must hold nothing of
/// solidflow's afterwards (item 4).
#[test]
fn dask_worker_kill_kills_the_solids_processes() {
    let w = World::new();
    let mut cluster =
        DaskCluster::start_with_env(&[WorkerSpec::plain("w1")], &[("TMPDIR", &w.tmpdir())]);
    let mut run = start(
        &w,
        &format!(
            "{{dask: {{config: {{address: '{}', forward_env: [SF_FAULTS_DIR]}}}}}}",
            cluster.address
        ),
        "wait",
    );
    let pids = spawned(&w, &mut run);
    cluster.kill_worker(0);
    assert_all_die(pids);
    drop(run);
    w.assert_tmpdir_clean("a SIGKILL of the Dask worker");
}
