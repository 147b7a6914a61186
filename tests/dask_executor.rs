//! The Dask executor against real Dask: `dask scheduler` + `dask worker` processes
//! started by the test helper, and local clusters created by the executor itself.
//!
//! Needs the venv from `scripts/python-env.sh` (or `SOLIDFLOW_PYTHON`); without it the
//! tests fail and say so. One external cluster is shared by the scenarios of
//! [`external_cluster_scenarios`] to keep the file fast on two cores.

mod common;
#[path = "support/dask.rs"]
mod dask_support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use dask_support::{DaskCluster, WorkerSpec, descendants, pid_alive, python};
use serde_json::Value;

const RUN_DEADLINE: Duration = Duration::from_secs(120);

/// A pipeline binary started with `execute ... --json`, its events read live.
struct Running {
    child: Child,
    events: Receiver<(Instant, Value)>,
    seen: Vec<(Instant, Value)>,
    stderr: std::thread::JoinHandle<String>,
}

struct Outcome {
    code: Option<i32>,
    events: Vec<(Instant, Value)>,
    stderr: String,
}

impl Outcome {
    fn of_type(&self, step: Option<&str>, event_type: &str) -> Vec<&Value> {
        self.events
            .iter()
            .map(|(_, e)| e)
            .filter(|e| e["event_type"] == event_type)
            .filter(|e| step.is_none_or(|s| e["step_key"] == s))
            .collect()
    }

    fn describe(&self) -> String {
        let events: Vec<String> = self
            .events
            .iter()
            .map(|(_, e)| {
                format!(
                    "{} {} {} {}",
                    e["event_type"], e["step_key"], e["worker"], e["message"]
                )
            })
            .collect();
        format!(
            "exit {:?}\nevents:\n{}\nstderr:\n{}",
            self.code,
            events.join("\n"),
            self.stderr
        )
    }

    fn expect_code(&self, code: i32) {
        assert_eq!(self.code, Some(code), "{}", self.describe());
    }
}

fn start(binary: &str, home: &Path, args: &[&str]) -> Running {
    let mut cmd = Command::new(common::example_bin(binary));
    cmd.env("AWS_EC2_METADATA_DISABLED", "true");
    cmd.args(args)
        .arg("--json")
        .env("SOLIDFLOW_HOME", home)
        .env("SOLIDFLOW_PYTHON", python())
        .env("NO_COLOR", "1")
        .current_dir(home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start the pipeline binary");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let _ = tx.send((Instant::now(), v));
            }
        }
    });
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    Running {
        child,
        events: rx,
        seen: Vec::new(),
        stderr,
    }
}

impl Running {
    fn wait_event(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some((_, e)) = self.seen.iter().find(|(_, e)| pred(e)) {
            return e.clone();
        }
        let deadline = Instant::now() + RUN_DEADLINE;
        loop {
            match self
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok((t, e)) => {
                    let hit = pred(&e);
                    self.seen.push((t, e.clone()));
                    if hit {
                        return e;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!(
                        "timed out waiting for {what}; seen: {:?}",
                        self.seen
                            .iter()
                            .map(|(_, e)| &e["message"])
                            .collect::<Vec<_>>()
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "the run ended before {what}; seen: {:?}",
                        self.seen
                            .iter()
                            .map(|(_, e)| &e["message"])
                            .collect::<Vec<_>>()
                    )
                }
            }
        }
    }

    fn finish(mut self) -> Outcome {
        let deadline = Instant::now() + RUN_DEADLINE;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the run did not finish within {RUN_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(e) = self.events.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(e);
        }
        Outcome {
            code: status.code(),
            events: self.seen,
            stderr: self.stderr.join().unwrap_or_default(),
        }
    }
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn run(binary: &str, home: &Path, pipeline: &str, config: &str) -> Outcome {
    let path = write_config(home, &format!("{pipeline}-{}.yaml", fastrand_id()), config);
    start(
        binary,
        home,
        &["execute", pipeline, "-c", path.to_str().unwrap()],
    )
    .finish()
}

fn fastrand_id() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn home() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("solidflow-dask-test-")
        .tempdir()
        .unwrap()
}

