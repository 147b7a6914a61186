//! The seed's distributed picture, end to end: steps in separate processes (multiprocess)
//! and on Dask workers (a local cluster, and real `dask scheduler` + `dask worker`
//! processes at an address that looks remote), handing values to each other through S3
//! intermediate storage on a real, signature-checking S3 server (s3s-fs).
//!
//! Each test runs the conformance binary's `success` pipeline through its CLI
//! (`numbers` → `sum_evens`, `sum_odds` → `total`, which logs `total=55`), so the total is
//! right only if downstream steps, in other processes, read their upstream's objects back
//! from the bucket. The credentials are given the standard way, as `AWS_ACCESS_KEY_ID` /
//! `AWS_SECRET_ACCESS_KEY` in the environment of the pipeline process, which its step
//! processes, the Dask bridge and a local cluster's workers inherit. Workers of an
//! existing cluster hold their own credentials, as worker machines do. Nothing that the
//! run prints or keeps (events, stderr, step logs, run history, Dask logs) may contain
//! them.
//!
//! Needs `scripts/s3-server.sh` and `scripts/python-env.sh` (or `SOLIDFLOW_S3S_FS` /
//! `SOLIDFLOW_PYTHON`); without them the tests fail and say which to run.
//!
//! Run: `cargo test --test s3_distributed`.

#[path = "support/dask.rs"]
mod dask_support;
#[path = "support/s3.rs"]
mod s3_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use dask_support::{DaskCluster, WorkerSpec, python};
use s3_support::{ACCESS_KEY, S3Server, SECRET_KEY};
use serde_json::Value;
use solidflow::conformance::executor::Outcome;
use solidflow::storage::{IntermediateStorage, S3Storage};

const BUCKET: &str = "distributed";
const PREFIX: &str = "team/runs";
const STEPS: [&str; 4] = ["numbers", "sum_evens", "sum_odds", "total"];

/// One test's S3 server, bucket and private solidflow home.
struct World {
    server: S3Server,
    tmp: tempfile::TempDir,
}

