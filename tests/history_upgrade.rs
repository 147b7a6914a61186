//! A run-history database written by the release before schema versioning opens and
//! upgrades in place (`tests/fixtures/history-v0.db`, see `tests/fixtures/README.md`).

use std::collections::BTreeMap;

use solidflow::storage::run_history::{RunFilter, RunHistory, RunRecord, RunStatus};

fn fixture_copy() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.db");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/history-v0.db"),
        &path,
    )
    .expect("fixture database is in the repository");
    (dir, path)
}

#[test]
fn the_pre_versioning_database_opens_upgrades_and_keeps_every_run_and_event() {
    let (_dir, path) = fixture_copy();
    let history = RunHistory::open(&path).expect("old history opens and upgrades");
    let runs = history.list(&RunFilter::default()).unwrap();
    let status: BTreeMap<&str, RunStatus> =
        runs.iter().map(|r| (r.run_id.as_str(), r.status)).collect();
    assert_eq!(
        status,
        BTreeMap::from([
            ("fixture-hello-1", RunStatus::Success),
            ("fixture-etl-ok", RunStatus::Success),
            ("fixture-etl-failed", RunStatus::Failure),
            // Killed with SIGKILL by the old release and left STARTED; it recorded no
            // host or heartbeat, and started long ago, so the first read marks it.
            ("fixture-killed", RunStatus::Failure),
        ])
    );
    let etl = runs.iter().find(|r| r.run_id == "fixture-etl-ok").unwrap();
    assert_eq!(etl.pipeline, "etl");
    assert!(
        etl.config["storage"]["filesystem"].is_object(),
        "{}",
        etl.config
    );
    assert!(etl.tags.is_empty() && etl.root_run_id.is_none() && etl.host.is_none());
    let events = history.events("fixture-etl-ok", 0).unwrap();
    assert_eq!(events.first().unwrap().1.event_type(), "PIPELINE_START");
    assert_eq!(events.last().unwrap().1.event_type(), "PIPELINE_SUCCESS");
    let killed = history.events("fixture-killed", 0).unwrap();
    let last: Vec<&str> = killed
        .iter()
        .rev()
        .take(2)
        .map(|(_, e)| e.event_type())
        .collect();
    assert_eq!(last, ["PIPELINE_FAILURE", "ENGINE_EVENT"]);
    let outputs = history.step_outputs("fixture-etl-ok").unwrap();
    assert_eq!(outputs.len(), 5, "every etl step succeeded: {outputs:?}");

    // The upgraded database takes new runs with the new fields, and reopens as is.
    let mut record = RunRecord::new("after-upgrade", "etl", "default", serde_json::json!({}));
    record.tags.insert("team".into(), "ml".into());
    record.parent_run_id = Some("fixture-etl-failed".into());
    record.root_run_id = Some("fixture-etl-failed".into());
    history.create_run(&record).unwrap();
    drop(history);
    let again = RunHistory::open(&path).unwrap();
    let run = again.run("after-upgrade").unwrap().unwrap();
    assert_eq!(run.tags["team"], "ml");
    assert_eq!(run.root_run_id.as_deref(), Some("fixture-etl-failed"));
    assert_eq!(again.list(&RunFilter::default()).unwrap().len(), 5);
}
