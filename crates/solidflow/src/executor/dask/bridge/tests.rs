//! These run the real bridge against a real LocalCluster. They need the venv
//! made by `scripts/python-env.sh` (or `SOLIDFLOW_PYTHON`) and fail if it is
//! missing.
use super::*;
use tokio::sync::mpsc;

fn python() -> PathBuf {
    let python = std::env::var_os(PYTHON_ENV_VAR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python"));
    assert!(
        python.exists() || python.components().count() == 1,
        "the Dask bridge tests need Python with dask/distributed: {} does not exist. \
         Run scripts/python-env.sh (creates .venv) or set SOLIDFLOW_PYTHON.",
        python.display()
    );
    python
}

fn options() -> BridgeOptions {
    BridgeOptions {
        python: python(),
        ..BridgeOptions::default()
    }
}

async fn next_final(
    rx: &mut mpsc::UnboundedReceiver<BridgeMessage>,
    seen: &mut Vec<BridgeMessage>,
    key: &str,
) -> BridgeMessage {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("timed out waiting for a bridge message")
            .expect("bridge event stream closed");
        let done = msg.key() == Some(key) && msg.is_final();
        seen.push(msg.clone());
        if done {
            return msg;
        }
    }
}

/// Submits one task and waits until the bridge accepted it.
async fn submit(bridge: &Bridge, request: SubmitRequest) {
    for accepted in bridge.submit_many(&[request]).await {
        accepted.expect("the bridge accepts the task");
    }
}

