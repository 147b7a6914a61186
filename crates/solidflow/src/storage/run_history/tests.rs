use super::*;
use crate::execution::event::Level;

fn history() -> (tempfile::TempDir, RunHistory) {
    let dir = tempfile::tempdir().unwrap();
    let history = RunHistory::open(&dir.path().join("h.db")).unwrap();
    (dir, history)
}

fn record(run_id: &str, pipeline: &str) -> RunRecord {
    RunRecord::new(run_id, pipeline, "default", serde_json::json!({}))
}

fn event(run_id: &str, step: Option<&str>, kind: EventKind) -> Event {
    Event {
        run_id: run_id.into(),
        pipeline: "p".into(),
        step_key: step.map(str::to_string),
        timestamp: Utc::now(),
        level: Level::Info,
        message: String::new(),
        host: "h".into(),
        pid: 1,
        worker: None,
        kind,
    }
}

fn exited_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn records_runs_events_and_final_status() {
    let (_dir, history) = history();
    history.create_run(&record("run-1", "p")).unwrap();
    history.on_event(&event("run-1", None, EventKind::LogMessage));
    history.on_event(&event(
        "run-1",
        None,
        EventKind::PipelineSuccess { duration_ms: 1 },
    ));
    history.flush();
    let run = history.run("run").unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Success);
    assert!(run.ended_at.is_some());
    assert_eq!(run.pid, Some(std::process::id()));
    let events = history.events("run-1", 0).unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(history.events("run-1", events[0].0).unwrap().len(), 1);
}

#[test]
fn an_exact_id_wins_over_a_longer_id_with_that_prefix() {
    let (_dir, history) = history();
    history.create_run(&record("ab", "p")).unwrap();
    history.create_run(&record("abc", "p")).unwrap();
    assert_eq!(history.run("ab").unwrap().unwrap().run_id, "ab");
    assert_eq!(history.run("abc").unwrap().unwrap().run_id, "abc");
    assert!(history.run("x").unwrap().is_none());
}

