//! Pipelines of every shape the Dask executor is tested and benchmarked with.
//!
//! ```sh
//! scripts/python-env.sh                       # the venv with dask + distributed
//! export SOLIDFLOW_PYTHON=$PWD/.venv/bin/python
//! cargo run --release --example dask_pipelines -- execute diamond -c examples/config/dask.yaml
//! cargo run --release --example dask_pipelines -- list
//! ```
//!
//! | pipeline | shape |
//! |---|---|
//! | `diamond` | `source` → `left`, `right` → `join` |
//! | `fan_out_100` | `source` → 100 × `double` → `gather` |
//! | `fan_200` | `source` → 200 × `double` → `gather` (benchmark) |
//! | `chain_100` | 100 × `increment`, one after another (benchmark) |
//! | `big_intermediate` | `make_blob` (100 MB) → 4 × `blob_len` (benchmark) |
//! | `gpu` | `train` needs `GPU = 1`; `preprocess` needs nothing |
//! | `tpu` | `needs_tpu` needs `TPU = 1` (no worker has one) |
//! | `live_logs` | `chatty` logs, waits, logs again |
//! | `fail_skip` | `source` → `boom` (fails) → `after_boom` (skipped); `source` → `fine` |
//! | `slow` | `sleepy` sleeps `seconds` (config), logging every 100 ms |
//! | `slow_chain` | `sleepy` → `after_sleepy` |
//! | `flaky_chain` | `flaky_once` (fails its first attempt after 0.5 s, one retry) → `after_flaky` |
//!
//! All run with `default_executors() + dask_executor()`.

use schemars::JsonSchema;
use serde::Deserialize;
use solidflow::definition::types::TypeInfo;
use solidflow::prelude::*;

/// A number to start from.
#[solid]
fn source(_ctx: &SolidContext) -> u64 {
    1
}

/// Adds one.
#[solid]
fn increment(_ctx: &SolidContext, x: u64) -> u64 {
    x + 1
}

/// Doubles.
#[solid]
fn double(_ctx: &SolidContext, x: u64) -> u64 {
    x * 2
}

/// Adds ten.
#[solid]
fn add_ten(_ctx: &SolidContext, x: u64) -> u64 {
    x + 10
}

/// Sums two numbers.
#[solid]
fn join(_ctx: &SolidContext, a: u64, b: u64) -> u64 {
    a + b
}

/// Makes a 100 MB intermediate.
#[solid]
fn make_blob(_ctx: &SolidContext) -> Vec<u8> {
    vec![7u8; 100 * 1024 * 1024]
}

/// Reads the blob.
#[solid]
fn blob_len(_ctx: &SolidContext, blob: &Vec<u8>) -> u64 {
    blob.len() as u64
}

/// Pretends to train on a GPU; reports where it ran.
#[solid(resources(GPU = 1))]
fn train(ctx: &SolidContext) -> String {
    ctx.log().info("training on the GPU");
    "trained".to_string()
}

/// Needs no special resources.
#[solid]
fn preprocess(_ctx: &SolidContext) -> String {
    "preprocessed".to_string()
}

/// Needs a resource no worker has.
#[solid(resources(TPU = 1))]
fn needs_tpu(_ctx: &SolidContext) -> String {
    "never".to_string()
}

/// How long `chatty` and `sleepy` wait.
#[derive(Deserialize, JsonSchema)]
pub struct SleepConfig {
    /// Seconds.
    #[serde(default = "one")]
    seconds: f64,
}

fn one() -> f64 {
    1.0
}

/// Logs, waits, logs again.
#[solid(config = SleepConfig)]
fn chatty(ctx: &SolidContext) -> Result<String, SolidError> {
    let cfg: SleepConfig = ctx.config()?;
    ctx.log().info("first line");
    std::thread::sleep(std::time::Duration::from_secs_f64(cfg.seconds));
    ctx.log().info("second line");
    Ok("done".to_string())
}

/// Sleeps, logging every 100 ms.
#[solid(config = SleepConfig)]
fn sleepy(ctx: &SolidContext) -> Result<u64, SolidError> {
    let cfg: SleepConfig = ctx.config()?;
    let started = std::time::Instant::now();
    let mut ticks = 0;
    ctx.log().info(format!(
        "sleeping {} s in pid {}",
        cfg.seconds,
        std::process::id()
    ));
    while started.elapsed().as_secs_f64() < cfg.seconds {
        std::thread::sleep(std::time::Duration::from_millis(100));
        ticks += 1;
        if ticks % 10 == 0 {
            ctx.log().info(format!("still sleeping ({ticks} ticks)"));
        }
    }
    Ok(ticks)
}

