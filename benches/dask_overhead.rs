//! Dask executor overhead: solidflow on Dask against raw Dask futures, same shapes, same
//! already-running cluster.
//!
//! ```text
//! scripts/python-env.sh          # once: the venv with dask + distributed
//! cargo bench --bench dask_overhead
//! SOLIDFLOW_BENCH_REPS=5 cargo bench --bench dask_overhead
//! SOLIDFLOW_BENCH_ONLY=chain,fan cargo bench --bench dask_overhead   # parts: chain,fan,big,vec,critical,first
//! SOLIDFLOW_BENCH_ONLY=vec cargo bench --bench dask_overhead          # the codec before/after (issue 13)
//! SOLIDFLOW_BENCH_ONLY=scale SOLIDFLOW_BENCH_REPS=1 cargo bench --bench dask_overhead  # per step with size
//! SOLIDFLOW_BENCH_ONLY=scale SOLIDFLOW_BENCH_SCALE=fan:200,fan:2000 SOLIDFLOW_BENCH_ISOLATION=warm \
//!     cargo bench --bench dask_overhead
//! SOLIDFLOW_BENCH_CONFIGURED=1 ...   # every solid of the solidflow runs configured (a retry policy)
//! ```
//!
//! It starts one real cluster (`dask scheduler` + 2 × `dask worker --nthreads 1` on
//! 127.0.0.1, via the test helper) and runs, in the same process, best of
//! `SOLIDFLOW_BENCH_REPS` (default 3) each:
//!
//! - **solidflow**: `execute_pipeline` with `execution: {dask: {config: {address: ...}}}`
//!   and filesystem storage, once with `isolation: process` (a `<binary> step` process
//!   per task) and once with `isolation: warm` (the workers' step servers fork each
//!   step; the servers stay on the workers between runs, so best-of-N is warm), and once
//!   with `isolation: in_server` (those servers run each step themselves, no fork). The
//!   bench binary is its own pipeline binary: the workers
//!   run `<this binary> step`. Reported are the whole run (bridge start and connect
//!   included) and the part after connecting (from the executor's "connected" event to
//!   the end), which is what scales with the number of steps.
//! - **raw (a)**: Dask futures of no-op Python functions, submitted at once with their
//!   upstream futures as arguments.
//! - **raw (b)**: the same, but each task runs one subprocess of a tiny binary
//!   (`/bin/true`; for the big intermediate the producer writes 100 MB to a file with
//!   `head -c` and the consumers read it with `wc -c`).
//!
//! Shapes: a 100-step chain, a 200-wide fan-out/fan-in (202 steps), one 100 MB
//! intermediate consumed by 4 steps (5 steps), `vec`: a 100 MB `Vec<f64>` consumed by 4
//! steps, stored as MessagePack (`vec_before`: a `#[serde(transparent)]` newtype, which
//! is how every `Vec<f64>` was stored before per-type codecs) and with its own raw codec
//! (`vec_after`), on Dask and in process with filesystem storage, and `critical` (20 × 0.2 s leaves next to
//! an 8-step chain of 0.2 s steps) with and without `critical_path_priority`. Finally
//! time-to-first-step with `execution: {dask: {}}` (a local cluster started for the
//! run).
//!
//! `scale` (not in the default parts) runs a chain and a fan-out/fan-in at every size of
//! `SOLIDFLOW_BENCH_SCALE` (default `chain:100,chain:1000,chain:10000,fan:200,fan:2000,fan:10000`;
//! `chain:n` is `n` steps, `fan:n` is `n` leaves between a source and a gather, `n + 2`
//! steps), with solidflow in each isolation of `SOLIDFLOW_BENCH_ISOLATION` (default
//! `warm,process`) and raw (a)/(b) of the same shapes and sizes, and prints the cost per
//! step after connecting and its ratio to the smallest size of the same shape. The
//! pipelines are lazy, so a step process builds only the one it runs.

