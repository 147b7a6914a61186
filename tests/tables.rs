//! Table intermediates and per-type codecs, end to end through the `tables` example's
//! `readings` pipeline (`readings`: a streamed Arrow `Table`, `calibration`: a `Vec<f64>`,
//! `by_sensor`: reads both and logs `by_sensor rows=4000 sensors=4`) on every executor
//! and storage, including Dask with S3. Where the values are stored, they are read the way
//! users read them: pyarrow (`ipc.open_file`, `feather`) for tables, numpy (`load`,
//! `fromfile(offset=128)`) for vectors, straight from the storage location the run's
//! `STEP_OUTPUT` events name. Also: a re-execution reads a parent's `Vec<f64>` written as
//! MessagePack (by a release before the raw codec), and `logs` prints its log on stdout.
//!
//! Needs `scripts/python-env.sh` (dask, pyarrow, numpy) and, for S3, `scripts/s3-server.sh`
//! (or `SOLIDFLOW_PYTHON` / `SOLIDFLOW_S3S_FS`); without them the tests fail saying so.
//!
//! Run: `cargo build --examples && cargo test --test tables`.

mod common;
#[path = "support/dask.rs"]
mod dask_support;
#[path = "support/s3.rs"]
mod s3_support;

use std::path::Path;
use std::process::Command;

use common::{example, json_lines, run};
use serde_json::Value;

const SUMMARY: &str = "by_sensor rows=4000 sensors=4";

/// One finished `tables execute readings --json` run.
struct Run {
    events: Vec<Value>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn run_id(&self) -> &str {
        self.events[0]["run_id"].as_str().expect("run_id")
    }

    /// The `LOG_MESSAGE` of `by_sensor`.
    fn summary(&self) -> &str {
        self.events
            .iter()
            .filter_map(|e| e["message"].as_str())
            .find(|m| m.starts_with("by_sensor "))
            .unwrap_or_else(|| panic!("no by_sensor log:\n{}\n{}", self.stdout, self.stderr))
    }

    /// The storage location of `step`'s `result` (from its `STEP_OUTPUT` event).
    fn location(&self, step: &str) -> String {
        self.events
            .iter()
            .find(|e| e["event_type"] == "STEP_OUTPUT" && e["step_key"] == step)
            .and_then(|e| e["data"]["location"].as_str())
            .unwrap_or_else(|| panic!("no stored output of {step}:\n{}", self.stdout))
            .to_string()
    }
}

/// Runs `tables <args> --json -c <config>` with `home` as its solidflow home.
fn tables(home: &Path, args: &[&str], config: &str, env: &[(&str, &str)]) -> Run {
    let file = home.join(format!("run-{}.yaml", next_suffix()));
    std::fs::create_dir_all(home).unwrap();
    std::fs::write(&file, config).unwrap();
    let mut cmd = example("tables", home);
    cmd.args(args)
        .args(["--json", "-c"])
        .arg(&file)
        .env("SOLIDFLOW_PYTHON", dask_support::python());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (out, stdout, stderr) = run(&mut cmd);
    assert!(out.status.success(), "run failed:\n{stdout}\n{stderr}");
    Run {
        events: json_lines(&stdout),
        stdout,
        stderr,
    }
}

fn execute(home: &Path, config: &str) -> Run {
    tables(home, &["execute", "readings"], config, &[])
}

fn next_suffix() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed).to_string()
}

/// Runs a Python script with the venv's interpreter; returns its stdout.
fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new(dask_support::python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("start python");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "python failed (pyarrow and numpy come from scripts/python-env.sh):\n{stdout}\n{stderr}"
    );
    stdout
}

/// Reads the three stored values of a filesystem run as users would.
const READ_LOCAL: &str = r#"
import sys
import numpy as np
import pyarrow.feather as feather
import pyarrow.ipc as ipc
readings, calibration, by_sensor = sys.argv[1:4]
table = ipc.open_file(readings).read_all()
print("readings", table.num_rows, table.schema.names, ipc.open_file(readings).num_record_batches)
print("calibration", np.load(calibration).tolist(), np.fromfile(calibration, dtype="<f8", offset=128).tolist())
summary = feather.read_table(by_sensor).to_pydict()
print("by_sensor", summary["sensor"], summary["readings"], summary["mean_celsius"])
"#;

const EXPECTED_LOCAL: &str = "readings 4000 ['sensor', 'celsius'] 4\n\
calibration [0.5, -0.25, 0.0, 1.0] [0.5, -0.25, 0.0, 1.0]\n\
by_sensor ['east', 'north', 'south', 'west'] [1000, 1000, 1000, 1000] [9.25, 9.5, 10.0, 11.5]\n";

fn read_local(run: &Run) -> String {
    let paths: Vec<String> = ["readings", "calibration", "by_sensor"]
        .iter()
        .map(|s| run.location(&format!("{s}.compute")))
        .collect();
    let args: Vec<&str> = paths.iter().map(String::as_str).collect();
    python(READ_LOCAL, &args)
}

#[test]
fn in_process_in_memory_shares_a_streamed_table_between_readers() {
    let dir = tempfile::tempdir().unwrap();
    let run = execute(dir.path(), "{}");
    assert_eq!(run.summary(), SUMMARY);
}

#[test]
fn in_process_filesystem_stores_arrow_and_npy_that_pyarrow_and_numpy_read() {
    let dir = tempfile::tempdir().unwrap();
    let run = execute(dir.path(), "storage: {filesystem: {}}");
    assert_eq!(run.summary(), SUMMARY);
    assert_eq!(read_local(&run), EXPECTED_LOCAL);
}

