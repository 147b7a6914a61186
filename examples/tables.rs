//! Pipelines as data teams write them: configured branches gathered by a typed fan-in.
//!
//! ```sh
//! cargo run --release --example tables -- execute fan_in
//! cargo run --release --example tables -- plan fan_in --json     # every upstream of `collect`
//! cargo run --release --example tables -- config-schema fan_in   # the defaults set in code
//! cargo run --release --example tables -- plan partitioned        # the fan-out as a template
//! cargo run --release --example tables -- execute partitioned -c <(echo 'solids: {partitions: {config: {count: 100}}}')
//! ```
//!
//! ```text
//! branch_0 ─┐
//! branch_1 ─┼─> collect (values: Vec<i64>, in branch order)
//!   ...     │
//! branch_9 ─┘
//! ```

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use solidflow::prelude::*;

/// How many branches the `fan_in` pipeline has.
const BRANCHES: i64 = 10;

/// The config of one branch, set per invocation when the pipeline is built.
#[derive(Serialize, Deserialize, JsonSchema)]
pub struct BranchConfig {
    /// Which branch this is.
    index: i64,
    /// Multiplies the index (run config may override it for every branch or one).
    #[serde(default = "default_scale")]
    scale: i64,
}

fn default_scale() -> i64 {
    10
}

/// Computes `index * scale` for its branch.
#[solid(config = BranchConfig)]
fn branch(ctx: &SolidContext) -> Result<i64, SolidError> {
    let config: BranchConfig = ctx.config()?;
    Ok(config.index * config.scale)
}

/// Gathers every branch's value, in branch order.
#[solid]
fn collect(ctx: &SolidContext, values: Vec<i64>) -> Vec<i64> {
    ctx.log().info(format!("collected={values:?}"));
    values
}

/// `BRANCHES` configured branches gathered by one typed fan-in.
fn fan_in() -> Pipeline {
    Pipeline::build("fan_in", |p| {
        let handles: Vec<Handle<i64>> = (0..BRANCHES)
            .map(|index| {
                let config = BranchConfig {
                    index,
                    scale: default_scale(),
                };
                p.invoke_with(&format!("branch_{index}"), branch, config, ())
            })
            .collect();
        p.invoke(collect, (handles,));
    })
    .expect("valid pipeline")
    .with_description("Configured branches gathered by a typed fan-in.")
    .with_executors(default_executors().with(dask_executor()))
}

/// How many partitions `partitioned` splits its rows into, unless configured.
const PARTITIONS: u32 = 8;

/// How many rows one partition holds.
const ROWS_PER_PARTITION: i64 = 4;

/// The config of `partitions`.
#[derive(Serialize, Deserialize, JsonSchema)]
pub struct PartitionsConfig {
    /// How many partitions (items of the fan-out) there are; 0 is allowed.
    #[serde(default = "default_partitions")]
    count: u32,
}

fn default_partitions() -> u32 {
    PARTITIONS
}

/// Splits the rows into partitions: one item per partition, keyed `part_<n>`. How
/// many there are is known only when this runs, so the steps downstream are too.
#[solid(config = PartitionsConfig)]
fn partitions(ctx: &SolidContext) -> Result<DynamicOutput<Vec<i64>>, SolidError> {
    let config: PartitionsConfig = ctx.config()?;
    Ok((0..i64::from(config.count))
        .map(|n| {
            let rows = (0..ROWS_PER_PARTITION)
                .map(|r| n * ROWS_PER_PARTITION + r)
                .collect();
            (format!("part_{n}"), rows)
        })
        .collect())
}

/// The config of `summarize`.
#[derive(Serialize, Deserialize, JsonSchema)]
pub struct SummarizeConfig {
    /// Fail on this partition (to try retries, skips and `reexecute --from-failure`).
    #[serde(default)]
    fail_on: Option<String>,
}

/// Sums the rows of one partition; runs as one step per partition,
/// `summarize[part_<n>].compute`.
#[solid(config = SummarizeConfig)]
fn summarize(ctx: &SolidContext, rows: Vec<i64>) -> Result<i64, SolidError> {
    let config: SummarizeConfig = ctx.config()?;
    if config.fail_on.is_some() && config.fail_on.as_deref() == ctx.mapping_key() {
        return Err(SolidError::new(format!(
            "partition {} is configured to fail",
            ctx.mapping_key().unwrap_or_default()
        )));
    }
    Ok(rows.iter().sum())
}

/// Gathers the partition totals, in partition order.
#[solid]
fn report(ctx: &SolidContext, totals: Vec<i64>) -> i64 {
    ctx.log()
        .info(format!("partitions={} totals={totals:?}", totals.len()));
    totals.iter().sum()
}

/// A dynamic fan-out over partitions: `partitions` decides at run time how many
/// `summarize` steps run; `report` collects their results in partition order.
fn partitioned() -> Pipeline {
    Pipeline::build("partitioned", |p| {
        let parts = p.invoke(partitions, ());
        let totals = p.map(&parts, |p, rows| p.invoke(summarize, (rows,)));
        p.invoke(report, (totals.collect(),));
    })
    .expect("valid pipeline")
    .with_description("A dynamic fan-out over partitions, collected in partition order.")
    .with_executors(default_executors().with(dask_executor()))
}

fn main() {
    Repository::new("tables")
        .with_lazy_pipeline("fan_in", fan_in)
        .with_lazy_pipeline("partitioned", partitioned)
        .main();
}