#[path = "../tests/support/dask.rs"]
mod dask_support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use solidflow::config::ConfigSources;
use solidflow::definition::types::TypeInfo;
use solidflow::execution::sink::EventListener;
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

/// 100 MB of `f64`s.
fn series_values() -> Vec<f64> {
    (0..12_500_000).map(|i| i as f64 * 0.5).collect()
}

/// A `Vec<f64>` stored as MessagePack, the codec every type had before issue 13.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
struct Msgpack(Vec<f64>);

/// Makes a 100 MB `Vec<f64>` (raw codec).
#[solid]
fn make_series(_ctx: &SolidContext) -> Vec<f64> {
    series_values()
}

/// Sums the series.
#[solid]
fn series_sum(_ctx: &SolidContext, series: &Vec<f64>) -> f64 {
    series.iter().sum()
}

/// Makes the same series, stored as MessagePack.
#[solid]
fn make_msgpack(_ctx: &SolidContext) -> Msgpack {
    Msgpack(series_values())
}

/// Sums the MessagePack series.
#[solid]
fn msgpack_sum(_ctx: &SolidContext, series: &Msgpack) -> f64 {
    series.0.iter().sum()
}

/// Sleeps 0.2 s.
#[solid]
fn nap(_ctx: &SolidContext, x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(200));
    x + 1
}

fn mode(p: Pipeline) -> Pipeline {
    p.with_executors(default_executors().with(dask_executor()))
}

fn gather(n: usize) -> SolidDefinition {
    let mut def = SolidDefinition::new("gather", move |_ctx, mut inputs| {
        let mut sum = 0u64;
        for i in 0..n {
            sum += inputs.take::<u64>(&format!("x{i}"))?;
        }
        Ok(Outputs::result(sum))
    })
    .output("result", TypeInfo::of::<u64>());
    for i in 0..n {
        def = def.input(format!("x{i}"), TypeInfo::of::<u64>());
    }
    def
}

fn repository() -> Repository {
    let chain = Pipeline::build("chain", |p| {
        let mut h = p.invoke(source, ());
        for i in 0..99 {
            h = p.invoke_as(&format!("increment_{i}"), increment, (h,));
        }
    })
    .unwrap();
    let fan = Pipeline::build("fan", |p| {
        let s = p.invoke(source, ());
        let mut inputs = Vec::new();
        for i in 0..200 {
            p.invoke_as(&format!("increment_{i}"), increment, (s.clone(),));
            inputs.push((format!("x{i}"), p.result(&format!("increment_{i}"))));
        }
        p.add("gather", gather(200), inputs);
    })
    .unwrap();
    let big = Pipeline::build("big", |p| {
        let blob = p.invoke(make_blob, ());
        for i in 0..4 {
            p.invoke_as(&format!("blob_len_{i}"), blob_len, (blob.clone(),));
        }
    })
    .unwrap();
    let vec_before = Pipeline::build("vec_before", |p| {
        let series = p.invoke(make_msgpack, ());
        for i in 0..4 {
            p.invoke_as(&format!("sum_{i}"), msgpack_sum, (series.clone(),));
        }
    })
    .unwrap();
    let vec_after = Pipeline::build("vec_after", |p| {
        let series = p.invoke(make_series, ());
        for i in 0..4 {
            p.invoke_as(&format!("sum_{i}"), series_sum, (series.clone(),));
        }
    })
    .unwrap();
    let critical = Pipeline::build("critical", |p| {
        let s = p.invoke(source, ());
        for i in 0..20 {
            p.invoke_as(&format!("leaf_{i}"), nap, (s.clone(),));
        }
        let mut h = s;
        for i in 0..8 {
            h = p.invoke_as(&format!("chain_{i}"), nap, (h,));
        }
    })
    .unwrap();
    let one = Pipeline::build("one", |p| {
        p.invoke(source, ());
    })
    .unwrap();
    let mut repo = Repository::new("dask_overhead")
        .with_pipeline(mode(chain))
        .with_pipeline(mode(fan))
        .with_pipeline(mode(big))
        .with_pipeline(mode(vec_before))
        .with_pipeline(mode(vec_after))
        .with_pipeline(mode(critical))
        .with_pipeline(mode(one));
    // The step processes on the workers read the same variable (the bench sets it
    // before it starts the cluster, and the workers pass their environment on).
    for (shape, n) in scale_sizes() {
        repo =
            repo.with_lazy_pipeline(scale_name(shape, n), move || mode(scale_pipeline(shape, n)));
    }
    repo
}

