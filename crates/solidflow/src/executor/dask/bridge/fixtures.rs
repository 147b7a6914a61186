//! The bridge protocol against its golden examples, `tests/fixtures/protocol/*.jsonl`,
//! which the bridge's pytest suite checks too: what this client sends is exactly the
//! requests there, and every message there parses and keeps its content.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::messages::parse_message;
use super::{
    ClusterKind, ClusterSpec, ConnectRequest, Request, SubmitRequest, TlsConfig, WorkerResources,
};

/// The lines of a fixture file, parsed.
pub(crate) fn fixture(name: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/protocol")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

fn without_id(mut value: Value) -> Value {
    if let Value::Object(map) = &mut value {
        map.remove("id");
    }
    value
}

#[test]
fn requests_are_what_the_fixtures_say() {
    let connect_local = ConnectRequest {
        timeout: Some(30.0),
        n_workers: Some(2),
        threads_per_worker: Some(1),
        memory_limit: Some("4GiB".into()),
        worker_resources: Some(WorkerResources::Uniform(BTreeMap::from([(
            "GPU".into(),
            1.0,
        )]))),
        allowed_failures: Some(3),
        ..Default::default()
    };
    let connect_tls = ConnectRequest {
        address: Some("tls://10.0.0.5:8786".into()),
        timeout: Some(10.0),
        tls: Some(TlsConfig {
            ca_file: Some("/certs/ca.pem".into()),
            cert: Some("/certs/client.pem".into()),
            key: Some("/certs/client.key".into()),
        }),
        cluster: Some(ClusterSpec {
            kind: ClusterKind::Existing,
            options: Default::default(),
            adapt: None,
        }),
        allowed_failures: Some(0),
        wait_for_workers: Some(1),
        ..Default::default()
    };
    let key = "train.compute-0ebb33c2-a1".to_string();
    let mut submit = SubmitRequest::new(
        key.clone(),
        vec!["/usr/local/bin/pipeline".into(), "step".into()],
        "solidflow-0ebb33c2",
    );
    submit.stdin = r#"{"protocol":1}"#.into();
    submit.env = BTreeMap::from([("RUST_LOG".into(), "info".into())]);
    submit.cwd = Some("/work".into());
    submit.resources = BTreeMap::from([("GPU".into(), 1.0)]);
    submit.priority = 3;
    submit.log_files = BTreeMap::from([
        (
            "stdout".into(),
            PathBuf::from("/home/me/.solidflow/logs/0ebb33c2/train.compute.stdout.jsonl"),
        ),
        (
            "stderr".into(),
            PathBuf::from("/home/me/.solidflow/logs/0ebb33c2/train.compute.stderr.log"),
        ),
    ]);
    submit.parent_pid_env = Some("SOLIDFLOW_PARENT_PID".into());
    let mut ahead = SubmitRequest::new(
        "evaluate.compute-0ebb33c2-a1",
        vec!["/usr/local/bin/pipeline".into(), "step".into()],
        "solidflow-0ebb33c2",
    );
    ahead.stdin = r#"{"protocol":1}"#.into();
    ahead.priority = 2;
    ahead.after = vec![key.clone()];
    let keys = [key];
    let binary = Path::new("/usr/local/bin/pipeline");
    let ours = [
        Request::Connect(&connect_local),
        Request::Connect(&connect_tls),
        Request::Submit(&submit),
        Request::Submit(&ahead),
        Request::Cancel {
            keys: &keys,
            grace: 2.0,
        },
        Request::Release { keys: &keys },
        Request::UploadBinary {
            path: binary,
            sha256: None,
            keep: 3,
        },
        Request::Shutdown,
    ];
    let golden = fixture("bridge-requests.jsonl");
    assert_eq!(ours.len(), golden.len());
    for (request, golden) in ours.iter().zip(golden) {
        assert_eq!(request.to_value(), without_id(golden), "{request:?}");
    }
}

#[test]
fn every_fixture_message_parses_and_keeps_its_content() {
    for golden in fixture("bridge-messages.jsonl") {
        let line = golden.to_string();
        let (id, message) = parse_message(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(id, golden.get("id").and_then(Value::as_u64));
        let ours = serde_json::to_value(&message).unwrap();
        // Everything in the fixture survives; what we add is only empty defaults.
        for (field, value) in golden.as_object().unwrap() {
            if field != "id" {
                assert_eq!(ours.get(field), Some(value), "{field} of {line}");
            }
        }
        for (field, value) in ours.as_object().unwrap() {
            if golden.get(field).is_none() {
                assert!(
                    value.is_null() || value == &Value::Object(Default::default()),
                    "{field} added to {line}"
                );
            }
        }
    }
}

#[test]
fn every_fixture_reason_and_error_kind_is_a_known_code() {
    use super::{ErrorKind, FailureReason};
    for golden in fixture("bridge-messages.jsonl") {
        let (_, message) = parse_message(&golden.to_string()).unwrap();
        match message {
            super::BridgeMessage::Failed(f) => {
                assert_ne!(f.reason, FailureReason::Other, "{golden}")
            }
            super::BridgeMessage::Error { kind, .. } => {
                assert_ne!(kind, ErrorKind::Other, "{golden}")
            }
            _ => {}
        }
    }
}