#[test]
fn multiprocess_passes_tables_and_vectors_between_processes() {
    let dir = tempfile::tempdir().unwrap();
    let run = execute(
        dir.path(),
        "storage: {filesystem: {}}\nexecution: {multiprocess: {}}",
    );
    assert_eq!(run.summary(), SUMMARY);
    assert_eq!(read_local(&run), EXPECTED_LOCAL);
}

#[test]
fn dask_passes_tables_and_vectors_between_workers() {
    let dir = tempfile::tempdir().unwrap();
    let run = execute(
        dir.path(),
        "storage: {filesystem: {}}\nexecution: {dask: {}}",
    );
    assert_eq!(run.summary(), SUMMARY);
    assert_eq!(read_local(&run), EXPECTED_LOCAL);
}

#[test]
fn dask_with_s3_streams_tables_through_the_bucket_and_pyarrow_reads_them_there() {
    let server = s3_support::S3Server::start();
    server.create_bucket("tables");
    let dir = tempfile::tempdir().unwrap();
    // 40 batches of 20,000 rows (~14 MB): several 5 MiB parts of a multipart upload.
    let config = format!(
        "storage: {{s3: {{config: {{s3_bucket: tables, endpoint_url: '{}', allow_http: true, part_size_mb: 5}}}}}}\n\
         execution: {{dask: {{}}}}\n\
         solids: {{readings: {{config: {{batches: 40, rows_per_batch: 20000}}}}}}\n",
        server.endpoint()
    );
    let run = tables(
        dir.path(),
        &["execute", "readings"],
        &config,
        &[
            ("AWS_ACCESS_KEY_ID", s3_support::ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", s3_support::SECRET_KEY),
        ],
    );
    assert_eq!(run.summary(), "by_sensor rows=800000 sensors=4");
    let bytes = |step: &str| {
        run.events
            .iter()
            .find(|e| e["event_type"] == "STEP_OUTPUT" && e["step_key"] == step)
            .and_then(|e| e["data"]["bytes"].as_u64())
            .unwrap()
    };
    assert!(
        bytes("readings.compute") > 10 * 1024 * 1024,
        "a multipart table"
    );
    assert_eq!(bytes("calibration.compute"), 128 + 4 * 8);
    let readings = run.location("readings.compute");
    let calibration = run.location("calibration.compute");
    let script = r#"
import sys
import numpy as np
import pyarrow.fs as fs
import pyarrow.ipc as ipc
endpoint, key, secret, readings, calibration = sys.argv[1:6]
s3 = fs.S3FileSystem(access_key=key, secret_key=secret, endpoint_override=endpoint, scheme="http", region="us-east-1")
with s3.open_input_file(readings.removeprefix("s3://")) as f:
    table = ipc.open_file(f).read_all()
print(table.num_rows, table.column("sensor")[3])
with s3.open_input_stream(calibration.removeprefix("s3://")) as f:
    print(np.frombuffer(f.read()[128:], dtype="<f8").tolist())
"#;
    let endpoint = server.endpoint();
    let out = python(
        script,
        &[
            endpoint.trim_start_matches("http://"),
            s3_support::ACCESS_KEY,
            s3_support::SECRET_KEY,
            &readings,
            &calibration,
        ],
    );
    assert_eq!(out, "800000 west\n[0.5, -0.25, 0.0, 1.0]\n");
}

#[test]
fn a_reexecution_reads_a_vector_its_parent_stored_as_messagepack() {
    let dir = tempfile::tempdir().unwrap();
    let parent = execute(dir.path(), "storage: {filesystem: {}}");
    // What a release before the raw codec wrote for `calibration`: MessagePack.
    let legacy = rmp_serde::to_vec_named(&vec![10.0f64, 10.0, 10.0, 10.0]).unwrap();
    std::fs::write(parent.location("calibration.compute"), legacy).unwrap();
    let child = tables(
        dir.path(),
        &["reexecute", parent.run_id(), "--select", "by_sensor"],
        "storage: {filesystem: {}}",
        &[],
    );
    assert_eq!(child.summary(), SUMMARY);
    let summary = python(
        "import sys, pyarrow.feather as f; print(f.read_table(sys.argv[1]).column('mean_celsius').to_pylist())",
        &[&child.location("by_sensor.compute")],
    );
    // Each sensor's mean reading (east, north, south, west) plus the parent's offset of 10.
    assert_eq!(summary, "[19.5, 19.0, 20.0, 20.5]\n");
}

#[test]
fn logs_prints_the_human_log_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let run = execute(dir.path(), "storage: {filesystem: {}}");
    let (out, stdout, stderr) =
        common::run(example("tables", dir.path()).args(["logs", run.run_id()]));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains(run.run_id()), "the run line:\n{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("LOG_MESSAGE") && l.contains(SUMMARY)),
        "`logs RUN | grep` finds the log:\n{stdout}"
    );
    assert!(
        !stderr.contains(SUMMARY),
        "nothing of the log on stderr:\n{stderr}"
    );
    // `execute` keeps stdout for results: its human log is on stderr.
    let (out, stdout, stderr) =
        common::run(example("tables", dir.path()).args(["execute", "readings"]));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(SUMMARY) && !stdout.contains(SUMMARY),
        "{stdout}\n{stderr}"
    );
}