/// Every scenario that can share one external cluster: a plain worker and a worker
/// started with `--resources GPU=1` (both 1 thread). The worker-kill scenario is last.
#[test]
fn external_cluster_scenarios() {
    let mut cluster = DaskCluster::start(&[
        WorkerSpec::plain("plain"),
        WorkerSpec::with_resources("gpu", "GPU=1"),
    ]);
    let gpu_worker = cluster
        .worker_address(cluster.worker_named("gpu"))
        .to_string();
    let address = cluster.address.clone();
    let config = format!(
        "storage: {{filesystem: {{}}}}\nexecution: {{dask: {{config: {{address: '{address}'}}}}}}\n"
    );
    let home = home();
    let home = home.path();

    // The seed's hello world, with the seed's distributed config block (address).
    let out = run("hello_world", home, "dask_pipeline", &config);
    out.expect_code(0);
    let success = out.of_type(Some("hello_world.compute"), "STEP_SUCCESS");
    assert_eq!(success.len(), 1, "{}", out.describe());
    assert!(
        success[0]["worker"]
            .as_str()
            .unwrap()
            .starts_with("tcp://127.0.0.1:"),
        "{}",
        out.describe()
    );
    let hello = out.of_type(Some("hello_world.compute"), "LOG_MESSAGE");
    assert!(
        hello
            .iter()
            .any(|e| e["message"] == "saying hello" && e["worker"].is_string()),
        "{}",
        out.describe()
    );

    // Diamond: every step once, join after both branches, the right value.
    let out = run("dask_pipelines", home, "diamond", &config);
    out.expect_code(0);
    for step in [
        "source.compute",
        "double.compute",
        "add_ten.compute",
        "join.compute",
    ] {
        assert_eq!(
            out.of_type(Some(step), "STEP_SUCCESS").len(),
            1,
            "{step}: {}",
            out.describe()
        );
    }
    let pos = |step: &str, t: &str| {
        out.events
            .iter()
            .position(|(_, e)| e["step_key"] == step && e["event_type"] == t)
            .unwrap()
    };
    assert!(pos("join.compute", "STEP_START") > pos("double.compute", "STEP_SUCCESS"));
    assert!(pos("join.compute", "STEP_START") > pos("add_ten.compute", "STEP_SUCCESS"));
    // Launched ahead: `join` went to Dask while both branches ran, with their tasks as
    // its dependencies; its events still come after their successes. The branches
    // (two dependents of `source`) were launched when `source` was done.
    assert_eq!(
        launches(&out, "join.compute"),
        [(true, 1)],
        "{}",
        out.describe()
    );
    for step in ["double.compute", "add_ten.compute"] {
        assert_eq!(launches(&out, step), [(false, 1)], "{}", out.describe());
    }

    // An upstream that fails and retries: the dependent launched ahead of the failed
    // attempt is withdrawn (it never started), then launched again ahead of the retry.
    let out = run("dask_pipelines", home, "flaky_chain", &config);
    out.expect_code(0);
    assert_eq!(
        out.of_type(Some("flaky_once.compute"), "STEP_UP_FOR_RETRY")
            .len(),
        1,
        "{}",
        out.describe()
    );
    assert_eq!(
        out.of_type(Some("after_flaky.compute"), "STEP_START").len(),
        1,
        "{}",
        out.describe()
    );
    let success = out.of_type(Some("after_flaky.compute"), "STEP_SUCCESS");
    assert_eq!(success.len(), 1, "{}", out.describe());
    assert_eq!(success[0]["data"]["attempt"], 1, "no attempt was consumed");
    let started = out
        .of_type(Some("after_flaky.compute"), "ENGINE_EVENT")
        .into_iter()
        .filter_map(|e| e["data"]["details"]["dask_key"].as_str())
        .map(str::to_string)
        .collect::<Vec<_>>();
    assert!(
        started.len() == 1 && started[0].ends_with("-a1-w1"),
        "one start, of the launch after the withdrawn one: {started:?}\n{}",
        out.describe()
    );
    assert!(
        pos_in(&out, "after_flaky.compute", "STEP_START")
            > pos_in(&out, "flaky_once.compute", "STEP_SUCCESS")
    );

    // Fan-out of 100 (and the fan-in), spread over both workers.
    let started = Instant::now();
    let out = run("dask_pipelines", home, "fan_out_100", &config);
    out.expect_code(0);
    let successes = out.of_type(None, "STEP_SUCCESS");
    assert_eq!(successes.len(), 102, "{}", out.describe());
    let workers: std::collections::BTreeSet<&str> = successes
        .iter()
        .filter_map(|e| e["worker"].as_str())
        .collect();
    assert_eq!(workers.len(), 2, "fan-out used only {workers:?}");
    eprintln!(
        "fan_out_100 on the external cluster: {:?}",
        started.elapsed()
    );

    // GPU: 1 lands only on the worker started with --resources GPU=1.
    for _ in 0..3 {
        let out = run("dask_pipelines", home, "gpu", &config);
        out.expect_code(0);
        let train = out.of_type(Some("train.compute"), "STEP_SUCCESS");
        assert_eq!(
            train[0]["worker"],
            gpu_worker.as_str(),
            "{}",
            out.describe()
        );
    }

    // Unsatisfiable resource: a clear failure naming it, no step started.
    let out = run("dask_pipelines", home, "tpu", &config);
    out.expect_code(1);
    assert!(
        out.of_type(None, "STEP_START").is_empty(),
        "{}",
        out.describe()
    );
    let text = out.describe();
    assert!(
        text.contains("TPU=1") && text.contains("--resources"),
        "{text}"
    );

    // Live logs: the first line arrives well before the step ends.
    let path = write_config(
        home,
        "live.yaml",
        &(config.clone() + "solids: {chatty: {config: {seconds: 2}}}\n"),
    );
    let mut running = start(
        "dask_pipelines",
        home,
        &["execute", "live_logs", "-c", path.to_str().unwrap()],
    );
    let first = running.wait_event("the first log line", |e| e["message"] == "first line");
    assert!(first["worker"].is_string(), "{first}");
    let first_at = Instant::now();
    let out = running.finish();
    out.expect_code(0);
    let (end_at, _) = out
        .events
        .iter()
        .find(|(_, e)| e["event_type"] == "STEP_SUCCESS")
        .unwrap();
    assert!(
        end_at.duration_since(first_at) > Duration::from_millis(1500),
        "the first line arrived only {:?} before the step ended",
        end_at.duration_since(first_at)
    );

    // Failure + skip: the failure's dependent never runs, the other branch does.
    let out = run("dask_pipelines", home, "fail_skip", &config);
    out.expect_code(1);
    assert_eq!(
        out.of_type(Some("boom.compute"), "STEP_FAILURE").len(),
        1,
        "{}",
        out.describe()
    );
    assert!(
        out.of_type(Some("boom.compute"), "STEP_FAILURE")[0]["data"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("always fails")
    );
    assert_eq!(
        out.of_type(Some("after_boom.compute"), "STEP_SKIPPED")
            .len(),
        1,
        "{}",
        out.describe()
    );
    assert!(
        out.of_type(Some("after_boom.compute"), "STEP_START")
            .is_empty(),
        "{}",
        out.describe()
    );
    // Launched ahead of `boom` and withdrawn on the worker: no process was started.
    assert!(
        launches(&out, "after_boom.compute").is_empty(),
        "{}",
        out.describe()
    );
    assert_eq!(
        out.of_type(Some("fine.compute"), "STEP_SUCCESS").len(),
        1,
        "{}",
        out.describe()
    );

    // A worker killed mid-step: Dask re-runs the step on the other worker, the run succeeds.
    let path = write_config(
        home,
        "slow.yaml",
        &(config.clone() + "solids: {sleepy: {config: {seconds: 3}}}\n"),
    );
    let mut running = start(
        "dask_pipelines",
        home,
        &["execute", "slow", "-c", path.to_str().unwrap()],
    );
    let sleeping = running.wait_event("the step to start sleeping", |e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("sleeping"))
    });
    let victim = sleeping["worker"].as_str().unwrap().to_string();
    let index = if victim == gpu_worker {
        cluster.worker_named("gpu")
    } else {
        cluster.worker_named("plain")
    };
    cluster.kill_worker(index);
    let out = running.finish();
    out.expect_code(0);
    let success = out.of_type(Some("sleepy.compute"), "STEP_SUCCESS");
    assert_eq!(success.len(), 1, "{}", out.describe());
    assert_ne!(success[0]["worker"], victim.as_str(), "{}", out.describe());
    assert!(
        out.of_type(Some("sleepy.compute"), "ENGINE_EVENT")
            .iter()
            .any(|e| e["data"]["details"]["worker_lost"] == true
                && e["worker"] == victim.as_str()
                && e["data"]["details"]["lost_worker"] == victim.as_str()),
        "no worker-lost event naming the lost worker {victim}: {}",
        out.describe()
    );
}

