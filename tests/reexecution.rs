//! Re-execution driven through the CLI of `examples/reexecution.rs`: a run fails on a
//! config flag (or is killed), and `reexecute --from-failure` runs only what did not
//! succeed, reading the other outputs from the parent run's intermediates in place.
//! On in_process and multiprocess with filesystem storage, and on a real Dask cluster
//! with a real S3 server.

mod common;
#[path = "support/dask.rs"]
mod dask_support;
#[path = "support/s3.rs"]
mod s3_support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dask_support::{DaskCluster, WorkerSpec, python};
use s3_support::{ACCESS_KEY, S3Server, SECRET_KEY};
use serde_json::Value;
use solidflow::conformance::executor::Outcome;

/// Steps that succeed in the failing first run, and must not run again.
const REUSED: [&str; 3] = ["load.compute", "square.compute", "count.compute"];

struct World {
    tmp: tempfile::TempDir,
}

impl World {
    fn new() -> Self {
        Self {
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn command(&self, bin: &str) -> Command {
        let mut cmd = Command::new(common::example_bin(bin));
        cmd.env("SOLIDFLOW_HOME", self.tmp.path().join("home"))
            .env("SOLIDFLOW_PYTHON", python())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("NO_COLOR", "1")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Outcome {
        self.run_bin("reexecution", args)
    }

    fn run_bin(&self, bin: &str, args: &[&str]) -> Outcome {
        let started = Instant::now();
        let out = self.command(bin).args(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stdout = if args.contains(&"--json") {
            stdout
        } else {
            String::new()
        };
        Outcome::new(
            out.status.code(),
            stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
            started.elapsed(),
        )
    }

    fn runs(&self) -> Vec<Value> {
        let out = self.run(&["runs", "--json", "--limit", "100"]);
        assert_eq!(out.code, Some(0), "{}", out.describe());
        out.events
    }
}

fn run_id(out: &Outcome) -> String {
    out.of_type("PIPELINE_START")
        .next()
        .expect("PIPELINE_START")["run_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The first run fails in `publish`; returns its run id.
fn failing_run(world: &World, config: &Path) -> String {
    let failing = world.file("fail.yaml", "solids: {publish: {config: {fail: true}}}");
    let out = world.run(&[
        "execute",
        "recover",
        "--json",
        "--tag",
        "team=ml",
        "-c",
        config.to_str().unwrap(),
        "-c",
        failing.to_str().unwrap(),
    ]);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert_eq!(
        out.of_type("STEP_FAILURE").next().expect("publish fails")["step_key"],
        "publish.compute"
    );
    run_id(&out)
}

/// Re-executes `parent` from failure with the fix and checks everything the issue asks.
fn resume_and_check(world: &World, parent: &str, extra: &[&str]) -> Outcome {
    let fix = world.file("fix.yaml", "solids: {publish: {config: {fail: false}}}");
    let mut args = vec![
        "reexecute",
        parent,
        "--from-failure",
        "--json",
        "-c",
        fix.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = world.run(&args);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let started: Vec<&str> = out
        .of_type("STEP_START")
        .map(|e| e["step_key"].as_str().unwrap())
        .collect();
    assert_eq!(
        started,
        ["publish.compute", "report.compute"],
        "{}",
        out.describe()
    );
    for step in REUSED {
        assert!(!started.contains(&step), "{step} ran again");
    }
    let input = |step: &str, name: &str| -> Value {
        out.of_type("STEP_INPUT")
            .find(|e| e["step_key"] == step && e["data"]["input"] == name)
            .unwrap_or_else(|| panic!("no STEP_INPUT {step}.{name}: {}", out.describe()))["data"]
            .clone()
    };
    assert_eq!(input("publish.compute", "squares")["source_run_id"], parent);
    assert_eq!(input("report.compute", "count")["source_run_id"], parent);
    assert!(
        input("report.compute", "total")
            .get("source_run_id")
            .is_none()
    );
    assert!(
        out.of_type("LOG_MESSAGE")
            .any(|e| e["message"] == "published total=385 of count=10"),
        "{}",
        out.describe()
    );
    let child = run_id(&out);
    let runs = world.runs();
    let record = runs.iter().find(|r| r["run_id"] == child.as_str()).unwrap();
    assert_eq!(record["status"], "SUCCESS");
    assert_eq!(record["parent_run_id"], parent);
    assert_eq!(record["root_run_id"], parent);
    out
}

#[test]
fn from_failure_on_in_process_and_filesystem_reuses_the_succeeded_steps() {
    let world = World::new();
    let config = world.file(
        "fs.yaml",
        "storage: {filesystem: {}}\nexecution: {in_process: {}}",
    );
    let parent = failing_run(&world, &config);
    let out = resume_and_check(&world, &parent, &["--tag", "attempt=2"]);

    // Lineage: re-executing the child again finds the grandparent's outputs.
    let child = run_id(&out);
    let again = world.run(&["reexecute", &child, "--select", "report", "--json"]);
    assert_eq!(again.code, Some(0), "{}", again.describe());
    let count = again
        .of_type("STEP_INPUT")
        .find(|e| e["data"]["input"] == "count")
        .unwrap();
    assert_eq!(
        count["data"]["source_run_id"],
        parent.as_str(),
        "count came from the root"
    );
    let total = again
        .of_type("STEP_INPUT")
        .find(|e| e["data"]["input"] == "total")
        .unwrap();
    assert_eq!(total["data"]["source_run_id"], child.as_str());
    let runs = world.runs();
    let grandchild = runs.iter().find(|r| r["run_id"] == run_id(&again)).unwrap();
    assert_eq!(grandchild["parent_run_id"], child.as_str());
    assert_eq!(grandchild["root_run_id"], parent.as_str());

    // Tags are recorded, shown and filtered on.
    let tagged = world.run(&["runs", "--json", "--tag", "attempt=2"]);
    assert_eq!(tagged.events.len(), 1, "{}", tagged.describe());
    assert_eq!(tagged.events[0]["tags"]["attempt"], "2");
    let failed = world.run(&[
        "runs",
        "--json",
        "--status",
        "failure",
        "--pipeline",
        "recover",
    ]);
    assert_eq!(failed.events.len(), 1);
    assert_eq!(failed.events[0]["run_id"], parent.as_str());
    assert_eq!(failed.events[0]["tags"]["team"], "ml");
    let text = world
        .command("reexecution")
        .args(["runs"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("parent={parent}")), "{text}");
    assert!(text.contains("tags: team=ml"), "{text}");
}

#[test]
fn from_failure_on_multiprocess_and_filesystem_reuses_the_succeeded_steps() {
    let world = World::new();
    let config = world.file(
        "mp.yaml",
        "storage: {filesystem: {}}\nexecution: {multiprocess: {}}",
    );
    let parent = failing_run(&world, &config);
    let out = resume_and_check(&world, &parent, &[]);
    let start = out.of_type("PIPELINE_START").next().unwrap();
    assert_eq!(start["data"]["executor"], "multiprocess");
    // The inputs were read by the step processes, not by the parent.
    let input = out.of_type("STEP_INPUT").next().unwrap();
    assert_ne!(input["pid"], start["pid"], "{}", out.describe());
}

#[test]
fn from_failure_on_dask_and_s3_reuses_the_succeeded_steps() {
    let server = S3Server::start();
    server.create_bucket("recovery");
    let cluster = DaskCluster::start(&[WorkerSpec::plain("w1"), WorkerSpec::plain("w2")]);
    let world = World::new();
    let config = world.file(
        "dask.yaml",
        &format!(
            "storage: {{s3: {{config: {{s3_bucket: recovery, endpoint_url: '{}', allow_http: true}}}}}}\n\
             execution: {{dask: {{config: {{address: '{}', forward_env: [AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY]}}}}}}\n",
            server.endpoint(),
            cluster.address
        ),
    );
    let parent = failing_run(&world, &config);
    let out = resume_and_check(&world, &parent, &[]);
    let start = out.of_type("PIPELINE_START").next().unwrap();
    assert_eq!(start["data"]["executor"], "dask");
    assert_eq!(start["data"]["storage"], "s3");
    let output = out
        .of_type("STEP_OUTPUT")
        .find(|e| e["step_key"] == "publish.compute")
        .unwrap();
    let child = run_id(&out);
    assert_eq!(
        output["data"]["location"],
        format!("s3://recovery/solidflow/{child}/intermediates/publish.compute/result")
    );
    assert!(
        out.of_type("STEP_INPUT").all(|e| e["worker"].is_string()),
        "inputs were read on Dask workers: {}",
        out.describe()
    );
}

/// The command line of process `pid`, with spaces between arguments.
fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Step processes (`<binary> step`) among the descendants of `roots`.
fn step_processes(roots: &[u32]) -> Vec<u32> {
    roots
        .iter()
        .flat_map(|&r| dask_support::descendants(r))
        .filter(|&p| cmdline(p).contains("reexecution step"))
        .collect()
}

/// Starts a run whose `publish` waits for a file, SIGKILLs the pipeline process while
/// it waits, checks that the run shows as FAILURE and that no process of it keeps
/// running, then resumes it from failure.
fn kill_mid_run_and_resume(world: &World, storage_and_execution: &str, workers: &[u32]) {
    let go = world.tmp.path().join("go");
    let config = world.file(
        "wait.yaml",
        &format!(
            "{storage_and_execution}\nsolids: {{publish: {{config: {{wait_for: '{}'}}}}}}",
            go.display()
        ),
    );
    let mut child = world
        .command("reexecution")
        .args(["execute", "recover", "--json", "-c"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut parent = None;
    for line in lines.by_ref() {
        let event: Value = serde_json::from_str(&line.unwrap()).unwrap();
        parent.get_or_insert_with(|| event["run_id"].as_str().unwrap().to_string());
        if event["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("waiting for"))
        {
            break;
        }
    }
    let parent = parent.expect("the run started");
    // History is written in batches: kill once it holds the step's start.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !world
        .run(&["logs", &parent, "--json"])
        .of_type("LOG_MESSAGE")
        .any(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("waiting for"))
        })
    {
        assert!(
            Instant::now() < deadline,
            "the step's log never reached run history"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Everything the run started: step processes (here or under the Dask workers) and
    // any helper (the Dask bridge).
    let mut spawned = dask_support::descendants(child.id());
    spawned.extend(step_processes(workers));
    assert!(
        !step_processes(&[&[child.id()], workers].concat()).is_empty(),
        "a step process runs"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let alive: Vec<String> = spawned
            .iter()
            .filter(|&&p| dask_support::pid_alive(p))
            .map(|&p| format!("{p}: {}", cmdline(p)))
            .collect();
        if alive.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "outlived the killed run: {alive:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let runs = world.runs();
    let run = runs
        .iter()
        .find(|r| r["run_id"] == parent.as_str())
        .unwrap();
    assert_eq!(run["status"], "FAILURE", "{run}");
    let logs = world.run(&["logs", &parent, "--json"]);
    let engine = logs
        .of_type("ENGINE_EVENT")
        .find(|e| e["data"]["details"]["reason"] == "run_process_died")
        .unwrap_or_else(|| panic!("{}", logs.describe()));
    let message = engine["message"].as_str().unwrap();
    assert!(
        message.contains("is gone") && message.contains("last seen alive at"),
        "{message}"
    );
    assert_eq!(
        engine["data"]["details"]["steps_cut_off"],
        serde_json::json!(["publish.compute"])
    );

    std::fs::write(&go, "").unwrap();
    resume_and_check(world, &parent, &[]);
}

#[test]
fn a_multiprocess_run_killed_with_sigkill_is_shown_as_failure_and_resumed() {
    let world = World::new();
    kill_mid_run_and_resume(
        &world,
        "storage: {filesystem: {}}\nexecution: {multiprocess: {}}",
        &[],
    );
}

#[test]
fn a_dask_run_killed_with_sigkill_leaves_no_task_running_and_is_resumed() {
    let server = S3Server::start();
    server.create_bucket("recovery");
    let cluster = DaskCluster::start(&[WorkerSpec::plain("w1")]);
    let world = World::new();
    let config = format!(
        "storage: {{s3: {{config: {{s3_bucket: recovery, endpoint_url: '{}', allow_http: true}}}}}}\n\
         execution: {{dask: {{config: {{address: '{}', forward_env: [AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY]}}}}}}",
        server.endpoint(),
        cluster.address
    );
    kill_mid_run_and_resume(&world, &config, &cluster.pids());
}

#[test]
fn bad_input_is_refused_with_exit_2_and_nothing_recorded() {
    let world = World::new();
    let fs = world.file("fs.yaml", "storage: {filesystem: {}}");
    let parent = failing_run(&world, &fs);
    let recorded = world.runs().len();
    let refused = |args: &[&str], expected: &str| {
        let out = world.run(args);
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.describe());
        assert!(
            out.stderr.contains(expected),
            "{args:?}: missing {expected:?} in {}",
            out.stderr
        );
        assert_eq!(world.runs().len(), recorded, "{args:?} recorded a run");
    };
    refused(
        &["reexecute", "no-such-run", "--from-failure"],
        "no run `no-such-run` in run history",
    );
    refused(
        &["reexecute", &parent, "--select", "load,publsh"],
        "step selection `load,publsh`, column 6: `publsh` matches no step of pipeline `recover`; did you mean `publish`?",
    );
    refused(
        &[
            "execute",
            "recover",
            "-c",
            fs.to_str().unwrap(),
            "--select",
            "publish",
        ],
        "input `squares` of publish.compute comes from square.compute.result, which is not selected",
    );
    refused(
        &["reexecute", &parent, "--from-failure", "--run-id", &parent],
        &format!("run id `{parent}` is already used by a FAILURE run of pipeline `recover`"),
    );
    refused(
        &["execute", "recover", "--run-id", &parent],
        &format!("run id `{parent}` is already used"),
    );

    // A parent on in_memory storage.
    let memory = world.run(&["execute", "recover", "--json"]);
    let in_memory = run_id(&memory);
    let recorded = world.runs().len();
    let out = world.run(&["reexecute", &in_memory, "--from-failure"]);
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("used `in_memory` storage") && out.stderr.contains("filesystem or s3"),
        "{}",
        out.stderr
    );
    assert_eq!(world.runs().len(), recorded);

    // A parent of another pipeline (hello_world's, in the same history).
    let hello = world.run_bin("hello_world", &["execute", "dask_pipeline", "--json"]);
    let other = run_id(&hello);
    let recorded = world.runs().len();
    let out = world.run(&["reexecute", &other]);
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("is a run of pipeline `dask_pipeline`"),
        "{}",
        out.stderr
    );
    assert_eq!(world.runs().len(), recorded);

    // Deleted intermediates: fails before any step, naming the missing key.
    let storage = world.tmp.path().join("home/storage").join(&parent);
    std::fs::remove_dir_all(&storage).unwrap();
    let out = world.run(&["reexecute", &parent, "--from-failure"]);
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(
        out.stderr.contains(&format!(
            "output `result` of step square.compute from run {parent} is missing at"
        )),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("STEP_START"), "{}", out.stderr);
    assert_eq!(world.runs().len(), recorded);
}