#[test]
fn a_reused_run_id_is_refused_naming_the_existing_run() {
    let (_dir, history) = history();
    history.create_run(&record("same", "first")).unwrap();
    let err = history.create_run(&record("same", "second")).unwrap_err();
    assert!(matches!(err, HistoryError::RunExists { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("run id `same` is already used by a STARTED run of pipeline `first`"),
        "{text}"
    );
    assert_eq!(history.runs(10).unwrap().len(), 1);
}

#[test]
fn runs_are_listed_with_tags_and_filtered() {
    let (_dir, history) = history();
    let mut a = record("a", "etl");
    a.tags = BTreeMap::from([("team".into(), "ml".into()), ("prio".into(), "high".into())]);
    a.started_at = Utc::now() - chrono::Duration::hours(2);
    history.create_run(&a).unwrap();
    let mut b = record("b", "etl");
    b.tags = BTreeMap::from([("team".into(), "ops".into())]);
    b.parent_run_id = Some("a".into());
    b.root_run_id = Some("a".into());
    history.create_run(&b).unwrap();
    history.create_run(&record("c", "other")).unwrap();
    history.on_event(&event(
        "c",
        None,
        EventKind::PipelineSuccess { duration_ms: 1 },
    ));
    history.flush();

    let ids = |filter: RunFilter| -> Vec<String> {
        history
            .list(&filter)
            .unwrap()
            .into_iter()
            .map(|r| r.run_id)
            .collect()
    };
    assert_eq!(ids(RunFilter::default()), ["c", "b", "a"]);
    let by_tag = RunFilter {
        tags: BTreeMap::from([("team".into(), "ml".into())]),
        ..RunFilter::default()
    };
    assert_eq!(ids(by_tag), ["a"]);
    let two_tags = RunFilter {
        tags: BTreeMap::from([("team".into(), "ml".into()), ("prio".into(), "low".into())]),
        ..RunFilter::default()
    };
    assert!(ids(two_tags).is_empty());
    let etl = RunFilter {
        pipeline: Some("etl".into()),
        limit: Some(1),
        ..RunFilter::default()
    };
    assert_eq!(ids(etl), ["b"]);
    let recent = RunFilter {
        since: Some(Utc::now() - chrono::Duration::hours(1)),
        statuses: vec![RunStatus::Started],
        ..RunFilter::default()
    };
    assert_eq!(ids(recent), ["b"]);
    let lineage = RunFilter {
        lineage: Some("a".into()),
        ..RunFilter::default()
    };
    assert_eq!(ids(lineage), ["b", "a"]);
    let listed = history.run("a").unwrap().unwrap();
    assert_eq!(listed.tags["prio"], "high");
    assert_eq!(
        history.run("b").unwrap().unwrap().root_run_id.as_deref(),
        Some("a")
    );
}

#[test]
fn a_run_whose_process_is_gone_is_marked_failure_once_with_what_happened() {
    let (_dir, history) = history();
    let mut dead = record("dead", "p");
    dead.pid = Some(exited_pid());
    dead.process_start = None;
    history.create_run(&dead).unwrap();
    history.create_run(&record("alive", "p")).unwrap();
    history.on_event(&event(
        "dead",
        Some("a.compute"),
        EventKind::StepStart { attempt: 1 },
    ));
    history.on_event(&event(
        "dead",
        Some("a.compute"),
        EventKind::StepSuccess {
            duration_ms: 1,
            attempt: 1,
        },
    ));
    history.on_event(&event(
        "dead",
        Some("b.compute"),
        EventKind::StepStart { attempt: 1 },
    ));
    history.flush();

    let runs = history.runs(10).unwrap();
    let status = |id: &str| runs.iter().find(|r| r.run_id == id).unwrap().status;
    assert_eq!(status("dead"), RunStatus::Failure);
    assert_eq!(status("alive"), RunStatus::Started, "this process is alive");
    let events = history.events("dead", 0).unwrap();
    let types: Vec<&str> = events.iter().map(|(_, e)| e.event_type()).collect();
    assert_eq!(
        types,
        [
            "STEP_START",
            "STEP_SUCCESS",
            "STEP_START",
            "ENGINE_EVENT",
            "PIPELINE_FAILURE"
        ]
    );
    let engine = &events[3].1;
    assert!(engine.message.contains("is gone"), "{}", engine.message);
    assert!(
        engine.message.contains("last seen alive at"),
        "{}",
        engine.message
    );
    match &events[4].1.kind {
        EventKind::PipelineFailure { failed_steps, .. } => {
            assert_eq!(failed_steps, &["b.compute".to_string()])
        }
        other => panic!("{other:?}"),
    }
    assert!(history.mark_dead_runs().unwrap().is_empty(), "marked once");
    assert_eq!(history.events("dead", 0).unwrap().len(), 5);
}

#[test]
fn another_hosts_run_is_marked_only_when_its_heartbeat_is_stale() {
    let (_dir, history) = history();
    let history = history.with_heartbeat_timeout(Duration::from_secs(30));
    let mut fresh = record("fresh", "p");
    fresh.host = Some("elsewhere".into());
    fresh.heartbeat_at = Some(Utc::now());
    history.create_run(&fresh).unwrap();
    let mut stale = record("stale", "p");
    stale.host = Some("elsewhere".into());
    stale.started_at = Utc::now() - chrono::Duration::seconds(600);
    stale.heartbeat_at = Some(Utc::now() - chrono::Duration::seconds(120));
    history.create_run(&stale).unwrap();
    assert_eq!(history.mark_dead_runs().unwrap(), ["stale"]);
    let events = history.events("stale", 0).unwrap();
    assert!(
        events[0]
            .1
            .message
            .contains("on host elsewhere sent no heartbeat for 120 s"),
        "{}",
        events[0].1.message
    );
}

#[test]
fn the_heartbeat_is_written_while_the_guard_lives() {
    let (_dir, history) = history();
    let history = history.with_heartbeat_timeout(Duration::from_millis(400));
    history.create_run(&record("beating", "p")).unwrap();
    let guard = history.start_heartbeat("beating");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let first = loop {
        history.flush();
        if let Some(t) = history.run_exact("beating").unwrap().unwrap().heartbeat_at {
            break t;
        }
        assert!(std::time::Instant::now() < deadline, "no heartbeat written");
    };
    loop {
        history.flush();
        let t = history
            .run_exact("beating")
            .unwrap()
            .unwrap()
            .heartbeat_at
            .unwrap();
        if t > first {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "heartbeat not renewed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(guard);
}

#[test]
fn step_outputs_combine_own_successes_and_reused_steps() {
    let (_dir, history) = history();
    history.create_run(&record("parent", "p")).unwrap();
    let mut child = record("child", "p");
    child.parent_run_id = Some("parent".into());
    let reused = BTreeMap::from([
        ("a.compute".to_string(), "parent".to_string()),
        ("b.compute".to_string(), "grandparent".to_string()),
    ]);
    history.create_run_reusing(&child, &reused).unwrap();
    history.on_event(&event(
        "child",
        Some("c.compute"),
        EventKind::StepSuccess {
            duration_ms: 1,
            attempt: 1,
        },
    ));
    history.on_event(&event(
        "child",
        Some("d.compute"),
        EventKind::StepFailure {
            error: ErrorInfo {
                message: "x".into(),
                causes: vec![],
                kind: "error".into(),
                location: None,
            },
            attempt: 1,
        },
    ));
    history.flush();
    let outputs = history.step_outputs("child").unwrap();
    assert_eq!(
        outputs,
        BTreeMap::from([
            ("a.compute".to_string(), "parent".to_string()),
            ("b.compute".to_string(), "grandparent".to_string()),
            ("c.compute".to_string(), "child".to_string()),
        ])
    );
}

#[test]
fn connections_opening_a_new_history_at_once_all_get_it() {
    // A run starting while `logs --follow` (or the web page) opens the same new history:
    // switching a new file to WAL mode used to fail at once with "database is locked".
    for round in 0..60 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.db");
        let start = std::sync::Arc::new(std::sync::Barrier::new(12));
        let openers: Vec<_> = (0..12)
            .map(|_| {
                let (path, start) = (path.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    RunHistory::open(&path).map(|_| ())
                })
            })
            .collect();
        for opener in openers {
            if let Err(e) = opener.join().unwrap() {
                panic!("round {round}: {e}");
            }
        }
    }
}
