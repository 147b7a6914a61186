//! Watching a run live from another terminal: `logs <run> --follow`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn conformance(home: &std::path::Path, dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_conformance"));
    cmd.env("AWS_EC2_METADATA_DISABLED", "true");
    cmd.env("SOLIDFLOW_HOME", home)
        .env("SF_CONFORMANCE_DIR", dir)
        .env("NO_COLOR", "1");
    cmd
}

#[test]
fn logs_follow_streams_a_running_run_until_it_ends() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run_id = "watched-run-1";
    let run_log = dir.path().join("run.stderr");
    let mut run = conformance(home.path(), dir.path())
        .args(["execute", "live", "--run-id", run_id])
        .stderr(std::fs::File::create(&run_log).unwrap())
        .spawn()
        .unwrap();
    let run_stderr = || std::fs::read_to_string(&run_log).unwrap_or_default();

    // The run record appears once the run has started; follow it from a second process.
    // `logs` exits 2 at once while the run is not recorded yet: a follower has attached
    // when it prints its first event, however long it took to start.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut follower, mut lines, first) = loop {
        let mut child = conformance(home.path(), dir.path())
            .args(["logs", run_id, "--follow", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        if let Some(first) = lines.next() {
            break (child, lines, first.unwrap());
        }
        let status = child.wait().unwrap();
        if let Some(ended) = run.try_wait().unwrap() {
            panic!(
                "the run ended ({ended}) before a follower attached; its stderr:\n{}",
                run_stderr()
            );
        }
        assert!(
            Instant::now() < deadline,
            "logs --follow never attached (last: {status}); the run's stderr:\n{}",
            run_stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut seen = Vec::new();
    // The step is blocked until `go` exists, so seeing its log line proves streaming.
    for line in std::iter::once(Ok(first)).chain(lines.by_ref()) {
        let event: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        let done = event["message"] == "waiting for go";
        seen.push(event["event_type"].as_str().unwrap().to_string());
        if done {
            break;
        }
    }
    assert!(seen.contains(&"STEP_START".to_string()), "{seen:?}");
    std::fs::write(dir.path().join("go"), "").unwrap();
    for line in lines {
        let event: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        seen.push(event["event_type"].as_str().unwrap().to_string());
    }
    assert_eq!(
        seen.last().map(String::as_str),
        Some("PIPELINE_SUCCESS"),
        "{seen:?}"
    );
    assert!(
        follower.wait().unwrap().success(),
        "follow exits once the run ends"
    );
    assert!(run.wait().unwrap().success());
}