impl World {
    fn new() -> Self {
        let server = S3Server::start();
        server.create_bucket(BUCKET);
        Self {
            server,
            tmp: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn home(&self) -> PathBuf {
        self.tmp.path().join("home")
    }

    /// Runs `conformance execute success --json` with S3 storage and `execution`, the
    /// credentials in the pipeline process's environment only.
    fn run(&self, execution: &str) -> Outcome {
        let config = self.tmp.path().join("run.yaml");
        std::fs::write(
            &config,
            format!(
                "storage: {{s3: {{config: {{s3_bucket: {BUCKET}, s3_prefix: '{PREFIX}', endpoint_url: '{}', allow_http: true}}}}}}\n\
                 execution: {execution}\n",
                self.server.endpoint()
            ),
        )
        .unwrap();
        let started = std::time::Instant::now();
        let mut command = Command::new(env!("CARGO_BIN_EXE_conformance"));
        command.env("AWS_EC2_METADATA_DISABLED", "true");
        for var in [
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
        ] {
            command.env_remove(var);
        }
        let output = command
            .args(["execute", "success", "--json", "-c"])
            .arg(&config)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("SOLIDFLOW_HOME", self.home())
            .env("SOLIDFLOW_PYTHON", python())
            .env("NO_COLOR", "1")
            .current_dir(self.tmp.path())
            .stdin(Stdio::null())
            .output()
            .expect("start the conformance binary");
        Outcome::new(
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
            started.elapsed(),
        )
    }

    /// Checks what every distributed run on S3 must show, and returns the run id.
    fn check(&self, out: &Outcome, executor: &str) -> String {
        assert_eq!(out.code, Some(0), "{}", out.describe());
        let start = out
            .of_type("PIPELINE_START")
            .next()
            .expect("PIPELINE_START");
        assert_eq!(start["data"]["executor"], executor, "{}", out.describe());
        assert_eq!(start["data"]["storage"], "s3", "{}", out.describe());
        let run_id = start["run_id"].as_str().unwrap().to_string();
        let parent = start["pid"].clone();

        // Every output went to the bucket, under the prefix and the run.
        for step in STEPS {
            let key = format!("{step}.compute");
            let outputs: Vec<&Value> = out
                .of_type("STEP_OUTPUT")
                .filter(|e| e["step_key"] == key.as_str())
                .collect();
            assert_eq!(outputs.len(), 1, "{key}: {}", out.describe());
            assert_eq!(
                outputs[0]["data"]["location"],
                format!("s3://{BUCKET}/{PREFIX}/{run_id}/intermediates/{key}/result"),
                "{}",
                out.describe()
            );
        }
        // Each step ran in its own process, not in the parent: `total` got both sums from
        // objects that other processes wrote, and `numbers`' list crossed twice.
        let pid_of = |step: &str| {
            out.of_type("STEP_SUCCESS")
                .find(|e| e["step_key"] == format!("{step}.compute").as_str())
                .unwrap_or_else(|| panic!("{step} did not succeed: {}", out.describe()))["pid"]
                .clone()
        };
        let pids: Vec<Value> = STEPS.iter().map(|s| pid_of(s)).collect();
        assert!(
            !pids.contains(&parent),
            "a step ran in the parent: {pids:?}"
        );
        assert_ne!(pids[0], pids[3], "numbers and total shared a process");
        assert!(
            out.events
                .iter()
                .any(|e| e["step_key"] == "total.compute" && e["message"] == "total=55"),
            "the total is wrong or missing: {}",
            out.describe()
        );
        assert!(
            out.of_type("STEP_INPUT")
                .any(|e| e["step_key"] == "total.compute"),
            "{}",
            out.describe()
        );

        // The run's intermediates are listed under the prefix, through the S3 API.
        let mut settings = self.server.config(BUCKET);
        settings.prefix = PREFIX.into();
        let keys = S3Storage::new(settings)
            .unwrap()
            .list_run(&run_id)
            .unwrap_or_else(|e| panic!("list_run: {e}"));
        let listed: Vec<String> = keys
            .iter()
            .map(|k| format!("{}/{}", k.step_key, k.output))
            .collect();
        assert_eq!(
            listed,
            STEPS
                .iter()
                .map(|s| format!("{s}.compute/result"))
                .collect::<Vec<_>>()
        );
        assert!(
            self.server
                .data_dir()
                .join(format!(
                    "{BUCKET}/{PREFIX}/{run_id}/intermediates/total.compute/result"
                ))
                .is_file()
        );

        // Neither the output nor anything the run kept (step logs, run history) shows the
        // credentials.
        assert_no_secrets("stdout (events)", out.stdout.as_bytes());
        assert_no_secrets("stderr", out.stderr.as_bytes());
        for file in files_under(&self.home()) {
            assert_no_secrets(
                &file.display().to_string(),
                &std::fs::read(&file).unwrap_or_default(),
            );
        }
        run_id
    }
}

fn assert_no_secrets(what: &str, bytes: &[u8]) {
    for secret in [SECRET_KEY, ACCESS_KEY] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{what} contains the credential {secret:?}"
        );
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// Steps as separate processes on this machine, sharing nothing but the bucket.
#[test]
fn multiprocess_run_on_s3() {
    let world = World::new();
    let out = world.run("{multiprocess: {config: {max_concurrent: 2}}}");
    world.check(&out, "multiprocess");
}

/// A local Dask cluster created for the run: the credentials reach the step processes
/// through the bridge and the workers, which inherit the pipeline process's environment.
#[test]
fn dask_local_cluster_run_on_s3() {
    let world = World::new();
    let out = world.run("{dask: {config: {n_workers: 2, threads_per_worker: 1}}}");
    world.check(&out, "dask");
    for step in STEPS {
        let success = out
            .of_type("STEP_SUCCESS")
            .find(|e| e["step_key"] == format!("{step}.compute").as_str())
            .unwrap();
        assert!(
            success["worker"]
                .as_str()
                .is_some_and(|w| w.starts_with("tcp://127.0.0.1:")),
            "{step} did not run on a Dask worker: {}",
            out.describe()
        );
    }
}

/// An existing cluster (real `dask scheduler` and two `dask worker` processes, started
/// apart from the pipeline process as on other machines, on loopback). Each worker has
/// the credentials in its own environment, as a worker machine would (or an instance
/// role); the pipeline process needs them for its preflight check.
#[test]
fn dask_external_cluster_run_on_s3() {
    let world = World::new();
    let worker = |name: &str| {
        WorkerSpec::plain(name)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    };
    let cluster = DaskCluster::start(&[worker("w1"), worker("w2")]);
    let out = world.run(&format!(
        "{{dask: {{config: {{address: '{}'}}}}}}",
        cluster.address
    ));
    world.check(&out, "dask");
    let workers = [cluster.worker_address(0), cluster.worker_address(1)];
    for step in STEPS {
        let success = out
            .of_type("STEP_SUCCESS")
            .find(|e| e["step_key"] == format!("{step}.compute").as_str())
            .unwrap();
        assert!(
            workers.contains(&success["worker"].as_str().unwrap_or("")),
            "{step} did not run on the cluster's workers {workers:?}: {}",
            out.describe()
        );
    }
    let engine = out
        .of_type("ENGINE_EVENT")
        .find(|e| e["data"]["details"]["created_cluster"].is_boolean())
        .expect("the executor's connect event");
    assert_eq!(engine["data"]["details"]["created_cluster"], false);
    assert_no_secrets(
        "the Dask scheduler and worker logs",
        cluster.logs().as_bytes(),
    );
}

/// Workers without credentials of their own: `forward_env` names the variables the
/// pipeline process hands to each step process at submit time. The values never enter
/// the config, so run history and events stay free of them (`World::check` reads every
/// file under the home, the history database included).
#[test]
fn dask_forward_env_hands_credentials_to_workers_without_recording_them() {
    let world = World::new();
    let cluster = DaskCluster::start(&[WorkerSpec::plain("w1")]);
    let out = world.run(&format!(
        "{{dask: {{config: {{address: '{}', forward_env: [AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY]}}}}}}",
        cluster.address
    ));
    world.check(&out, "dask");
    assert_no_secrets(
        "the Dask scheduler and worker logs",
        cluster.logs().as_bytes(),
    );
}
