//! Per-item overhead of a dynamic fan-out against a static fan-out of the same width,
//! both gathered into one list, on the in-process executor, in the same run.
//!
//! ```sh
//! cargo bench --bench dynamic_fan_out
//! ```
//!
//! Static: `root` → `leaf0..leaf{n-1}` (built when the pipeline is) → `gather` (a typed
//! fan-in of `n` handles). Dynamic: `items` returns `n` keyed items → `increment`
//! mapped over them (`increment[i<k>].compute`, added while the run goes) → `gather`
//! (a collect). Trivial solids (`i64 + 1`), `storage: in_memory`; the two shapes are
//! timed alternately, best of 5, end to end (`execute_pipeline`, which includes
//! building nothing but config validation and planning).

use std::time::{Duration, Instant};

use serde_json::json;
use solidflow::prelude::*;

#[solid]
fn root(_ctx: &SolidContext) -> i64 {
    0
}

#[solid]
fn items(_ctx: &SolidContext, count: u64) -> DynamicOutput<i64> {
    (0..count).map(|i| (format!("i{i}"), 0)).collect()
}

#[solid]
fn increment(_ctx: &SolidContext, x: i64) -> i64 {
    x + 1
}

#[solid]
fn gather(_ctx: &SolidContext, values: Vec<i64>) -> i64 {
    values.iter().sum()
}

fn static_fan_out(n: usize) -> Pipeline {
    Pipeline::build("static_fan_out", |p| {
        let r = p.invoke(root, ());
        let leaves: Vec<Handle<i64>> = (0..n)
            .map(|i| p.invoke_as(&format!("leaf{i}"), increment, (r.clone(),)))
            .collect();
        p.invoke(gather, (leaves,));
    })
    .expect("valid static fan-out")
}

fn dynamic_fan_out() -> Pipeline {
    Pipeline::build("dynamic_fan_out", |p| {
        let count = p.config_input();
        let parts = p.invoke(items, (count,));
        let plus = p.map(&parts, |p, x| p.invoke(increment, (x,)));
        p.invoke(gather, (plus.collect(),));
    })
    .expect("valid dynamic fan-out")
}

fn time(pipeline: &Pipeline, config: &serde_json::Value, n: i64) -> Duration {
    let start = Instant::now();
    let result = execute_pipeline(pipeline, config.clone()).expect("runs");
    let elapsed = start.elapsed();
    assert!(result.success());
    assert_eq!(result.result::<i64>("gather").expect("gathered"), n);
    elapsed
}

fn main() {
    let n = 10_000;
    let stat = static_fan_out(n);
    let dynamic = dynamic_fan_out();
    println!("| executor config | shape | items | total | per item | dynamic / static |");
    println!("|---|---|---|---|---|---|");
    for (label, execution) in [
        ("in_process (cores)", json!({})),
        (
            "in_process max_concurrent=1",
            json!({"in_process": {"config": {"max_concurrent": 1}}}),
        ),
    ] {
        let base = json!({"storage": {"in_memory": {}}});
        let mut static_config = base.clone();
        let mut dynamic_config = base.clone();
        dynamic_config["solids"] = json!({"items": {"inputs": {"count": n}}});
        if execution != json!({}) {
            static_config["execution"] = execution.clone();
            dynamic_config["execution"] = execution;
        }
        let (mut best_static, mut best_dynamic) = (Duration::MAX, Duration::MAX);
        for _ in 0..5 {
            best_static = best_static.min(time(&stat, &static_config, n as i64));
            best_dynamic = best_dynamic.min(time(&dynamic, &dynamic_config, n as i64));
        }
        let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        let ratio = best_dynamic.as_secs_f64() / best_static.as_secs_f64();
        for (shape, best) in [("static", best_static), ("dynamic", best_dynamic)] {
            println!(
                "| {label} | {shape} | {n} | {:.1} ms | {:.2} µs | {} |",
                best.as_secs_f64() * 1e3,
                per(best),
                if shape == "dynamic" {
                    format!("{ratio:.2}×")
                } else {
                    String::new()
                }
            );
        }
    }
}
