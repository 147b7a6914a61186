//! The Dask executor against a TLS-only Dask cluster: real `dask scheduler --protocol tls`
//! and `dask worker` processes on 127.0.0.1, with a throwaway CA and server and client
//! certificates made by the `openssl` command at test time (the test fails, naming the
//! fix, when `openssl` or the venv from `scripts/python-env.sh` is missing; it never
//! skips).
//!
//! The conformance binary's `success` pipeline runs through its CLI with `--json` and
//! `execution: {dask: {config: {address: tls://..., tls: {ca_file, cert, key}}}}`, and
//! must run every step on the TLS worker. Without the `tls:` block, or with a CA that did
//! not sign the cluster's certificates, the run must fail quickly and say why.
//!
//! Run: `cargo test --test dask_tls`.

#[path = "support/dask.rs"]
mod dask_support;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dask_support::{DaskCluster, TlsFiles, WorkerSpec, python};
use solidflow::conformance::executor::Outcome;

const STEPS: [&str; 4] = ["numbers", "sum_evens", "sum_odds", "total"];

/// How long one run may take before it is killed and the test fails.
const RUN_DEADLINE: Duration = Duration::from_secs(60);

/// Runs `conformance execute success --json` with filesystem storage and `execution`,
/// killing it after [`RUN_DEADLINE`].
fn run(dir: &Path, name: &str, execution: &str) -> Outcome {
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &config,
        format!("storage: {{filesystem: {{}}}}\nexecution: {execution}\n"),
    )
    .unwrap();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_conformance"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .args(["execute", "success", "--json", "-c"])
        .arg(&config)
        .env("SOLIDFLOW_HOME", dir.join("home"))
        .env("SOLIDFLOW_PYTHON", python())
        .env("NO_COLOR", "1")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the conformance binary");
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            s
        })
    };
    let stdout = read(Box::new(child.stdout.take().unwrap()));
    let stderr = read(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the conformance binary") {
            break status;
        }
        if started.elapsed() > RUN_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`conformance execute success` ({name}) did not finish within {RUN_DEADLINE:?}; stderr:\n{}",
                stderr.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    let stdout = stdout.join().unwrap_or_default();
    Outcome::new(
        status.code(),
        stdout,
        stderr.join().unwrap_or_default(),
        elapsed,
    )
}

fn yaml_path(path: &Path) -> String {
    let s = path.to_str().expect("UTF-8 temp path");
    assert!(!s.contains('\''), "unexpected quote in {s}");
    format!("'{s}'")
}