/// The default of `SOLIDFLOW_BENCH_SCALE`.
const DEFAULT_SCALE: &str = "chain:100,chain:1000,chain:10000,fan:200,fan:2000,fan:10000";

/// The `(shape, n)` of `SOLIDFLOW_BENCH_SCALE` (`chain:100,fan:200,...`).
fn scale_sizes() -> Vec<(&'static str, usize)> {
    let spec = std::env::var("SOLIDFLOW_BENCH_SCALE").unwrap_or_else(|_| DEFAULT_SCALE.into());
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let (shape, n) = item.trim().split_once(':').unwrap_or_else(|| {
                panic!("SOLIDFLOW_BENCH_SCALE: `{item}` is not `chain:<n>` or `fan:<n>`")
            });
            let shape = match shape {
                "chain" => "chain",
                "fan" => "fan",
                other => panic!("SOLIDFLOW_BENCH_SCALE: unknown shape `{other}` (chain, fan)"),
            };
            let n = n
                .parse::<usize>()
                .ok()
                .filter(|&n| n >= 1)
                .unwrap_or_else(|| panic!("SOLIDFLOW_BENCH_SCALE: `{n}` is not a size ≥ 1"));
            (shape, n)
        })
        .collect()
}

fn scale_name(shape: &str, n: usize) -> String {
    format!("scale_{shape}_{n}")
}

/// How many steps `shape` has at size `n`.
fn scale_steps(shape: &str, n: usize) -> usize {
    if shape == "chain" { n } else { n + 2 }
}

/// A chain of `n` steps, or a source, `n` leaves and a gather of the leaves.
fn scale_pipeline(shape: &str, n: usize) -> Pipeline {
    Pipeline::build(&scale_name(shape, n), |p| {
        let s = p.invoke(source, ());
        if shape == "chain" {
            let mut h = s;
            for i in 1..n {
                h = p.invoke_as(&format!("increment_{i}"), increment, (h,));
            }
            return;
        }
        let mut inputs = Vec::with_capacity(n);
        for i in 0..n {
            p.invoke_as(&format!("increment_{i}"), increment, (s.clone(),));
            inputs.push((format!("x{i}"), p.result(&format!("increment_{i}"))));
        }
        p.add("gather", gather(n), inputs);
    })
    .unwrap()
}

/// Records when the executor connected, when the first step started and when the run ended.
#[derive(Default)]
struct Marks {
    connected: Option<Instant>,
    first_step: Option<Instant>,
}

struct Recorder(Arc<Mutex<Marks>>);

impl EventListener for Recorder {
    fn on_event(&self, event: &Event) {
        let mut m = self.0.lock().unwrap();
        match &event.kind {
            EventKind::EngineEvent { details } if details.get("scheduler").is_some() => {
                m.connected.get_or_insert_with(Instant::now);
            }
            EventKind::StepStart { .. } => {
                m.first_step.get_or_insert_with(Instant::now);
            }
            _ => {}
        }
    }
}

struct Timing {
    total: Duration,
    after_connect: Duration,
    first_step: Duration,
}

fn run_solidflow(
    repo: &Repository,
    pipeline: &str,
    execution: serde_json::Value,
    home: &std::path::Path,
) -> Timing {
    run_with(repo, pipeline, json!({"dask": execution}), home)
}