/// Always fails.
#[solid]
fn boom(_ctx: &SolidContext, _x: u64) -> Result<u64, SolidError> {
    Err(SolidError::new("boom: this step always fails"))
}

/// Fails its first attempt after half a second; its retry succeeds.
#[solid(retry(max_retries = 1))]
fn flaky_once(ctx: &SolidContext) -> Result<u64, SolidError> {
    std::thread::sleep(std::time::Duration::from_millis(500));
    if ctx.attempt() == 1 {
        return Err(SolidError::new("flaky_once: the first attempt fails"));
    }
    Ok(1)
}

fn mode(p: Pipeline) -> Pipeline {
    p.with_executors(default_executors().with(dask_executor()))
}

/// A solid with `n` u64 inputs `x0..x{n-1}` whose result is their sum.
fn gather(n: usize) -> SolidDefinition {
    let mut def = SolidDefinition::new("gather", move |_ctx, mut inputs| {
        let mut sum = 0u64;
        for i in 0..n {
            sum += inputs.take::<u64>(&format!("x{i}"))?;
        }
        Ok(Outputs::result(sum))
    })
    .description("Sums its inputs.")
    .output("result", TypeInfo::of::<u64>());
    for i in 0..n {
        def = def.input(format!("x{i}"), TypeInfo::of::<u64>());
    }
    def
}

/// `source` → `width` × `double` → `gather`.
pub fn fan(name: &str, width: usize) -> Pipeline {
    mode(
        Pipeline::build(name, |p| {
            let s = p.invoke(source, ());
            let mut inputs = Vec::new();
            for i in 0..width {
                p.invoke_as(&format!("double_{i}"), double, (s.clone(),));
                inputs.push((format!("x{i}"), p.result(&format!("double_{i}"))));
            }
            p.add("gather", gather(width), inputs);
        })
        .expect("valid pipeline"),
    )
}

/// `length` × `increment`, one after another.
pub fn chain(name: &str, length: usize) -> Pipeline {
    mode(
        Pipeline::build(name, |p| {
            let mut h = p.invoke(source, ());
            for i in 0..length.saturating_sub(1) {
                h = p.invoke_as(&format!("increment_{i}"), increment, (h,));
            }
        })
        .expect("valid pipeline"),
    )
}

/// Every pipeline of this example.
pub fn repository() -> Repository {
    let diamond = Pipeline::build("diamond", |p| {
        let s = p.invoke(source, ());
        let l = p.invoke(double, (s.clone(),));
        let r = p.invoke(add_ten, (s,));
        p.invoke(join, (l, r));
    })
    .expect("valid pipeline");
    let big = Pipeline::build("big_intermediate", |p| {
        let blob = p.invoke(make_blob, ());
        for i in 0..4 {
            p.invoke_as(&format!("blob_len_{i}"), blob_len, (blob.clone(),));
        }
    })
    .expect("valid pipeline");
    let gpu = Pipeline::build("gpu", |p| {
        p.invoke(preprocess, ());
        p.invoke(train, ());
    })
    .expect("valid pipeline");
    let tpu = Pipeline::build("tpu", |p| {
        p.invoke(needs_tpu, ());
    })
    .expect("valid pipeline");
    let live = Pipeline::build("live_logs", |p| {
        p.invoke(chatty, ());
    })
    .expect("valid pipeline");
    let fail = Pipeline::build("fail_skip", |p| {
        let s = p.invoke(source, ());
        let b = p.invoke(boom, (s.clone(),));
        p.invoke_as("after_boom", double, (b,));
        p.invoke_as("fine", double, (s,));
    })
    .expect("valid pipeline");
    let slow = Pipeline::build("slow", |p| {
        p.invoke(sleepy, ());
    })
    .expect("valid pipeline");
    let slow_chain = Pipeline::build("slow_chain", |p| {
        let s = p.invoke(sleepy, ());
        p.invoke_as("after_sleepy", double, (s,));
    })
    .expect("valid pipeline");
    let flaky_chain = Pipeline::build("flaky_chain", |p| {
        let f = p.invoke(flaky_once, ());
        p.invoke_as("after_flaky", double, (f,));
    })
    .expect("valid pipeline");
    Repository::new("dask_pipelines")
        .with_pipeline(mode(diamond))
        .with_pipeline(fan("fan_out_100", 100))
        .with_pipeline(fan("fan_200", 200))
        .with_pipeline(chain("chain_100", 100))
        .with_pipeline(mode(big))
        .with_pipeline(mode(gpu))
        .with_pipeline(mode(tpu))
        .with_pipeline(mode(live))
        .with_pipeline(mode(fail))
        .with_pipeline(mode(slow))
        .with_pipeline(mode(slow_chain))
        .with_pipeline(mode(flaky_chain))
}

fn main() {
    repository().main();
}