/// One TLS cluster serves every scenario, to keep the file fast on two cores.
#[test]
fn tls_scheduler_end_to_end() {
    let tls = TlsFiles::generate();
    let cluster = DaskCluster::start_tls(&tls, &[WorkerSpec::plain("tls-worker")]);
    let address = cluster.address.clone();
    assert!(address.starts_with("tls://127.0.0.1:"), "{address}");
    let worker = cluster.worker_address(0).to_string();
    assert!(
        worker.starts_with("tls://127.0.0.1:"),
        "the worker does not listen on TLS: {worker}\n{}",
        cluster.logs()
    );
    let dir = tempfile::Builder::new()
        .prefix("solidflow-dask-tls-test-")
        .tempdir()
        .unwrap();

    // 1. With the CA and the client certificate, every step runs on the TLS worker.
    let out = run(
        dir.path(),
        "tls",
        &format!(
            "{{dask: {{config: {{address: '{address}', tls: {{ca_file: {}, cert: {}, key: {}}}}}}}}}",
            yaml_path(&tls.ca_file),
            yaml_path(&tls.client_cert),
            yaml_path(&tls.client_key)
        ),
    );
    let context = || format!("{}\n{}", out.describe(), cluster.logs());
    assert_eq!(out.code, Some(0), "{}", context());
    let start = out
        .of_type("PIPELINE_START")
        .next()
        .unwrap_or_else(|| panic!("no PIPELINE_START: {}", context()));
    assert_eq!(start["data"]["executor"], "dask", "{}", context());
    for step in STEPS {
        let key = format!("{step}.compute");
        let success = out
            .of_type("STEP_SUCCESS")
            .find(|e| e["step_key"] == key.as_str())
            .unwrap_or_else(|| panic!("{key} did not succeed: {}", context()));
        let ran_on = success["worker"].as_str().unwrap_or_default();
        assert!(
            ran_on.starts_with("tls://"),
            "{key} ran on {ran_on:?}, not on a TLS worker: {}",
            context()
        );
        assert_eq!(ran_on, worker, "{key}: {}", context());
    }
    assert!(
        out.events
            .iter()
            .any(|e| e["step_key"] == "total.compute" && e["message"] == "total=55"),
        "the total is wrong or missing: {}",
        context()
    );
    assert!(
        out.of_type("PIPELINE_SUCCESS").next().is_some(),
        "{}",
        context()
    );

    // 2. Without the `tls:` block: a clear, quick failure.
    let out = run(
        dir.path(),
        "no-tls",
        &format!("{{dask: {{config: {{address: '{address}', timeout: 5}}}}}}"),
    );
    assert!(
        matches!(out.code, Some(c) if c != 0),
        "a run without TLS files succeeded against a TLS scheduler: {}",
        out.describe()
    );
    assert!(
        out.elapsed < Duration::from_secs(5 + 10),
        "the run without TLS files took {:?} to fail (timeout 5 s): {}",
        out.elapsed,
        out.describe()
    );
    let text = out.failure_text();
    assert!(
        text.contains(&address),
        "the failure does not name the address: {}",
        out.describe()
    );
    assert!(
        text.contains("TLS") && text.contains("tls: {ca_file, cert, key}"),
        "the failure does not say that TLS files are missing: {}",
        out.describe()
    );
    assert!(
        out.of_type("STEP_START").next().is_none(),
        "{}",
        out.describe()
    );

    // 3. A CA that did not sign the cluster's certificate: refused, and said so.
    let other = TlsFiles::generate();
    let out = run(
        dir.path(),
        "wrong-ca",
        &format!(
            "{{dask: {{config: {{address: '{address}', timeout: 5, tls: {{ca_file: {}, cert: {}, key: {}}}}}}}}}",
            yaml_path(&other.ca_file),
            yaml_path(&other.client_cert),
            yaml_path(&other.client_key)
        ),
    );
    assert!(
        matches!(out.code, Some(c) if c != 0),
        "a run with another CA's certificates succeeded: {}",
        out.describe()
    );
    assert!(
        out.elapsed < Duration::from_secs(5 + 10),
        "the run with the wrong CA took {:?} to fail (timeout 5 s): {}",
        out.elapsed,
        out.describe()
    );
    let text = out.failure_text();
    assert!(
        text.contains(&address) && text.contains("TLS certificate"),
        "the failure does not name the address and the certificate problem: {}",
        out.describe()
    );

    // 4. A certificate file that does not exist: named, with its config path, before
    //    any connection attempt, by `execute` and by `plan` alike (item 7; before:
    //    "scheduler unreachable within 20s").
    let missing = dir.path().join("no-such-client.pem");
    let execution = format!(
        "{{dask: {{config: {{address: '{address}', timeout: 20, tls: {{ca_file: {}, cert: {}, key: {}}}}}}}}}",
        yaml_path(&tls.ca_file),
        yaml_path(&missing),
        yaml_path(&tls.client_key)
    );
    let out = run(dir.path(), "missing-cert", &execution);
    assert!(
        matches!(out.code, Some(c) if c != 0),
        "a run with a missing certificate succeeded: {}",
        out.describe()
    );
    let text = out.failure_text();
    assert!(
        text.contains("execution.dask.config.tls.cert")
            && text.contains(&missing.display().to_string())
            && text.contains("No such file"),
        "the failure does not name the missing certificate: {}",
        out.describe()
    );
    assert!(
        !text.contains("unreachable") && out.elapsed < Duration::from_secs(15),
        "the run tried to connect ({:?}): {}",
        out.elapsed,
        out.describe()
    );
    let config = dir.path().join("missing-cert.yaml");
    let plan = Command::new(env!("CARGO_BIN_EXE_conformance"))
        .args(["plan", "success", "-c"])
        .arg(&config)
        .env("SOLIDFLOW_HOME", dir.path().join("home"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .current_dir(dir.path())
        .output()
        .expect("run conformance plan");
    let stderr = String::from_utf8_lossy(&plan.stderr);
    assert!(
        !plan.status.success()
            && stderr.contains("execution.dask.config.tls.cert")
            && stderr.contains(&missing.display().to_string()),
        "`plan` accepted a missing certificate ({}): {stderr}",
        plan.status
    );
    drop(cluster);
}