/// Runs `pipeline` with filesystem storage and `execution` (`{"dask": ..}`, `{"in_process": {}}`).
fn run_with(
    repo: &Repository,
    pipeline: &str,
    execution: serde_json::Value,
    home: &std::path::Path,
) -> Timing {
    let pipeline = repo.pipeline(pipeline).unwrap();
    let marks = Arc::new(Mutex::new(Marks::default()));
    let options = RunOptions {
        home: Some(home.to_path_buf()),
        listeners: vec![Arc::new(Recorder(marks.clone()))],
        ..RunOptions::default()
    };
    let mut config = json!({"storage": {"filesystem": {}}, "execution": execution});
    if std::env::var_os("SOLIDFLOW_BENCH_CONFIGURED").is_some() {
        // Every solid configured (a retry policy): a run config as large as the pipeline.
        let solids: serde_json::Map<String, serde_json::Value> = pipeline
            .invocations()
            .iter()
            .map(|inv| (inv.alias.clone(), json!({"retry": {"max_retries": 0}})))
            .collect();
        config["solids"] = solids.into();
    }
    let started = Instant::now();
    let result = execute_pipeline_with(pipeline, &ConfigSources::from_value(config), options)
        .expect("run starts");
    let total = started.elapsed();
    assert!(
        result.success(),
        "{} failed: {:#?}",
        pipeline.name(),
        result.events().iter().rev().take(5).collect::<Vec<_>>()
    );
    let end = Instant::now();
    let m = marks.lock().unwrap();
    Timing {
        total,
        after_connect: end - m.connected.unwrap_or(started),
        first_step: m.first_step.unwrap_or(end) - started,
    }
}

const RAW_SCRIPT: &str = r#"
import json, subprocess, sys, tempfile, os, time
from distributed import Client

def noop(*args):
    return 1

def sub(*args):
    subprocess.run(["/bin/true"], check=True)
    return 1

def produce(path):
    subprocess.run(["sh", "-c", "head -c 104857600 /dev/zero > " + path], check=True)
    return path

def consume(path):
    subprocess.run(["wc", "-c", path], check=True, capture_output=True)
    return 1

def make_blob():
    return b"\x07" * (100 * 1024 * 1024)

def blob_len(b):
    return len(b)

def shape(client, name, fn, tmp, n):
    if name == "chain":
        f = client.submit(fn, pure=False)
        for _ in range(n - 1):
            f = client.submit(fn, f, pure=False)
        client.gather([f])
    elif name == "fan":
        s = client.submit(fn, pure=False)
        leaves = [client.submit(fn, s, pure=False) for _ in range(n)]
        client.gather([client.submit(fn, *leaves, pure=False)])
    elif name == "big":
        if fn is noop:
            b = client.submit(make_blob, pure=False)
            client.gather([client.submit(blob_len, b, pure=False) for _ in range(4)])
        else:
            p = client.submit(produce, os.path.join(tmp, "blob-%f" % time.time()), pure=False)
            client.gather([client.submit(consume, p, pure=False) for _ in range(4)])

# argv: address, reps, JSON list of [result name, shape, size]
address, reps, jobs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
client = Client(address)
tmp = tempfile.mkdtemp()
out = {}
for result, name, n in jobs:
    for label, fn in [("a", noop), ("b", sub)]:
        best = None
        for _ in range(reps):
            t = time.perf_counter()
            shape(client, name, fn, tmp, n)
            d = time.perf_counter() - t
            best = d if best is None else min(best, d)
        out["%s_%s" % (result, label)] = best
print(json.dumps(out))
client.close()
"#;

