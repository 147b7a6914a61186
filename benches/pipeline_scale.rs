//! How pipeline size changes the cost of building, validating, planning and running.
//!
//! ```sh
//! cargo bench --bench pipeline_scale                       # 1,000, 10,000, 100,000
//! SF_BENCH_SIZES=1000,10000 cargo bench --bench pipeline_scale
//! SF_BENCH_ONLY=build,run cargo bench --bench pipeline_scale  # tables: build, run, start
//! ```
//!
//! Three tables:
//! - **build**: `Pipeline::build`, run config validation and plan compilation of a
//!   chain, a fan-out and a fan-in (`n` leaves wired into one step with `n` inputs);
//! - **in-process run**: `execute_pipeline_with` with run history (SQLite in a temp
//!   home) and `in_memory` storage, per step, and the heap it allocated per step
//!   (peak live bytes during the run above the bytes live before it);
//! - **step start**: what a step process does before its step runs (build the lazy
//!   pipeline, take over the validated config, plan its one step), for the first and
//!   the last step.

#[path = "shapes/mod.rs"]
mod shapes;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use shapes::{chain, fan_in, fan_out};
use solidflow::config::{ConfigSources, RunConfig};
use solidflow::definition::pipeline::Pipeline;
use solidflow::execution::run::{RunOptions, execute_pipeline_with};
use solidflow::plan::ExecutionPlan;
use solidflow::storage::run_history::RunHistory;

/// Counts live and peak heap bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn sizes() -> Vec<usize> {
    std::env::var("SF_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000, 100_000])
}

/// `SF_BENCH_ONLY=build,run,start` prints only these tables.
fn wanted(table: &str) -> bool {
    std::env::var("SF_BENCH_ONLY").map_or(true, |only| only.split(',').any(|t| t.trim() == table))
}

fn time<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let t = Instant::now();
    let out = f();
    (t.elapsed(), out)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// A named pipeline shape and how to build it at one size.
type Shape = (&'static str, Box<dyn Fn() -> Pipeline>);

fn shapes(n: usize) -> [Shape; 3] {
    [
        ("chain", Box::new(move || chain(n))),
        ("fan-out", Box::new(move || fan_out(n))),
        ("fan-in", Box::new(move || fan_in(n))),
    ]
}

fn config() -> serde_json::Value {
    json!({"storage": {"in_memory": {}}, "execution": {"in_process": {}}})
}

fn main() {
    let sizes = sizes();
    if wanted("build") {
        build_table(&sizes);
    }
    if wanted("run") {
        run_table(&sizes);
    }
    if wanted("start") {
        start_table(&sizes);
    }
}

fn build_table(sizes: &[usize]) {
    println!("## build\n");
    println!("| shape | n | build | validate | plan | total |");
    println!("|---|---|---|---|---|---|");
    for &n in sizes {
        for (shape, make) in shapes(n) {
            let (build, pipeline) = time(make);
            let sources = ConfigSources::from_value(config());
            let (validate, rc) =
                time(|| RunConfig::validate(&pipeline, None, &sources).expect("valid"));
            let (plan, _) = time(|| ExecutionPlan::compile(&pipeline, &rc));
            println!(
                "| {shape} | {n} | {} | {} | {} | {} |",
                ms(build),
                ms(validate),
                ms(plan),
                ms(build + validate + plan)
            );
        }
    }
}

fn run_table(sizes: &[usize]) {
    println!("\n## in-process run, with run history\n");
    println!("| shape | steps | wall | per step | heap per step |");
    println!("|---|---|---|---|---|");
    for &n in sizes {
        for (shape, make) in shapes(n) {
            let pipeline = make();
            let home = tempfile::tempdir().expect("temp dir");
            let history = RunHistory::open(&home.path().join("history.db")).expect("run history");
            let options = RunOptions {
                home: Some(home.path().to_path_buf()),
                history: Some(history),
                ..Default::default()
            };
            let before = LIVE.load(Ordering::Relaxed);
            PEAK.store(before, Ordering::Relaxed);
            let (wall, result) = time(|| {
                execute_pipeline_with(&pipeline, &ConfigSources::from_value(config()), options)
                    .expect("run starts")
            });
            let peak = PEAK.load(Ordering::Relaxed) - before;
            assert!(result.success(), "{shape} {n} failed");
            let steps = result.plan().steps.len();
            println!(
                "| {shape} | {steps} | {} | {:.2} µs | {:.1} KiB |",
                ms(wall),
                wall.as_secs_f64() * 1e6 / steps as f64,
                peak as f64 / 1024.0 / steps as f64
            );
        }
    }
}

fn start_table(sizes: &[usize]) {
    println!("\n## step start (a step process's setup before its step runs)\n");
    println!("| shape | n | first step | last step |");
    println!("|---|---|---|---|");
    for &n in [100].iter().chain(sizes) {
        for (shape, make) in shapes(n) {
            let validated = {
                let p = make();
                RunConfig::validate(&p, None, &ConfigSources::from_value(config()))
                    .expect("valid")
                    .value
            };
            let mut cells = Vec::new();
            for last in [false, true] {
                let (d, _) = time(|| {
                    let p = make();
                    let c = RunConfig::from_validated(&p, "default", validated.clone())
                        .expect("validated");
                    let invs = p.invocations();
                    let inv = if last {
                        &invs[invs.len() - 1]
                    } else {
                        &invs[0]
                    };
                    let key = format!("{}.compute", inv.alias);
                    let plan = ExecutionPlan::for_step(&p, &c, &key).expect("step");
                    assert_eq!(plan.steps.len(), 1);
                });
                cells.push(ms(d));
            }
            println!("| {shape} | {n} | {} | {} |", cells[0], cells[1]);
        }
    }
}
