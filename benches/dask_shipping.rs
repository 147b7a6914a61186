//! Shipping builds through the Dask scheduler, and the scheduler's memory over a long run.
//!
//! ```text
//! scripts/python-env.sh          # once: the venv with dask + distributed
//! cargo bench --bench dask_shipping
//! SOLIDFLOW_BENCH_STEPS=2000 cargo bench --bench dask_shipping   # a shorter long run
//! SOLIDFLOW_BENCH_ONLY=ship cargo bench --bench dask_shipping    # parts: ship,memory
//! ```
//!
//! It starts one real cluster (`dask scheduler` + 2 × `dask worker --nthreads 1` on
//! 127.0.0.1, via the test helper). What a run sends to the scheduler is counted by a
//! loopback TCP proxy in front of it, through which the runs (and the raw baselines)
//! connect; the scheduler's memory is its `VmRSS` from `/proc/<pid>/status`.
//!
//! - **ship**: runs a 1-step pipeline with `ship_binary: true` for three builds (copies of
//!   this bench binary, each with a different tail: same program, different sha256):
//!   build a twice, then b and c. Per run: whether the scheduler had the build, the
//!   bytes of the build the bridge uploaded, every byte the run sent to the scheduler
//!   (connect, shipping, submits), and the scheduler's RSS after.
//!   Side by side, on the same scheduler: a raw Dask client that connects and runs one
//!   no-op task (the floor of any run's traffic), and what `ship_binary` did before
//!   (a `WorkerPlugin` holding the build's bytes, registered per run) for the same three
//!   builds.
//! - **memory**: a fan-out of `SOLIDFLOW_BENCH_STEPS` (default 10,000) leaves, with the
//!   scheduler's RSS sampled every tenth of the steps; beside it raw Dask running the
//!   same number of no-op tasks on the same scheduler.

#[path = "../tests/support/dask.rs"]
mod dask_support;
#[path = "shapes/mod.rs"]
mod shapes;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use solidflow::config::ConfigSources;
use solidflow::execution::sink::EventListener;
use solidflow::prelude::*;

/// `SOLIDFLOW_BENCH_ONLY=ship,memory` runs only these parts.
fn wanted(part: &str) -> bool {
    std::env::var("SOLIDFLOW_BENCH_ONLY")
        .map_or(true, |only| only.split(',').any(|p| p.trim() == part))
}