/// Exit code 0 and no signal.
fn succeeded(done: &TaskDone) -> bool {
    done.exit_code == Some(0) && done.signal.is_none()
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_cluster_lines_resources_cancel_shutdown() {
    let (bridge, mut rx) = Bridge::spawn(options()).await.expect("bridge starts");
    assert_eq!(bridge.info().protocol, PROTOCOL_VERSION);
    let connected = bridge
        .connect(&ConnectRequest {
            n_workers: Some(2),
            threads_per_worker: Some(1),
            worker_resources: Some(WorkerResources::PerWorker(vec![
                BTreeMap::from([("GPU".to_string(), 1.0)]),
                BTreeMap::new(),
            ])),
            timeout: Some(60.0),
            ..Default::default()
        })
        .await
        .expect("local cluster starts");
    assert!(connected.created_cluster);
    assert_eq!(connected.workers.len(), 2);
    let gpu = connected
        .workers
        .iter()
        .find(|w| w.resources.contains_key("GPU"))
        .unwrap()
        .address
        .clone();
    let mut seen = Vec::new();

    // live lines arrive before done, a second apart
    submit(
        &bridge,
        SubmitRequest::new("t-live", sh("echo a; sleep 1; echo b"), "t"),
    )
    .await;
    let mut times = Vec::new();
    let done = loop {
        let msg = rx.recv().await.unwrap();
        times.push((std::time::Instant::now(), msg.clone()));
        if msg.is_final() {
            break msg;
        }
    };
    let lines: Vec<_> = times
        .iter()
        .filter_map(|(t, m)| match m {
            BridgeMessage::Line { line, .. } => Some((*t, line.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        lines.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert!(
        lines[1].0 - lines[0].0 > Duration::from_millis(700),
        "lines were not live"
    );
    let BridgeMessage::Done(done) = done else {
        panic!("expected done, got {done:?}")
    };
    assert!(succeeded(&done), "{done:?}");

    // GPU task on the GPU worker
    let mut req = SubmitRequest::new("t-gpu", sh("echo gpu"), "t");
    req.resources.insert("GPU".into(), 1.0);
    submit(&bridge, req).await;
    match next_final(&mut rx, &mut seen, "t-gpu").await {
        BridgeMessage::Done(d) => assert_eq!(d.worker, gpu),
        other => panic!("{other:?}"),
    }

    // a command that cannot start says so with its own reason code
    submit(
        &bridge,
        SubmitRequest::new(
            "t-missing",
            vec!["/nonexistent/solidflow-binary".into()],
            "t",
        ),
    )
    .await;
    match next_final(&mut rx, &mut seen, "t-missing").await {
        BridgeMessage::Failed(f) => {
            assert_eq!(f.reason, FailureReason::NotStarted, "{f:?}");
            assert!(f.message.contains("/nonexistent"), "{}", f.message);
        }
        other => panic!("{other:?}"),
    }

    // done when the process exits, even if a child it left behind holds stderr
    let started = std::time::Instant::now();
    submit(
        &bridge,
        SubmitRequest::new("t-orphan", sh("sleep 60 >/dev/null & echo left"), "t"),
    )
    .await;
    match next_final(&mut rx, &mut seen, "t-orphan").await {
        BridgeMessage::Done(d) => assert!(succeeded(&d), "{d:?}"),
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the task waited for the leftover child: {:?}",
        started.elapsed()
    );

    // cancel kills the running process
    submit(
        &bridge,
        SubmitRequest::new("t-cancel", sh("echo go; exec sleep 300"), "t"),
    )
    .await;
    let pid = loop {
        match rx.recv().await.unwrap() {
            BridgeMessage::Started { key, pid, .. } if key == "t-cancel" => break pid.unwrap(),
            other => seen.push(other),
        }
    };
    let killed = bridge
        .cancel(&["t-cancel".to_string()], Duration::from_secs(5))
        .await
        .unwrap();
    assert!(killed.contains_key("t-cancel"), "{killed:?}");
    match next_final(&mut rx, &mut seen, "t-cancel").await {
        BridgeMessage::Failed(f) => assert_eq!(f.reason, FailureReason::Canceled),
        other => panic!("{other:?}"),
    }
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while proc_is_running(&proc_dir) {
        assert!(
            std::time::Instant::now() < deadline,
            "canceled step {pid} still running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    bridge
        .shutdown(Duration::from_secs(60))
        .await
        .expect("clean shutdown");
    loop {
        match rx.recv().await {
            Some(BridgeMessage::Exited {
                expected, status, ..
            }) => {
                assert!(expected);
                assert!(status.contains("exit status: 0"), "{status}");
                break;
            }
            Some(_) => {}
            None => panic!("no Exited message"),
        }
    }
}

fn proc_is_running(dir: &Path) -> bool {
    // a zombie (state Z) has exited
    std::fs::read_to_string(dir.join("stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn missing_python_names_the_fix() {
    let err = Bridge::spawn(BridgeOptions {
        python: "/nonexistent/python3".into(),
        ..options()
    })
    .await
    .unwrap_err();
    assert!(matches!(err, BridgeError::PythonNotFound { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("/nonexistent/python3")
            && text.contains("SOLIDFLOW_PYTHON")
            && text.contains("python:"),
        "{text}"
    );
}

#[tokio::test]
async fn missing_distributed_names_the_fix() {
    // -S: no site-packages, so `distributed` cannot be imported.
    let err = Bridge::spawn(BridgeOptions {
        python_args: vec!["-S".into()],
        ..options()
    })
    .await
    .unwrap_err();
    assert!(
        matches!(err, BridgeError::DistributedMissing { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("pip install dask distributed"),
        "{err}"
    );
}

#[tokio::test]
async fn unreachable_scheduler_names_the_address() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("tcp://127.0.0.1:{port}");
    let (bridge, _rx) = Bridge::spawn(options()).await.unwrap();
    let err = bridge
        .connect(&ConnectRequest {
            address: Some(address.clone()),
            timeout: Some(1.0),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, BridgeError::SchedulerUnreachable { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(&address), "{err}");
    // still serving: a request gets its reply
    bridge.release(&[]).await.unwrap();
    bridge.shutdown(Duration::from_secs(30)).await.unwrap();
}

#[tokio::test]
async fn dead_bridge_is_reported_with_stderr() {
    let (bridge, mut rx) = Bridge::spawn(options()).await.unwrap();
    let pid = bridge.info().pid;
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    match tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .unwrap()
    {
        Some(BridgeMessage::Exited {
            expected, status, ..
        }) => {
            assert!(!expected);
            assert!(status.contains("signal: 9"), "{status}");
        }
        other => panic!("{other:?}"),
    }
    let err = bridge.release(&[]).await.unwrap_err();
    assert!(matches!(err, BridgeError::BridgeDied { .. }), "{err:?}");
}
