//! Per-step overhead of the in-process executor on trivial solids.
//!
//! ```sh
//! cargo bench --bench in_process_overhead
//! ```
//!
//! Shapes: a 10,000-step chain and a 10,000-wide fan-out. Each is timed end to end
//! (`execute_pipeline`), and split into config validation, plan compilation and the
//! executor proper, so the table says where the time goes.

#[path = "shapes/mod.rs"]
mod shapes;

use shapes::{chain, fan_out};
use std::time::{Duration, Instant};

use serde_json::json;
use solidflow::config::{ConfigSources, RunConfig};
use solidflow::execution::run::execute_pipeline;
use solidflow::plan::ExecutionPlan;

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        let out = f();
        best = best.min(t.elapsed());
        last = Some(out);
    }
    (best, last.unwrap())
}

fn main() {
    let n = 10_000;
    println!("| shape | executor config | steps | total | per step | validate | plan | execute |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, pipeline) in [("chain", chain(n)), ("fan-out", fan_out(n))] {
        for (label, config) in [
            ("in_process (cores)", json!({"storage": {"in_memory": {}}})),
            (
                "in_process max_concurrent=1",
                json!({"storage": {"in_memory": {}}, "execution": {"in_process": {"config": {"max_concurrent": 1}}}}),
            ),
        ] {
            let sources = ConfigSources::from_value(config.clone());
            let (validate, run_config) = best_of(3, || {
                RunConfig::validate(&pipeline, None, &sources).unwrap()
            });
            let (plan, _) = best_of(3, || ExecutionPlan::compile(&pipeline, &run_config));
            let (total, result) =
                best_of(5, || execute_pipeline(&pipeline, config.clone()).unwrap());
            assert!(result.success());
            let steps = result.plan().steps.len();
            let execute = total.saturating_sub(validate + plan);
            let us = |d: Duration| d.as_secs_f64() * 1e6 / steps as f64;
            println!(
                "| {name} | {label} | {steps} | {:.1} ms | {:.2} µs | {:.2} µs | {:.2} µs | {:.2} µs |",
                total.as_secs_f64() * 1e3,
                us(total),
                us(validate),
                us(plan),
                us(execute),
            );
        }
    }
}
