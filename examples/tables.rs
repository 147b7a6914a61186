//! Pipelines as data teams write them: configured branches gathered by a typed fan-in, and
//! Arrow tables and numeric vectors passed between steps in formats pandas, polars and
//! numpy read.
//!
//! ```sh
//! cargo run --release --example tables -- execute readings -c examples/config/filesystem.yaml
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
//!
//! readings (Table, streamed) ─┬─> by_sensor (Table: one row per sensor)
//! calibration (Vec<f64>) ─────┘
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use solidflow::arrow::array::{Array, Float64Array, RecordBatch, StringArray, UInt64Array};
use solidflow::arrow::datatypes::{ArrowError, DataType, Field, Schema, SchemaRef};
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

// ---- Arrow tables and raw numeric vectors: the `readings` pipeline ----------------------

/// The size of the `readings` table.
#[derive(Serialize, Deserialize, JsonSchema)]
pub struct ReadingsConfig {
    /// How many record batches `readings` makes.
    #[serde(default = "default_batches")]
    batches: u64,
    /// Rows per batch.
    #[serde(default = "default_rows")]
    rows_per_batch: u64,
}

fn default_batches() -> u64 {
    4
}

fn default_rows() -> u64 {
    1000
}

/// Sensor names; reading `i` comes from sensor `i % 4`.
const SENSORS: [&str; 4] = ["north", "east", "south", "west"];

fn readings_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("sensor", DataType::Utf8, false),
        Field::new("celsius", DataType::Float64, false),
    ]))
}

/// Readings of four sensors as an Arrow table, one batch at a time: storage writes each
/// batch as it is made, so the table never has to fit in memory.
#[solid(config = ReadingsConfig)]
fn readings(ctx: &SolidContext) -> Result<Table, SolidError> {
    let config: ReadingsConfig = ctx.config()?;
    let (schema, rows) = (readings_schema(), config.rows_per_batch);
    let batch = {
        let schema = schema.clone();
        move |b: u64| {
            let ids = b * rows..(b + 1) * rows;
            let sensors =
                StringArray::from_iter_values(ids.clone().map(|i| SENSORS[i as usize % 4]));
            let celsius = Float64Array::from_iter_values(ids.map(|i| (i % 40) as f64 * 0.5));
            RecordBatch::try_new(schema.clone(), vec![Arc::new(sensors), Arc::new(celsius)])
        }
    };
    Ok(Table::from_stream(schema, (0..config.batches).map(batch)))
}

/// One calibration offset per sensor: a `Vec<f64>`, stored as raw little-endian bytes.
#[solid]
fn calibration(_ctx: &SolidContext) -> Vec<f64> {
    vec![0.5, -0.25, 0.0, 1.0]
}

/// Per-sensor count and calibrated mean, read from the readings one batch at a time.
#[solid]
fn by_sensor(
    ctx: &SolidContext,
    readings: Table,
    calibration: Vec<f64>,
) -> Result<Table, SolidError> {
    let mut totals: BTreeMap<&str, (u64, f64)> = BTreeMap::new();
    for batch in readings.batches() {
        let batch = batch?;
        let sensors = column::<StringArray>(&batch, "sensor")?;
        let celsius = column::<Float64Array>(&batch, "celsius")?;
        for (sensor, value) in sensors.iter().zip(celsius.values()) {
            let name = SENSORS
                .iter()
                .position(|s| Some(*s) == sensor)
                .ok_or_else(|| SolidError::new(format!("unknown sensor {sensor:?}")))?;
            let entry = totals.entry(SENSORS[name]).or_default();
            entry.0 += 1;
            entry.1 += value + calibration.get(name).copied().unwrap_or(0.0);
        }
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("sensor", DataType::Utf8, false),
        Field::new("readings", DataType::UInt64, false),
        Field::new("mean_celsius", DataType::Float64, false),
    ]));
    let names = StringArray::from_iter_values(totals.keys().copied());
    let counts = UInt64Array::from_iter_values(totals.values().map(|(n, _)| *n));
    let means = Float64Array::from_iter_values(totals.values().map(|(n, sum)| sum / *n as f64));
    let rows = counts.values().iter().sum::<u64>();
    ctx.log()
        .info(format!("by_sensor rows={rows} sensors={}", names.len()));
    let batch = RecordBatch::try_new(
        schema,
        vec![Arc::new(names), Arc::new(counts), Arc::new(means)],
    )?;
    Ok(Table::from_batch(batch))
}

/// Column `name` of `batch` as an `A`, or an error naming the column.
fn column<'a, A: Array + 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a A, ArrowError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<A>())
        .ok_or_else(|| ArrowError::SchemaError(format!("no column `{name}` of the expected type")))
}

/// An Arrow table and a numeric vector, passed between steps.
fn readings_pipeline() -> Pipeline {
    Pipeline::build("readings", |p| {
        let table = p.invoke(readings, ());
        let offsets = p.invoke(calibration, ());
        p.invoke(by_sensor, (table, offsets));
    })
    .expect("valid pipeline")
    .with_description("Sensor readings as a streamed Arrow table, summarized per sensor.")
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
        .with_lazy_pipeline("readings", readings_pipeline)
        .with_lazy_pipeline("partitioned", partitioned)
        .main();
}
