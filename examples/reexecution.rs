//! Recovering a failed run: a step fails on a config flag, and `reexecute --from-failure`
//! runs only that step and what depends on it, reading the other steps' outputs from the
//! failed run's intermediates. See docs/reexecution.md.
//!
//! ```sh
//! export SOLIDFLOW_HOME=$(mktemp -d)
//! cargo run --example reexecution -- execute recover -c examples/config/reexecution.yaml   # fails in `publish`
//! cargo run --example reexecution -- runs --status failure
//! cargo run --example reexecution -- reexecute <run-id> --from-failure -c examples/config/reexecution-fix.yaml
//! cargo run --example reexecution -- runs                                # the new run names its parent
//! ```
//!
//! ```text
//! load ─┬─> square ─> publish ─┐
//!       └─> count ─────────────┴─> report
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::Deserialize;
use solidflow::prelude::*;

/// How many numbers to load.
#[derive(Deserialize, JsonSchema)]
pub struct LoadConfig {
    /// Load 1..=count.
    #[serde(default = "default_count")]
    count: i64,
}

fn default_count() -> i64 {
    10
}

/// The flag that makes `publish` fail, standing in for a broken destination.
#[derive(Deserialize, JsonSchema)]
pub struct PublishConfig {
    /// Fail instead of publishing.
    #[serde(default)]
    fail: bool,
    /// Wait until this file exists before publishing (so a run can be killed mid-way
    /// and resumed); at most 120 s.
    #[serde(default)]
    wait_for: Option<PathBuf>,
}

/// Loads the numbers (a stand-in for an expensive extract).
#[solid(config = LoadConfig)]
fn load(ctx: &SolidContext) -> Result<Vec<i64>, SolidError> {
    let cfg: LoadConfig = ctx.config()?;
    ctx.log().info(format!("loading {} numbers", cfg.count));
    Ok((1..=cfg.count).collect())
}

/// Squares every number.
#[solid]
fn square(_ctx: &SolidContext, numbers: Vec<i64>) -> Vec<i64> {
    numbers.iter().map(|n| n * n).collect()
}

/// Counts the numbers.
#[solid]
fn count(_ctx: &SolidContext, numbers: Vec<i64>) -> i64 {
    numbers.len() as i64
}

/// Publishes the sum of squares; fails when `fail` is set.
#[solid(config = PublishConfig)]
fn publish(ctx: &SolidContext, squares: Vec<i64>) -> Result<i64, SolidError> {
    let cfg: PublishConfig = ctx.config()?;
    if let Some(path) = &cfg.wait_for {
        ctx.log().info(format!("waiting for {}", path.display()));
        let deadline = Instant::now() + Duration::from_secs(120);
        while !path.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if cfg.fail {
        return Err(SolidError::new(
            "the destination refused the data (solids.publish.config.fail is true)",
        ));
    }
    Ok(squares.iter().sum())
}

/// Reports the published total.
#[solid]
fn report(ctx: &SolidContext, total: i64, count: i64) -> String {
    let line = format!("published total={total} of count={count}");
    ctx.log().info(line.clone());
    line
}

fn recover() -> Pipeline {
    Pipeline::build("recover", |p| {
        let numbers = p.invoke(load, ());
        let squares = p.invoke(square, (numbers.clone(),));
        let n = p.invoke(count, (numbers,));
        let total = p.invoke(publish, (squares,));
        p.invoke(report, (total, n));
    })
    .expect("valid pipeline")
    .with_executors(default_executors().with(dask_executor()))
}

fn main() {
    Repository::new("reexecution")
        .with_pipeline(recover())
        .main();
}
