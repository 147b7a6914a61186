//! Per-step overhead of the multiprocess executor (`isolation: process`, `warm` and
//! `in_server`), next
//! to in_process and to raw subprocesses, on trivial solids.
//!
//! ```sh
//! cargo bench --bench multiprocess_overhead                 # 1,000 steps per shape
//! SF_BENCH_STEPS=200 cargo bench --bench multiprocess_overhead
//! SF_BENCH_ONLY=in_server,raw cargo bench --bench multiprocess_overhead   # rows whose label contains one of these
//! SF_BENCH_SHAPES=chain cargo bench --bench multiprocess_overhead         # chain, fan-out
//! SF_BENCH_DIR=/dev/shm cargo bench --bench multiprocess_overhead          # where run homes go
//! SF_BENCH_CONFIGURED=1 cargo bench --bench multiprocess_overhead          # every solid configured
//! ```
//!
//! Shapes: a chain (each step adds one to its input) and a fan-out (one source, N
//! leaves). Every configuration runs in this process through `execute_pipeline_with`;
//! multiprocess step processes are this very binary in step mode (`<bench> step`), as
//! with any pipeline binary.
//!
//! The multiprocess time per step is split from the run's own events:
//! - **spawn**: `Command::spawn` in the parent (fork + exec), from the `spawn_us` of the
//!   executor's launch `ENGINE_EVENT`;
//! - **startup**: launch event → the child's `STEP_START`: process start, reading the
//!   invocation, building the repository, validating run config, compiling the plan and
//!   opening storage (the `setup` column estimates the last three, measured in-process);
//! - **in step**: `STEP_START` → `STEP_SUCCESS` in the child: reading the input from and
//!   writing the output to filesystem storage (compute is trivial) plus event output;
//! - **exit + bookkeeping** (chain only, where steps are sequential): the rest of the
//!   wall time per step: process exit, reaping, event forwarding and scheduling.
//!
//! With `isolation: warm` "spawn" is the request to the step server until its `started`
//! reply (the fork), and "startup" no longer contains exec or the repository build;
//! `isolation: in_server` is the same without the fork (the server runs the step).
//!
//! The raw baselines, in the same run, spawned and waited for with
//! `std::process::Command`, one after another (chain) or two at a time (fan-out):
//! - N subprocesses of `/bin/true`: what a process per step costs with nothing else;
//! - N execs of this very binary with the hidden argument `exit` (it exits before
//!   anything of solidflow runs): what starting the pipeline binary costs, the floor of
//!   `isolation: process` (exec, dynamic loading and relocation of a large PIE binary,
//!   the C and Rust runtimes' start, exit).
//!
//! The run homes (storage, logs, run history) are temporary directories under
//! `SF_BENCH_DIR` (default: the system temp dir, `TMPDIR` or `/tmp`).
//!
//! **Where the homes are matters.** Filesystem storage creates a directory and a file
//! per step (and the process launchers a log file when a step writes to stderr). On an
//! ext4 without a journal (the benchmark VM of docs/benchmarks.md) creating an inode
//! while many inodes were deleted recently costs 170–800 µs (the kernel's
//! `find_inode_bit` → `recently_deleted` scans the inode table; this bench deletes a
//! run's home, thousands of inodes, before the next run), 25–60 µs otherwise, so a
//! filesystem step pays up to 0.6–1.6 ms there whatever the executor; on tmpfs
//! (`SF_BENCH_DIR=/dev/shm`) an inode costs about 8 µs. Compare executors on the same
//! directory, and give both numbers.

#[path = "shapes/mod.rs"]
mod shapes;

use shapes::{chain, fan_out};
use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use solidflow::config::{ConfigSources, RunConfig};
use solidflow::definition::pipeline::Pipeline;
use solidflow::definition::repository::Repository;
use solidflow::execution::event::{Event, EventKind};
use solidflow::execution::run::{RunOptions, execute_pipeline_with};
use solidflow::plan::ExecutionPlan;

