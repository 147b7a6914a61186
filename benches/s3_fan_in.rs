//! A wide fan-in on S3: how long one step takes to read thousands of stored inputs
//! (issue 12: a 2,000-input fan-in reads its inputs in under 3 s on s3s-fs).
//!
//! ```text
//! scripts/s3-server.sh            # once: the s3s-fs test server
//! cargo bench --bench s3_fan_in
//! SF_BENCH_INPUTS=2000 SF_BENCH_READ_CONCURRENCY=1,8,32,64 SF_BENCH_REPS=3 cargo bench --bench s3_fan_in
//! ```
//!
//! It starts one real s3s-fs server on 127.0.0.1 and runs, in process, a pipeline of
//! `SF_BENCH_INPUTS` leaves (each stores one `i64`) gathered by one typed fan-in
//! (`gather(values: Vec<i64>)`), on `storage: {s3: ...}` as users configure it, once per
//! `read_concurrency`. Reported is the `gather` step from its `STEP_START` to its
//! `STEP_SUCCESS` event (reading every input, the solid, writing its one output). Beside
//! it, on the same server and the same objects, raw `object_store` `GET`s of all inputs:
//! one after another, and with the same number in flight. Best of `SF_BENCH_REPS`.

#[path = "../tests/support/s3.rs"]
mod s3_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use serde_json::json;
use solidflow::config::ConfigSources;
use solidflow::execution::event::EventKind;
use solidflow::execution::run::{RunOptions, execute_pipeline_with};
use solidflow::prelude::*;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}: not a number: {v}"))
        })
        .unwrap_or(default)
}

/// One stored value per leaf.
#[solid]
fn leaf(_ctx: &SolidContext) -> i64 {
    1
}

/// Sums every leaf's value: the typed fan-in whose reads are measured.
#[solid]
fn gather(_ctx: &SolidContext, values: Vec<i64>) -> i64 {
    values.iter().sum()
}

/// `n` leaves gathered by one typed fan-in (`Vec<Handle<i64>>`).
fn pipeline(n: usize) -> Pipeline {
    Pipeline::build("s3_fan_in", |p| {
        let leaves: Vec<Handle<i64>> = (0..n)
            .map(|i| p.invoke_as(&format!("leaf_{i}"), leaf, ()))
            .collect();
        p.invoke(gather, (leaves,));
    })
    .expect("valid fan-in")
}

/// Runs the pipeline once; returns the gather step's duration and the run id.
fn run_once(
    pipeline: &Pipeline,
    n: usize,
    endpoint: &str,
    read_concurrency: usize,
) -> (Duration, String) {
    let home = tempfile::tempdir().expect("temp dir");
    let config = json!({
        "storage": {"s3": {"config": {
            "s3_bucket": "fanin",
            "endpoint_url": endpoint,
            "allow_http": true,
            "instance_metadata": false,
            "read_concurrency": read_concurrency,
        }}},
        "execution": {"in_process": {}},
    });
    let result = execute_pipeline_with(
        pipeline,
        &ConfigSources::from_value(config),
        RunOptions {
            home: Some(home.path().to_path_buf()),
            ..Default::default()
        },
    )
    .expect("run starts");
    assert!(
        result.success(),
        "run failed: {:#?}",
        result.events().last()
    );
    assert_eq!(
        result.result::<i64>("gather").expect("gather's sum"),
        n as i64
    );
    let at = |want: fn(&EventKind) -> bool| {
        result
            .step_events("gather.compute")
            .find(|e| want(&e.kind))
            .map(|e| e.timestamp)
            .expect("gather event")
    };
    let start = at(|k| matches!(k, EventKind::StepStart { .. }));
    let end = at(|k| matches!(k, EventKind::StepSuccess { .. }));
    let run_id = result.events()[0].run_id.clone();
    ((end - start).to_std().unwrap_or_default(), run_id)
}

/// Reads every leaf output of `run_id` with `in_flight` GETs at once.
fn raw_reads(
    runtime: &tokio::runtime::Runtime,
    store: &Arc<dyn ObjectStore>,
    run_id: &str,
    in_flight: usize,
) -> Duration {
    runtime.block_on(async {
        let prefix = ObjectPath::from(format!("solidflow/{run_id}"));
        let keys: Vec<ObjectPath> = store
            .list(Some(&prefix))
            .filter_map(|m| async move { m.ok().map(|m| m.location) })
            .filter(|p| std::future::ready(p.as_ref().contains("/leaf")))
            .collect()
            .await;
        assert!(!keys.is_empty(), "no leaf objects under {prefix}");
        let started = Instant::now();
        let bytes: usize = futures_util::stream::iter(keys.iter().cloned())
            .map(|key| {
                let store = store.clone();
                async move {
                    let got = store.get(&key).await.expect("raw GET");
                    got.bytes().await.expect("raw body").len()
                }
            })
            .buffer_unordered(in_flight.max(1))
            .fold(0, |acc, n| async move { acc + n })
            .await;
        assert!(bytes > 0, "the leaf objects are empty");
        started.elapsed()
    })
}

fn main() {
    let inputs: usize = env_or("SF_BENCH_INPUTS", 2000);
    let reps: usize = env_or("SF_BENCH_REPS", 3);
    let levels: Vec<usize> = std::env::var("SF_BENCH_READ_CONCURRENCY")
        .unwrap_or_else(|_| "1,8,32,64".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("SF_BENCH_READ_CONCURRENCY: comma-separated numbers")
        })
        .collect();
    // SAFETY: single-threaded at this point; the S3 storage reads the AWS chain from here.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", s3_support::ACCESS_KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", s3_support::SECRET_KEY);
    }
    let server = s3_support::S3Server::start();
    server.create_bucket("fanin");
    let endpoint = server.endpoint();
    let store: Arc<dyn ObjectStore> = Arc::new(
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name("fanin")
            .with_region("us-east-1")
            .with_endpoint(&endpoint)
            .with_allow_http(true)
            .with_access_key_id(s3_support::ACCESS_KEY)
            .with_secret_access_key(s3_support::SECRET_KEY)
            .build()
            .expect("raw s3 store"),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pipeline = pipeline(inputs);
    println!("s3s-fs at {endpoint}, {inputs} inputs, best of {reps}");
    println!(
        "| read_concurrency | gather step (read {inputs} inputs, sum, write) | per input | raw GETs, same in flight | raw GETs one at a time | step / raw same in flight |"
    );
    println!("|---|---|---|---|---|---|");
    for &level in &levels {
        let mut best: Option<(Duration, String)> = None;
        for _ in 0..reps {
            let run = run_once(&pipeline, inputs, &endpoint, level);
            if best.as_ref().is_none_or(|b| run.0 < b.0) {
                best = Some(run);
            }
        }
        let (step, run_id) = best.unwrap();
        let best_raw = |in_flight: usize| {
            (0..reps)
                .map(|_| raw_reads(&runtime, &store, &run_id, in_flight))
                .min()
                .unwrap()
        };
        let raw_same = best_raw(level);
        let raw_one = best_raw(1);
        println!(
            "| {level} | {:.2} s | {:.2} ms | {:.2} s | {:.2} s | {:.2}× |",
            step.as_secs_f64(),
            step.as_secs_f64() * 1e3 / inputs as f64,
            raw_same.as_secs_f64(),
            raw_one.as_secs_f64(),
            step.as_secs_f64() / raw_same.as_secs_f64()
        );
    }
}
