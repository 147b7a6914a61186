//! S3 storage under faults (issue 10, items 11 and 17), against a real s3s-fs server.
//!
//! - Without credentials and with the instance metadata service turned off
//!   (`AWS_EC2_METADATA_DISABLED=true`, or `instance_metadata: false` in run config), the
//!   run fails with the missing-credentials hint and nothing is contacted. The metadata
//!   endpoint is pointed (`AWS_METADATA_ENDPOINT`) at a loopback listener that counts
//!   connections, so the test sees any attempt while never leaving 127.0.0.1.
//! - With the default retry settings, an 8 s outage of the S3 server (stopped, then
//!   restarted on the same port) in the middle of a write is survived.
//!
//! Needs `scripts/s3-server.sh` (or `SOLIDFLOW_S3S_FS`); without it the tests fail and
//! say so.
//!
//! Run: `cargo test --test faults_s3 -- --test-threads=2`.

#[path = "support/s3.rs"]
mod s3_support;

use std::net::TcpListener;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use s3_support::{ACCESS_KEY, S3Server, SECRET_KEY};
use solidflow::conformance::executor::{LiveRun, Outcome};

const BUCKET: &str = "faults";

/// A loopback listener standing in for the instance metadata service: it counts
/// connections and closes each at once.
struct FakeMetadata {
    endpoint: String,
    connections: Arc<AtomicUsize>,
}

impl FakeMetadata {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = connections.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                seen.fetch_add(1, Ordering::SeqCst);
                drop(conn);
            }
        });
        Self {
            endpoint,
            connections,
        }
    }
}

/// `faults execute write_big --json` in-process with S3 storage on `server`.
fn command(tmp: &tempfile::TempDir, server: &S3Server, s3_extra: &str, solid: &str) -> Command {
    let config = tmp.path().join("run.yaml");
    std::fs::write(
        &config,
        format!(
            "execution: {{in_process: {{}}}}\n\
             storage: {{s3: {{config: {{s3_bucket: {BUCKET}, endpoint_url: '{}', allow_http: true{s3_extra}}}}}}}\n\
             solids: {{big_value: {{config: {solid}}}}}\n",
            server.endpoint()
        ),
    )
    .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_faults"));
    command
        .args(["execute", "write_big", "--json", "-c"])
        .arg(&config)
        .env("SOLIDFLOW_HOME", tmp.path().join("home"))
        .env("SF_FAULTS_DIR", tmp.path());
    // No credentials from anywhere: environment, profile files, web identity, containers.
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ] {
        command.env_remove(var);
    }
    command
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            tmp.path().join("no-credentials"),
        )
        .env("AWS_CONFIG_FILE", tmp.path().join("no-config"))
        .env("HOME", tmp.path());
    command
}

fn no_credentials_fail_without_contacting_metadata(s3_extra: &str, env_disabled: bool) {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let metadata = FakeMetadata::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = command(&tmp, &server, s3_extra, "{mib: 1}");
    cmd.env("AWS_METADATA_ENDPOINT", &metadata.endpoint);
    if env_disabled {
        cmd.env("AWS_EC2_METADATA_DISABLED", "true");
    } else {
        cmd.env_remove("AWS_EC2_METADATA_DISABLED");
    }
    let output = cmd.output().expect("run faults");
    let out = Outcome::new(
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        Duration::ZERO,
    );
    assert_ne!(out.code, Some(0), "{}", out.describe());
    let text = out.failure_text();
    assert!(
        text.contains("found no AWS credentials for bucket faults")
            && text.contains("AWS_EC2_METADATA_DISABLED=true or instance_metadata: false")
            && text.contains("set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE"),
        "{}",
        out.describe()
    );
    assert_eq!(
        metadata.connections.load(Ordering::SeqCst),
        0,
        "the instance metadata endpoint was contacted: {}",
        out.describe()
    );
}

#[test]
fn missing_credentials_with_metadata_disabled_by_env_make_no_network_attempt() {
    no_credentials_fail_without_contacting_metadata("", true);
}

#[test]
fn missing_credentials_with_instance_metadata_false_make_no_network_attempt() {
    no_credentials_fail_without_contacting_metadata(", instance_metadata: false", false);
}

/// Item 11: the S3 server is stopped for 8 s while a value is being written, then
/// restarted on the same port; with the default retries the run succeeds and the value
/// reads back whole.
#[test]
fn an_eight_second_s3_outage_during_a_write_is_survived_with_the_defaults() {
    let mut server = S3Server::start();
    server.create_bucket(BUCKET);
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = command(&tmp, &server, "", "{mib: 1, wait_for_go: true}");
    cmd.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    let mut run = LiveRun::start(cmd);
    run.wait_log("ready");
    server.stop();
    std::fs::write(tmp.path().join("go"), "go").unwrap();
    // The outage: the write starts against a stopped server and retries meanwhile.
    std::thread::sleep(Duration::from_secs(8));
    server.restart();
    let out = run.finish();
    assert_eq!(
        out.code,
        Some(0),
        "{}\nS3 server log:\n{}",
        out.describe(),
        server.log()
    );
    assert!(
        out.of_type("LOG_MESSAGE")
            .any(|e| e["message"] == format!("read {} bytes", 1 << 20)),
        "{}",
        out.describe()
    );
}