fn steps() -> usize {
    std::env::var("SF_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000)
}

/// Whether a row or shape is wanted: `var` unset, or one of its comma-separated words
/// is part of `label`.
fn wanted(var: &str, label: &str) -> bool {
    std::env::var(var).map_or(true, |only| {
        only.split(',')
            .any(|w| !w.is_empty() && label.contains(w.trim()))
    })
}

fn repository() -> Repository {
    let n = steps();
    Repository::new("multiprocess_overhead")
        // Lazy: a step process builds only the pipeline it runs.
        .with_lazy_pipeline("chain", move || chain(n))
        .with_lazy_pipeline("fan_out", move || fan_out(n))
}

fn us(d: f64) -> String {
    if d >= 1000.0 {
        format!("{:.2} ms", d / 1000.0)
    } else {
        format!("{d:.0} µs")
    }
}

fn between(a: &Event, b: &Event) -> f64 {
    (b.timestamp - a.timestamp).num_microseconds().unwrap_or(0) as f64
}

/// Mean per-step components of a multiprocess run, in µs: (spawn, startup, in step).
fn split(events: &[Event]) -> (f64, f64, f64) {
    let parent = events.first().map(|e| e.pid).unwrap_or(0);
    let mut launch: HashMap<&str, (&Event, f64)> = HashMap::new();
    let mut start: HashMap<&str, &Event> = HashMap::new();
    let (mut spawn, mut startup, mut in_step, mut n) = (0.0, 0.0, 0.0, 0.0);
    for e in events {
        let Some(key) = e.step_key.as_deref() else {
            continue;
        };
        match &e.kind {
            EventKind::EngineEvent { details } if details.get("spawn_us").is_some() => {
                launch.insert(key, (e, details["spawn_us"].as_f64().unwrap_or(0.0)));
            }
            EventKind::StepStart { .. } if e.pid != parent => {
                start.insert(key, e);
            }
            EventKind::StepSuccess { .. } => {
                if let (Some((l, s)), Some(st)) = (launch.get(key), start.get(key)) {
                    spawn += s;
                    startup += between(l, st);
                    in_step += between(st, e);
                    n += 1.0;
                }
            }
            _ => {}
        }
    }
    (spawn / n, startup / n, in_step / n)
}

/// `config`, with every solid of `pipeline` configured (a retry policy) when
/// `SF_BENCH_CONFIGURED` is set: a run config as large as the pipeline.
fn configured(pipeline: &Pipeline, config: &Value) -> Value {
    let mut config = config.clone();
    if std::env::var_os("SF_BENCH_CONFIGURED").is_some() {
        let solids: serde_json::Map<String, Value> = pipeline
            .invocations()
            .iter()
            .map(|inv| (inv.alias.clone(), json!({"retry": {"max_retries": 0}})))
            .collect();
        config["solids"] = solids.into();
    }
    config
}

/// What a step process does before its step starts: build the binary's repository, take
/// over the parent's validated config and plan its one step. Returns
/// `(total, repository build)` in µs.
fn child_setup(pipeline: &str, config: &Value) -> (f64, f64) {
    let validated = {
        let repo = repository();
        let p = repo.pipeline(pipeline).expect("pipeline");
        RunConfig::validate(p, None, &ConfigSources::from_value(config.clone()))
            .expect("valid config")
            .value
    };
    let t = Instant::now();
    let repo = repository();
    let built = t.elapsed().as_secs_f64() * 1e6;
    let p = repo.pipeline(pipeline).expect("pipeline");
    let c = RunConfig::from_validated(p, "default", validated).expect("validated config");
    let key = &p.invocations()[0].alias;
    let plan = ExecutionPlan::for_step(p, &c, &format!("{key}.compute")).expect("step");
    assert_eq!(plan.steps.len(), 1);
    (t.elapsed().as_secs_f64() * 1e6, built)
}

/// Where the run homes go: `SF_BENCH_DIR`, or the system temp dir.
fn bench_dir() -> std::path::PathBuf {
    std::env::var_os("SF_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into)
}

/// The hidden argument that makes this binary exit at once (the raw exec baseline).
const EXIT_AT_ONCE: &str = "exit";

fn main() {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == EXIT_AT_ONCE)
    {
        std::process::exit(0);
    }
    if matches!(
        std::env::args().nth(1).as_deref(),
        Some("step" | "step-server")
    ) {
        std::process::exit(solidflow::cli::run(&repository(), std::env::args_os()));
    }
    let n = steps();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let configs = [
        (
            "in_process, in_memory",
            json!({"storage": {"in_memory": {}}, "execution": {"in_process": {}}}),
        ),
        (
            "in_process, filesystem",
            json!({"storage": {"filesystem": {}}, "execution": {"in_process": {}}}),
        ),
        (
            "multiprocess, filesystem",
            json!({"storage": {"filesystem": {}}, "execution": {"multiprocess": {}}}),
        ),
        (
            "multiprocess warm, filesystem",
            json!({"storage": {"filesystem": {}}, "execution": {"multiprocess": {"config": {"isolation": "warm"}}}}),
        ),
        (
            "multiprocess in_server, filesystem",
            json!({"storage": {"filesystem": {}}, "execution": {"multiprocess": {"config": {"isolation": "in_server"}}}}),
        ),
    ];
    let dir = bench_dir();
    println!(
        "{n} steps per shape, {cores} cores, default max_concurrent (one per core), homes under {}\n",
        dir.display()
    );
    println!(
        "| shape | executor, storage | steps | wall | per step | spawn | startup (setup) | in step | exit + bookkeeping |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (shape, name) in [("chain", "chain"), ("fan-out", "fan_out")] {
        if !wanted("SF_BENCH_SHAPES", shape) {
            continue;
        }
        let parallel = if shape == "chain" { 1 } else { cores.min(2) };
        let this = std::env::current_exe().expect("the bench binary's path");
        let raws = [
            (
                "raw subprocess",
                std::path::Path::new("/bin/true"),
                "`/bin/true`",
                None,
            ),
            (
                "raw exec",
                this.as_path(),
                "this binary, exits at once",
                Some(EXIT_AT_ONCE),
            ),
        ];
        for (label, program, what, arg) in raws {
            if !wanted("SF_BENCH_ONLY", label) {
                continue;
            }
            let t = Instant::now();
            raw_subprocesses(program, arg, n, parallel);
            let raw = t.elapsed();
            println!(
                "| {shape} | {label} ({what}, {parallel} at a time) | {n} | {} | {} | — | — | — | — |",
                fmt(raw),
                us(raw.as_secs_f64() * 1e6 / n as f64)
            );
        }
        let repo = repository();
        let pipeline = repo.pipeline(name).expect("pipeline");
        for (label, config) in &configs {
            if !wanted("SF_BENCH_ONLY", label) {
                continue;
            }
            let home = tempfile::tempdir_in(&dir).expect("temp dir under SF_BENCH_DIR");
            let options = RunOptions {
                home: Some(home.path().to_path_buf()),
                ..Default::default()
            };
            let config = configured(pipeline, config);
            let t = Instant::now();
            let result = execute_pipeline_with(
                pipeline,
                &ConfigSources::from_value(config.clone()),
                options,
            )
            .expect("run starts");
            let wall = t.elapsed();
            assert!(result.success(), "{shape} on {label} failed");
            let steps = result.plan().steps.len();
            let per_step = wall.as_secs_f64() * 1e6 / steps as f64;
            if label.starts_with("multiprocess") {
                let (spawn, startup, in_step) = split(result.events());
                let (setup, repository_build) = child_setup(name, &config);
                let rest = if shape == "chain" {
                    us(per_step - spawn - startup - in_step)
                } else {
                    "—".into()
                };
                println!(
                    "| {shape} | {label} | {steps} | {} | {} | {} | {} ({}; repository {}) | {} | {rest} |",
                    fmt(wall),
                    us(per_step),
                    us(spawn),
                    us(startup),
                    us(setup),
                    us(repository_build),
                    us(in_step)
                );
            } else {
                println!(
                    "| {shape} | {label} | {steps} | {} | {} | — | — | — | — |",
                    fmt(wall),
                    us(per_step)
                );
            }
        }
    }
}

/// Runs `program` (with `arg`, if any) `n` times, `parallel` at a time, waiting for each.
fn raw_subprocesses(program: &std::path::Path, arg: Option<&str>, n: usize, parallel: usize) {
    std::thread::scope(|scope| {
        for worker in 0..parallel {
            scope.spawn(move || {
                for _ in (worker..n).step_by(parallel) {
                    let status = std::process::Command::new(program)
                        .args(arg)
                        .status()
                        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
                    assert!(status.success(), "{} failed", program.display());
                }
            });
        }
    });
}

fn fmt(d: Duration) -> String {
    if d.as_secs_f64() >= 1.0 {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    }
}