/// Where `step`'s processes started: per start, whether it was launched ahead and its
/// attempt.
fn launches(out: &Outcome, step: &str) -> Vec<(bool, u64)> {
    out.of_type(Some(step), "ENGINE_EVENT")
        .into_iter()
        .map(|e| &e["data"]["details"])
        .filter(|d| d["dask_key"].is_string())
        .map(|d| {
            (
                d["launched_ahead"] == true,
                d["attempt"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// The position of `step`'s first `event_type` event.
fn pos_in(out: &Outcome, step: &str, event_type: &str) -> usize {
    out.events
        .iter()
        .position(|(_, e)| e["step_key"] == step && e["event_type"] == event_type)
        .unwrap_or_else(|| panic!("no {event_type} of {step}: {}", out.describe()))
}

/// The seed's local example verbatim: `{storage: {filesystem: {}}, execution: {dask: {}}}`.
#[test]
fn seed_hello_world_on_a_local_cluster() {
    let home = home();
    let out = run(
        "hello_world",
        home.path(),
        "dask_pipeline",
        "{storage: {filesystem: {}}, execution: {dask: {}}}\n",
    );
    out.expect_code(0);
    assert_eq!(
        out.of_type(Some("hello_world.compute"), "STEP_SUCCESS")
            .len(),
        1,
        "{}",
        out.describe()
    );
    let started = out.of_type(None, "ENGINE_EVENT");
    assert!(
        started
            .iter()
            .any(|e| e["data"]["details"]["created_cluster"] == true),
        "{}",
        out.describe()
    );
    // The worker kept a complete copy of the step's output.
    let run_id = out.of_type(None, "PIPELINE_START")[0]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let copy = home
        .path()
        .join("logs")
        .join(&run_id)
        .join("hello_world.compute.stdout.jsonl");
    let text = std::fs::read_to_string(&copy).unwrap_or_else(|e| panic!("{}: {e}", copy.display()));
    assert!(
        text.contains("STEP_SUCCESS") && text.contains("\"result\""),
        "{text}"
    );
}

#[test]
fn unreachable_scheduler_fails_within_the_timeout_naming_the_address() {
    let port = dask_support::free_port();
    let home = home();
    let started = Instant::now();
    let out = run(
        "hello_world",
        home.path(),
        "dask_pipeline",
        &format!(
            "storage: {{filesystem: {{}}}}\nexecution: {{dask: {{config: {{address: 'tcp://127.0.0.1:{port}', timeout: 2}}}}}}\n"
        ),
    );
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    let text = out.describe();
    assert!(
        text.contains(&format!("127.0.0.1:{port}")) && text.contains("dask scheduler"),
        "{text}"
    );
    assert!(out.of_type(None, "STEP_START").is_empty());
}

#[test]
fn missing_python_and_in_memory_storage_name_the_fix() {
    let home = home();
    let out = run(
        "hello_world",
        home.path(),
        "dask_pipeline",
        "storage: {filesystem: {}}\nexecution: {dask: {config: {python: /nonexistent/python3}}}\n",
    );
    assert_eq!(out.code, Some(1), "{}", out.describe());
    let text = out.describe();
    assert!(
        text.contains("/nonexistent/python3") && text.contains("SOLIDFLOW_PYTHON"),
        "{text}"
    );

    let out = run(
        "hello_world",
        home.path(),
        "dask_pipeline",
        "storage: {in_memory: {}}\nexecution: {dask: {}}\n",
    );
    assert_ne!(out.code, Some(0), "{}", out.describe());
    assert!(
        out.stderr.contains("filesystem") && out.stderr.contains("in_memory"),
        "{}",
        out.describe()
    );
}

/// Ctrl-C (SIGINT to the parent): exit 130, PIPELINE_CANCELED, and every process the
/// run started (bridge, local cluster, step process) is gone. The step after the
/// sleeping one waits in Dask, launched ahead: it is withdrawn and skipped.
#[test]
fn ctrl_c_cancels_and_leaves_nothing_running() {
    let home = home();
    let path = write_config(
        home.path(),
        "slow.yaml",
        "storage: {filesystem: {}}\nexecution: {dask: {config: {n_workers: 1}}}\nsolids: {sleepy: {config: {seconds: 60}}}\n",
    );
    let mut running = start(
        "dask_pipelines",
        home.path(),
        &["execute", "slow_chain", "-c", path.to_str().unwrap()],
    );
    running.wait_event("the step to start sleeping", |e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("sleeping"))
    });
    let parent = running.child.id();
    let spawned = descendants(parent);
    assert!(
        spawned.len() >= 3,
        "expected bridge, cluster and step processes, found {spawned:?}"
    );
    let interrupted = Instant::now();
    Command::new("kill")
        .args(["-INT", &parent.to_string()])
        .status()
        .unwrap();
    let out = running.finish();
    out.expect_code(130);
    assert!(
        interrupted.elapsed() < Duration::from_secs(30),
        "cancel took {:?}",
        interrupted.elapsed()
    );
    assert_eq!(
        out.of_type(None, "PIPELINE_CANCELED").len(),
        1,
        "{}",
        out.describe()
    );
    assert_eq!(
        out.of_type(Some("after_sleepy.compute"), "STEP_SKIPPED")
            .len(),
        1,
        "{}",
        out.describe()
    );
    assert!(
        launches(&out, "after_sleepy.compute").is_empty()
            && out
                .of_type(Some("after_sleepy.compute"), "STEP_START")
                .is_empty(),
        "{}",
        out.describe()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let alive: Vec<u32> = spawned.iter().copied().filter(|&p| pid_alive(p)).collect();
        if alive.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still running after the run was canceled: {alive:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
