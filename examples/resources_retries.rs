//! Resources and retries on the `multiprocess` executor: a nightly model refresh where
//! two solids share one GPU and the download from a flaky mirror is retried.
//!
//! ```sh
//! cargo run --example resources_retries -- execute model_refresh -c examples/config/multiprocess.yaml
//! cargo run --example resources_retries -- plan model_refresh -c examples/config/multiprocess.yaml
//! # the same with warm step servers (steps forked from a server, not started anew):
//! cargo run --example resources_retries -- execute model_refresh \
//!     -c examples/config/multiprocess.yaml -c examples/config/multiprocess_warm.yaml
//! cargo run --example resources_retries -- logs <run id>     # every event, incl. retries
//! ```
//!
//! ```text
//! fetch_features (flaky, retried) ─┬─> train_model (GPU=1) ─┬─> publish
//!                                  └─> score_backlog (GPU=1) ┘
//! ```
//!
//! `train_model` and `score_backlog` do not depend on each other, but both need the one
//! GPU declared in `execution.multiprocess.config.resources`, so they run one after the
//! other while anything else may run beside them. `fetch_features` fails its first
//! `flaky_attempts` attempts with a transient error; its retry policy
//! (`#[solid(retry(...))]`) tries again after a growing, jittered delay. Run config may
//! override any solid's policy: `solids: {fetch_features: {retry: {max_retries: 5}}}`.
//!
//! Each step runs in its own process of this binary (`resources_retries step`); its
//! stderr is kept in `$SOLIDFLOW_HOME/logs/<run id>/<step key>.log`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use solidflow::prelude::*;

/// Where features come from, and how unreliable the mirror is.
#[derive(Deserialize, JsonSchema)]
pub struct FetchConfig {
    /// Number of feature rows to fetch.
    rows: usize,
    /// How many attempts fail with a transient error before the mirror answers.
    #[serde(default)]
    flaky_attempts: u32,
}

/// One training example.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    x: f64,
    y: f64,
}

/// A fitted linear model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Model {
    slope: f64,
    intercept: f64,
}

/// Downloads features from a mirror that sometimes times out.
#[solid(config = FetchConfig, retry(max_retries = 3, delay = 0.2, backoff = 2.0, jitter = 0.1))]
fn fetch_features(ctx: &SolidContext) -> Result<Vec<Row>, SolidError> {
    let cfg: FetchConfig = ctx.config()?;
    if ctx.attempt() <= cfg.flaky_attempts {
        return Err(
            SolidError::new(format!("mirror timed out on attempt {}", ctx.attempt()))
                .caused_by("connection reset by peer (simulated)"),
        );
    }
    let rows: Vec<Row> = (0..cfg.rows)
        .map(|i| {
            let x = i as f64 / cfg.rows as f64;
            Row {
                x,
                y: 3.0 * x + 0.5 + ((i * 7919) % 13) as f64 / 100.0,
            }
        })
        .collect();
    ctx.log().info(format!(
        "fetched {} rows on attempt {}",
        rows.len(),
        ctx.attempt()
    ));
    Ok(rows)
}

/// Fits a least-squares line; needs the GPU (pretend).
#[solid(resources(GPU = 1))]
fn train_model(ctx: &SolidContext, rows: &Vec<Row>) -> Model {
    let n = rows.len() as f64;
    let (sx, sy) = rows.iter().fold((0.0, 0.0), |(a, b), r| (a + r.x, b + r.y));
    let (mx, my) = (sx / n, sy / n);
    let cov: f64 = rows.iter().map(|r| (r.x - mx) * (r.y - my)).sum();
    let var: f64 = rows.iter().map(|r| (r.x - mx).powi(2)).sum();
    let slope = cov / var;
    let model = Model {
        slope,
        intercept: my - slope * mx,
    };
    ctx.log().info(format!(
        "trained on GPU in pid {}: {model:?}",
        std::process::id()
    ));
    model
}

/// Scores the backlog with last night's model; also needs the GPU.
#[solid(resources(GPU = 1))]
fn score_backlog(ctx: &SolidContext, rows: &Vec<Row>) -> f64 {
    let score = rows.iter().map(|r| r.y).sum::<f64>() / rows.len() as f64;
    ctx.log().info(format!(
        "scored {} rows on GPU in pid {}",
        rows.len(),
        std::process::id()
    ));
    score
}

/// Publishes the new model and the backlog score.
#[solid]
fn publish(ctx: &SolidContext, model: Model, backlog_score: f64) -> String {
    let summary = format!(
        "model y = {:.3}x + {:.3}; backlog score {backlog_score:.3}",
        model.slope, model.intercept
    );
    ctx.materialize(
        "model",
        "Nightly linear model",
        serde_json::json!({"slope": model.slope, "intercept": model.intercept}),
    );
    ctx.log().info(summary.clone());
    summary
}

/// The nightly refresh.
pub fn model_refresh() -> Pipeline {
    Pipeline::build("model_refresh", |p| {
        let rows = p.invoke(fetch_features, ());
        let model = p.invoke(train_model, (rows.clone(),));
        let score = p.invoke(score_backlog, (rows,));
        p.invoke(publish, (model, score));
    })
    .expect("valid pipeline")
    .with_description("Fetch features (retried), train and score on one GPU, publish")
}

fn main() {
    Repository::new("resources_retries")
        .with_pipeline(model_refresh())
        .main();
}
