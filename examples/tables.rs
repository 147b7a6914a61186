//! Pipelines as data teams write them: configured branches gathered by a typed fan-in.
//!
//! ```sh
//! cargo run --release --example tables -- execute fan_in
//! cargo run --release --example tables -- plan fan_in --json     # every upstream of `collect`
//! cargo run --release --example tables -- config-schema fan_in   # the defaults set in code
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

fn main() {
    Repository::new("tables")
        .with_lazy_pipeline("fan_in", fan_in)
        .main();
}
