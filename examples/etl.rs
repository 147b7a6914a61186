//! A small but realistic ETL pipeline: config, fan-out/fan-in, a solid with two outputs,
//! and a materialization.
//!
//! ```sh
//! cargo run --release --example etl -- execute etl -c examples/config/etl.yaml
//! cargo run --release --example etl -- plan etl -c examples/config/etl.yaml
//! cargo run --release --example etl -- config-schema etl
//! ```
//!
//! ```text
//!                    ┌─> valid ──┬─> revenue_by_region ─┐
//! extract_orders ─> validate     └─> top_customers ─────┴─> write_report
//!                    └─> rejected ─────────────────────────┘
//! ```

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use solidflow::prelude::*;

/// One order line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    id: u64,
    customer: String,
    region: String,
    amount: f64,
}

/// How many synthetic orders to generate.
#[derive(Deserialize, JsonSchema)]
pub struct ExtractConfig {
    /// Number of orders to generate.
    orders: u64,
    /// Seed for the synthetic data.
    #[serde(default)]
    seed: u64,
}

/// Validation rules.
#[derive(Deserialize, JsonSchema)]
pub struct ValidateConfig {
    /// Orders above this amount are rejected as suspicious.
    #[serde(default = "default_max_amount")]
    max_amount: f64,
}

fn default_max_amount() -> f64 {
    10_000.0
}

/// Where to write the report.
#[derive(Deserialize, JsonSchema)]
pub struct ReportConfig {
    /// Output file (JSON).
    path: String,
}

/// Generates synthetic orders (a stand-in for reading a database).
#[solid(config = ExtractConfig, tags(kind = "source"))]
fn extract_orders(ctx: &SolidContext) -> Result<Vec<Order>, SolidError> {
    let cfg: ExtractConfig = ctx.config()?;
    let regions = ["emea", "amer", "apac"];
    let mut state = cfg
        .seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let orders: Vec<Order> = (0..cfg.orders)
        .map(|id| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            Order {
                id,
                customer: format!("customer-{}", (state >> 33) % 50),
                region: regions[((state >> 20) % 3) as usize].to_string(),
                amount: ((state >> 40) % 12_000) as f64 + 0.99,
            }
        })
        .collect();
    ctx.log().info(format!("extracted {} orders", orders.len()));
    Ok(orders)
}

/// Splits orders into valid and rejected ones.
#[solid(config = ValidateConfig, outputs(valid: Vec<Order>, rejected: Vec<Order>))]
fn validate(
    ctx: &SolidContext,
    orders: Vec<Order>,
) -> Result<(Vec<Order>, Vec<Order>), SolidError> {
    let cfg: ValidateConfig = ctx.config()?;
    let (valid, rejected): (Vec<Order>, Vec<Order>) =
        orders.into_iter().partition(|o| o.amount <= cfg.max_amount);
    if !rejected.is_empty() {
        ctx.log().warning(format!(
            "rejected {} orders above {}",
            rejected.len(),
            cfg.max_amount
        ));
    }
    Ok((valid, rejected))
}

/// Total revenue per region.
#[solid]
fn revenue_by_region(_ctx: &SolidContext, orders: &Vec<Order>) -> BTreeMap<String, f64> {
    let mut totals = BTreeMap::new();
    for o in orders {
        *totals.entry(o.region.clone()).or_insert(0.0) += o.amount;
    }
    totals
}

/// The five customers with the most revenue.
#[solid]
fn top_customers(_ctx: &SolidContext, orders: &Vec<Order>) -> Vec<(String, f64)> {
    let mut totals: BTreeMap<String, f64> = BTreeMap::new();
    for o in orders {
        *totals.entry(o.customer.clone()).or_insert(0.0) += o.amount;
    }
    let mut ranked: Vec<(String, f64)> = totals.into_iter().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(5);
    ranked
}

/// Writes the report and records it as a materialization.
#[solid(config = ReportConfig)]
fn write_report(
    ctx: &SolidContext,
    revenue: BTreeMap<String, f64>,
    top: Vec<(String, f64)>,
    rejected: Vec<Order>,
) -> Result<String, SolidError> {
    let cfg: ReportConfig = ctx.config()?;
    let report = serde_json::json!({
        "run_id": ctx.run_id(),
        "revenue_by_region": revenue,
        "top_customers": top,
        "rejected_orders": rejected.len(),
    });
    if let Some(dir) = std::path::Path::new(&cfg.path).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&cfg.path, serde_json::to_vec_pretty(&report)?)?;
    ctx.materialize(
        "orders_report",
        "Revenue by region and top customers",
        serde_json::json!({"path": cfg.path, "regions": revenue.len(), "rejected": rejected.len()}),
    );
    Ok(cfg.path)
}

/// The ETL pipeline.
pub fn etl_pipeline() -> Pipeline {
    Pipeline::build("etl", |p| {
        let orders = p.invoke(extract_orders, ());
        let checked = p.invoke(validate, (orders,));
        let revenue = p.invoke(revenue_by_region, (checked.valid.clone(),));
        let top = p.invoke(top_customers, (checked.valid,));
        p.invoke(write_report, (revenue, top, checked.rejected));
    })
    .expect("valid pipeline")
    .with_description("Orders to a revenue report")
}

fn main() {
    Repository::new("etl").with_pipeline(etl_pipeline()).main();
}