fn steps() -> usize {
    std::env::var("SOLIDFLOW_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000)
}

fn repository() -> Repository {
    let dask = || default_executors().with(dask_executor());
    Repository::new("dask_shipping")
        .with_pipeline(shapes::chain(1).with_executors(dask()))
        .with_pipeline(shapes::fan_out(steps()).with_executors(dask()))
}

/// `VmRSS` of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A loopback TCP proxy in front of the scheduler that counts the bytes clients send
/// through it: what a run's parent (its bridge) sends to the scheduler, exactly.
struct Proxy {
    address: String,
    sent: Arc<AtomicU64>,
}

impl Proxy {
    fn start(scheduler: &str) -> Self {
        let target = scheduler.trim_start_matches("tcp://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let address = format!("tcp://{}", listener.local_addr().unwrap());
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(upstream) = TcpStream::connect(&target) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let pipe =
                    |mut from: TcpStream, mut to: TcpStream, count: Option<Arc<AtomicU64>>| {
                        std::thread::spawn(move || {
                            let mut buf = vec![0u8; 64 * 1024];
                            while let Ok(n) = from.read(&mut buf) {
                                if n == 0 || to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                                if let Some(c) = &count {
                                    c.fetch_add(n as u64, Ordering::Relaxed);
                                }
                            }
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    };
                let (c2, u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                pipe(client, upstream, Some(counter.clone()));
                pipe(u2, c2, None);
            }
        });
        Self { address, sent }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn kb(bytes: u64) -> String {
    format!("{:.1} KB", bytes as f64 / 1e3)
}

/// Keeps the details of the shipping event and samples the scheduler's RSS every
/// `every` successful steps.
struct Watch {
    shipped: Mutex<Option<Value>>,
    successes: AtomicUsize,
    every: usize,
    scheduler: u32,
    samples: Mutex<Vec<(usize, u64)>>,
}

impl EventListener for Watch {
    fn on_event(&self, event: &Event) {
        match &event.kind {
            EventKind::EngineEvent { details } if details.get("bytes_sent").is_some() => {
                *self.shipped.lock().unwrap() = Some(details.clone());
            }
            EventKind::StepSuccess { .. } => {
                let n = self.successes.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_multiple_of(self.every) {
                    self.samples.lock().unwrap().push((n, rss(self.scheduler)));
                }
            }
            _ => {}
        }
    }
}

fn run(
    repo: &Repository,
    pipeline: &str,
    dask: Value,
    home: &Path,
    scheduler: u32,
    every: usize,
) -> Arc<Watch> {
    let watch = Arc::new(Watch {
        shipped: Mutex::new(None),
        successes: AtomicUsize::new(0),
        every: every.max(1),
        scheduler,
        samples: Mutex::new(Vec::new()),
    });
    let options = RunOptions {
        home: Some(home.to_path_buf()),
        listeners: vec![watch.clone()],
        ..RunOptions::default()
    };
    let config = json!({"storage": {"filesystem": {}}, "execution": {"dask": {"config": dask}}});
    let pipeline = repo.pipeline(pipeline).unwrap();
    let result = execute_pipeline_with(pipeline, &ConfigSources::from_value(config), options)
        .expect("run starts");
    assert!(
        result.success(),
        "{} failed: {:#?}",
        pipeline.name(),
        result.events().iter().rev().take(5).collect::<Vec<_>>()
    );
    watch
}

/// Copies of this binary with a tail each: the same program as different builds.
fn builds(dir: &Path) -> Vec<PathBuf> {
    let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    ["a", "b", "c"]
        .iter()
        .map(|name| {
            let path = dir.join(format!("build-{name}"));
            let mut bytes = me.clone();
            bytes.extend_from_slice(format!("\nsolidflow bench build {name}\n").as_bytes());
            std::fs::write(&path, bytes).unwrap();
            let mut perms = std::fs::metadata(&path).unwrap().permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
            std::fs::set_permissions(&path, perms).unwrap();
            path
        })
        .collect()
}

/// Raw Dask baselines, run by the venv's Python against the same scheduler.
const RAW_SCRIPT: &str = r#"
import json, sys
from distributed import Client
from distributed.diagnostics.plugin import WorkerPlugin

class Binary(WorkerPlugin):
    idempotent = True
    def __init__(self, data):
        self.data = data
    def setup(self, worker):
        pass

def noop(*args):
    return 1

def state(dask_scheduler=None):
    s = dask_scheduler
    topics = getattr(getattr(s, "_broker", None), "_topics", {})
    out = {
        "tasks": len(s.tasks),
        "task_prefixes": len(s.task_prefixes),
        "topics": len(topics),
        "topic_events": sum(len(t.events) for t in topics.values()),
    }
    return out

address, what = sys.argv[1], sys.argv[2]
client = Client(address)
if what == "one":
    client.submit(noop, pure=False).result()
elif what == "plugin":
    with open(sys.argv[3], "rb") as f:
        client.register_plugin(Binary(f.read()), name="bench-binary-" + sys.argv[3][-1])
elif what == "state":
    print(json.dumps(client.run_on_scheduler(state)))
elif what == "tasks":
    n = int(sys.argv[3])
    first = client.submit(noop, pure=False)
    futures = [client.submit(noop, first, pure=False) for _ in range(n)]
    client.gather(futures)
    del futures, first
client.close()
"#;

fn raw(script: &Path, address: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(dask_support::python())
        .arg(script)
        .arg(address)
        .args(args)
        .output()
        .expect("run the raw Dask baseline");
    assert!(
        out.status.success(),
        "raw baseline {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn main() {
    // The workers run this binary (or a copy of it) in step mode.
    if std::env::args().nth(1).as_deref() == Some("step") {
        repository().main();
    }
    // SAFETY: single-threaded at this point; the executor reads it for the bridge.
    unsafe { std::env::set_var("SOLIDFLOW_PYTHON", dask_support::python()) };
    let repo = repository();
    let workers = ["w0", "w1"].map(dask_support::WorkerSpec::plain);
    let cluster = dask_support::DaskCluster::start(&workers);
    let scheduler = cluster.scheduler_pid();
    let home = tempfile::Builder::new()
        .prefix("solidflow-dask-ship-bench-")
        .tempdir()
        .unwrap();
    let script = home.path().join("raw.py");
    std::fs::write(&script, RAW_SCRIPT).unwrap();
    let address = cluster.address.clone();

    if wanted("ship") {
        let builds = builds(home.path());
        let size = std::fs::metadata(&builds[0]).unwrap().len();
        // Runs and baselines connect through the proxy; workers connect directly.
        let proxy = Proxy::start(&address);
        println!("## shipping a {} build\n", mb(size));
        println!(
            "| run | scheduler had it | bridge uploaded | sent to the scheduler (whole run) | scheduler RSS after |"
        );
        println!("|---|---|---|---|---|");
        let before = proxy.sent();
        raw(&script, &proxy.address, &["one"]);
        println!(
            "| raw Dask: connect + 1 no-op task | | | {} | {} |",
            kb(proxy.sent() - before),
            mb(rss(scheduler))
        );
        let rss_start = rss(scheduler);
        let mut after_first = 0;
        for (i, (label, build)) in [
            ("build a", &builds[0]),
            ("build a again", &builds[0]),
            ("build b", &builds[1]),
            ("build c", &builds[2]),
        ]
        .into_iter()
        .enumerate()
        {
            let before = proxy.sent();
            let dask = json!({"address": proxy.address, "ship_binary": true, "executable": build});
            let watch = run(&repo, "chain", dask, home.path(), scheduler, 1);
            let got = proxy.sent() - before;
            let shipped = watch
                .shipped
                .lock()
                .unwrap()
                .clone()
                .expect("a shipping event");
            let now = rss(scheduler);
            if i == 0 {
                after_first = now;
            }
            println!(
                "| solidflow, {label} | {} | {} | {} | {} |",
                shipped["cached"],
                kb(shipped["bytes_sent"].as_u64().unwrap_or(0)),
                kb(got),
                mb(now)
            );
        }
        let after_three = rss(scheduler);
        println!(
            "\nsolidflow: scheduler RSS {} before, {} after one build, {} after three: {:.2}× of one build",
            mb(rss_start),
            mb(after_first),
            mb(after_three),
            after_three as f64 / after_first as f64
        );
        // What ship_binary did before: the build's bytes inside a worker plugin, which the
        // scheduler keeps for every worker that joins.
        let plugin_start = rss(scheduler);
        let mut cells = Vec::new();
        for build in &builds {
            let before = proxy.sent();
            raw(
                &script,
                &proxy.address,
                &["plugin", build.to_str().unwrap()],
            );
            cells.push(format!(
                "{} sent, RSS {}",
                mb(proxy.sent() - before),
                mb(rss(scheduler))
            ));
        }
        println!(
            "raw Dask, a WorkerPlugin holding each build (the old ship_binary): RSS {} before; {}",
            mb(plugin_start),
            cells.join("; ")
        );
    }

    if wanted("memory") {
        let n = steps();
        println!("\n## scheduler memory over a {n}-leaf fan-out\n");
        let before = rss(scheduler);
        let started = std::time::Instant::now();
        let watch = run(
            &repo,
            "fan_out",
            json!({"address": address}),
            home.path(),
            scheduler,
            n / 10,
        );
        let wall = started.elapsed();
        let after = rss(scheduler);
        let state = raw(&script, &address, &["state"]);
        println!("| steps done | scheduler RSS |");
        println!("|---|---|");
        println!("| 0 | {} |", mb(before));
        for (done, bytes) in watch.samples.lock().unwrap().iter() {
            println!("| {done} | {} |", mb(*bytes));
        }
        println!(
            "\nsolidflow: {} steps in {:.1} s; scheduler RSS {} before, {} after ({:+.1} MB)",
            n + 1,
            wall.as_secs_f64(),
            mb(before),
            mb(after),
            (after as f64 - before as f64) / 1e6
        );
        println!("scheduler state after the run: {state}");
        let before = rss(scheduler);
        raw(&script, &address, &["tasks", &n.to_string()]);
        let after = rss(scheduler);
        println!(
            "raw Dask, {} no-op tasks on the same scheduler: RSS {} before, {} after ({:+.1} MB)",
            n + 1,
            mb(before),
            mb(after),
            (after as f64 - before as f64) / 1e6
        );
    }
}