fn main() {
    // The workers run this binary in step mode.
    if matches!(
        std::env::args().nth(1).as_deref(),
        Some("step" | "step-server")
    ) {
        repository().main();
    }
    let reps: usize = std::env::var("SOLIDFLOW_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    // SOLIDFLOW_BENCH_ONLY=chain,fan,big,critical,first: run only these parts.
    let only = std::env::var("SOLIDFLOW_BENCH_ONLY").ok();
    let listed = |part: &str| {
        only.as_deref()
            .is_some_and(|o| o.split(',').any(|p| p.trim() == part))
    };
    // `scale` runs only when asked for: it takes long.
    let wanted = |part: &str| listed(part) || (only.is_none() && part != "scale");
    // SAFETY: single-threaded at this point; the executor reads the first for the
    // bridge, and the workers (started below) pass the second on to the step processes.
    unsafe {
        std::env::set_var("SOLIDFLOW_PYTHON", dask_support::python());
        if std::env::var_os("SOLIDFLOW_BENCH_SCALE").is_none() {
            std::env::set_var("SOLIDFLOW_BENCH_SCALE", DEFAULT_SCALE);
        }
    }
    let repo = repository();
    let cluster = dask_support::DaskCluster::start(&[
        dask_support::WorkerSpec::plain("w0"),
        dask_support::WorkerSpec::plain("w1"),
    ]);
    let home = tempfile::Builder::new()
        .prefix("solidflow-dask-bench-")
        .tempdir()
        .unwrap();

    // Raw Dask baselines, same cluster.
    let script = home.path().join("raw.py");
    std::fs::write(&script, RAW_SCRIPT).unwrap();
    let raw = |jobs: serde_json::Value| -> serde_json::Value {
        let out = std::process::Command::new(dask_support::python())
            .arg(&script)
            .arg(&cluster.address)
            .arg(reps.to_string())
            .arg(jobs.to_string())
            .output()
            .expect("run the raw Dask baseline");
        assert!(
            out.status.success(),
            "raw baseline failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("baseline JSON")
    };
    let raw_jobs: Vec<_> = [("chain", 100), ("fan", 200), ("big", 0)]
        .into_iter()
        .filter(|(name, _)| wanted(name) || (*name == "big" && wanted("vec")))
        .map(|(name, n)| json!([name, name, n]))
        .collect();
    let raw_default = raw(json!(raw_jobs));

    println!(
        "| shape | isolation | steps | solidflow total | solidflow after connect | per step | raw (a) no-op per step | raw (b) subprocess per step | solidflow / (a) | solidflow / (b) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let shapes = [
        ("chain", 100usize, "chain"),
        ("fan", 202, "fan"),
        ("big", 5, "big"),
        ("vec_before", 5, "vec"),
        ("vec_after", 5, "vec"),
    ];
    for ((name, steps, part), isolation) in shapes
        .into_iter()
        .flat_map(|s| [(s, "process"), (s, "warm"), (s, "in_server")])
    {
        if !wanted(part) {
            continue;
        }
        let baseline = if part == "vec" { "big" } else { name };
        let config = json!({"config": {"address": cluster.address, "isolation": isolation}});
        let mut best: Option<Timing> = None;
        for _ in 0..reps {
            let t = run_solidflow(&repo, name, config.clone(), home.path());
            if best
                .as_ref()
                .is_none_or(|b| t.after_connect < b.after_connect)
            {
                best = Some(t);
            }
        }
        let t = best.unwrap();
        let per = t.after_connect.as_secs_f64() / steps as f64;
        let a = raw_default[format!("{baseline}_a")].as_f64().unwrap() / steps as f64;
        let b = raw_default[format!("{baseline}_b")].as_f64().unwrap() / steps as f64;
        println!(
            "| {name} | {isolation} | {steps} | {:.2} s | {:.2} s | {:.1} ms | {:.1} ms | {:.1} ms | {:.2}× | {:.2}× |",
            t.total.as_secs_f64(),
            t.after_connect.as_secs_f64(),
            per * 1e3,
            a * 1e3,
            b * 1e3,
            per / a,
            per / b
        );
    }

    if wanted("vec") {
        println!();
        println!("| 100 MB `Vec<f64>` → 4, in_process, filesystem | whole run (best of {reps}) |");
        println!("|---|---|");
        for name in ["vec_before", "vec_after"] {
            let best = (0..reps)
                .map(|_| run_with(&repo, name, json!({"in_process": {}}), home.path()).total)
                .min()
                .unwrap();
            println!("| {name} | {:.0} ms |", best.as_secs_f64() * 1e3);
        }
    }

    let priorities: &[bool] = if wanted("critical") {
        println!();
        println!(
            "| critical (20 leaves + 8-step chain, 0.2 s each) | after connect (best of {reps}) |"
        );
        println!("|---|---|");
        &[true, false]
    } else {
        &[]
    };
    for &priority in priorities {
        let config =
            json!({"config": {"address": cluster.address, "critical_path_priority": priority}});
        let best = (0..reps)
            .map(|_| run_solidflow(&repo, "critical", config.clone(), home.path()).after_connect)
            .min()
            .unwrap();
        println!(
            "| critical_path_priority: {priority} | {:.2} s |",
            best.as_secs_f64()
        );
    }

    if wanted("scale") {
        scale(&repo, &cluster.address, reps, home.path(), raw);
    }

    drop(cluster);
    if !wanted("first") {
        return;
    }
    println!();
    println!(
        "| time to first step, `execution: {{dask: {{}}}}` (local cluster start included) | best | worst |"
    );
    println!("|---|---|---|");
    let times: Vec<Duration> = (0..reps)
        .map(|_| run_solidflow(&repo, "one", json!({}), home.path()).first_step)
        .collect();
    println!(
        "| 1-step pipeline | {:.2} s | {:.2} s |",
        times.iter().min().unwrap().as_secs_f64(),
        times.iter().max().unwrap().as_secs_f64()
    );
}

/// The `scale` part: per step at every size of `SOLIDFLOW_BENCH_SCALE`, solidflow in each
/// isolation of `SOLIDFLOW_BENCH_ISOLATION` next to raw (a)/(b) of the same shape and size.
fn scale(
    repo: &Repository,
    address: &str,
    reps: usize,
    home: &std::path::Path,
    raw: impl Fn(serde_json::Value) -> serde_json::Value,
) {
    // Smallest size of each shape first: the ratios are to it.
    let mut sizes = scale_sizes();
    sizes.sort_unstable();
    let isolations =
        std::env::var("SOLIDFLOW_BENCH_ISOLATION").unwrap_or_else(|_| "warm,process".into());
    let isolations: Vec<&str> = isolations
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let jobs: Vec<_> = sizes
        .iter()
        .map(|&(shape, n)| json!([scale_name(shape, n), shape, n]))
        .collect();
    let raw = raw(json!(jobs));
    println!();
    println!("Per step with size (after connect, best of {reps}):");
    println!();
    println!(
        "| shape | steps | isolation | solidflow after connect | per step | / smallest | raw (a) per step | raw (b) per step | raw (b) / smallest | solidflow / (a) | solidflow / (b) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    // (shape, isolation) -> per step at the smallest size; shape -> raw (b) there.
    let mut smallest: HashMap<(&str, &str), f64> = HashMap::new();
    let mut smallest_raw: HashMap<&str, f64> = HashMap::new();
    for &(shape, n) in &sizes {
        let name = scale_name(shape, n);
        let steps = scale_steps(shape, n);
        let a = raw[format!("{name}_a")].as_f64().unwrap() / steps as f64;
        let b = raw[format!("{name}_b")].as_f64().unwrap() / steps as f64;
        let base_b = *smallest_raw.entry(shape).or_insert(b);
        for &isolation in &isolations {
            let config = json!({"config": {"address": address, "isolation": isolation}});
            let best = (0..reps)
                .map(|_| run_solidflow(repo, &name, config.clone(), home).after_connect)
                .min()
                .unwrap();
            let per = best.as_secs_f64() / steps as f64;
            let base = *smallest.entry((shape, isolation)).or_insert(per);
            println!(
                "| {shape} {n} | {steps} | {isolation} | {:.2} s | {:.2} ms | {:.2}× | {:.2} ms | {:.2} ms | {:.2}× | {:.2}× | {:.2}× |",
                best.as_secs_f64(),
                per * 1e3,
                per / base,
                a * 1e3,
                b * 1e3,
                b / base_b,
                per / a,
                per / b
            );
        }
    }
}
