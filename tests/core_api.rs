//! The programmatic API: definitions, wiring checks, config validation, and in-process
//! execution semantics (outputs, failure + skip, panics, concurrency).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use serde_json::json;
use solidflow::definition::pipeline::DefinitionError;
use solidflow::definition::types::TypeInfo;
use solidflow::prelude::*;

#[solid]
fn numbers(_ctx: &SolidContext) -> Vec<i64> {
    vec![1, 2, 3, 4]
}

#[solid(outputs(evens: Vec<i64>, odds: Vec<i64>))]
fn split(_ctx: &SolidContext, numbers: Vec<i64>) -> (Vec<i64>, Vec<i64>) {
    numbers.into_iter().partition(|n| n % 2 == 0)
}

#[solid]
fn total(ctx: &SolidContext, numbers: &Vec<i64>) -> i64 {
    ctx.log().info(format!("summing {} numbers", numbers.len()));
    numbers.iter().sum()
}

#[solid]
fn fail(_ctx: &SolidContext, numbers: &Vec<i64>) -> Result<i64, SolidError> {
    Err(
        SolidError::new(format!("refusing {} numbers", numbers.len()))
            .caused_by("the database is read-only"),
    )
}

#[solid]
fn explode(_ctx: &SolidContext, numbers: &Vec<i64>) -> i64 {
    panic!("boom with {} numbers", numbers.len())
}

fn memory() -> serde_json::Value {
    json!({"storage": {"in_memory": {}}})
}

#[test]
fn outputs_are_typed_and_aliases_reuse_a_solid() {
    let pipeline = Pipeline::build("sums", |p| {
        let n = p.invoke(numbers, ());
        let parts = p.invoke(split, (n,));
        p.invoke_as("sum_evens", total, (parts.evens,));
        p.invoke_as("sum_odds", total, (parts.odds,));
    })
    .unwrap();
    let result = execute_pipeline(&pipeline, memory()).unwrap();
    assert!(result.success());
    assert_eq!(result.result::<i64>("sum_evens").unwrap(), 6);
    assert_eq!(result.result::<i64>("sum_odds").unwrap(), 4);
    assert_eq!(
        result.output::<Vec<i64>>("split", "evens").unwrap(),
        vec![2, 4]
    );
    assert!(
        result.result::<String>("sum_odds").is_err(),
        "wrong type must be refused"
    );
    let logs: Vec<_> = result
        .step_events("sum_evens.compute")
        .filter(|e| e.kind == EventKind::LogMessage)
        .collect();
    assert_eq!(logs[0].message, "summing 2 numbers");
}

#[test]
fn filesystem_storage_round_trips_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = Pipeline::build("fs", |p| {
        let n = p.invoke(numbers, ());
        p.invoke(total, (n,));
    })
    .unwrap();
    let config = json!({"storage": {"filesystem": {"config": {"base_dir": dir.path()}}}});
    let result = execute_pipeline(&pipeline, config).unwrap();
    assert!(result.success());
    assert_eq!(result.result::<i64>("total").unwrap(), 10);
    let stored = dir
        .path()
        .join(result.run_id())
        .join("intermediates/numbers.compute/result");
    assert!(stored.is_file(), "{} missing", stored.display());
}

#[test]
fn failure_skips_downstream_while_other_branches_finish() {
    let pipeline = Pipeline::build("partial", |p| {
        let n = p.invoke(numbers, ());
        let bad = p.invoke(fail, (n.clone(),));
        let parts = p.invoke(split, (n.clone(),));
        p.invoke_as("after_failure", total, (parts.evens,));
        let _ = bad;
        p.invoke(explode, (n,));
    })
    .unwrap();
    let result = execute_pipeline(&pipeline, memory()).unwrap();
    assert!(!result.success());
    let failure = result
        .step_events("fail.compute")
        .find_map(|e| match &e.kind {
            EventKind::StepFailure { error, .. } => Some(error.clone()),
            _ => None,
        })
        .expect("STEP_FAILURE for fail");
    assert_eq!(failure.message, "refusing 4 numbers");
    assert_eq!(
        failure.causes,
        vec!["the database is read-only".to_string()]
    );
    let panic = result
        .step_events("explode.compute")
        .find_map(|e| match &e.kind {
            EventKind::StepFailure { error, .. } => Some(error.clone()),
            _ => None,
        })
        .expect("STEP_FAILURE for explode");
    assert_eq!(panic.kind, "panic");
    assert!(
        panic.message.contains("boom with 4 numbers"),
        "{}",
        panic.message
    );
    assert!(
        panic.location.as_deref().unwrap().contains("core_api.rs"),
        "{:?}",
        panic.location
    );
    assert_eq!(
        result.result::<i64>("after_failure").unwrap(),
        6,
        "independent branch must finish"
    );
    assert!(
        result
            .events()
            .iter()
            .any(|e| matches!(e.kind, EventKind::PipelineFailure { .. }))
    );
}

#[test]
fn skipped_steps_name_the_failed_upstream() {
    let pipeline = Pipeline::build("chain", |p| {
        let n = p.invoke(numbers, ());
        let x = p.invoke(fail, (n,));
        let as_vec = p.invoke(wrap, (x,));
        p.invoke(total, (as_vec,));
    })
    .unwrap();
    let result = execute_pipeline(&pipeline, memory()).unwrap();
    let skipped: Vec<_> = result
        .events()
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::StepSkipped { upstream } => {
                Some((e.step_key.clone().unwrap(), upstream.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        skipped,
        vec![
            ("wrap.compute".to_string(), vec!["fail.compute".to_string()]),
            (
                "total.compute".to_string(),
                vec!["wrap.compute".to_string()]
            ),
        ]
    );
}

#[solid]
fn wrap(_ctx: &SolidContext, x: i64) -> Vec<i64> {
    vec![x]
}

static RENDEZVOUS: std::sync::OnceLock<Arc<Barrier>> = std::sync::OnceLock::new();

#[solid]
fn meet(_ctx: &SolidContext) -> Result<u32, SolidError> {
    // Both copies must be inside this function at once, or the barrier never opens.
    let barrier = RENDEZVOUS.get().unwrap().clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(barrier.wait().is_leader()));
    rx.recv_timeout(Duration::from_secs(20))
        .map(|_| 1)
        .map_err(|_| SolidError::new("the other step never started: no parallelism"))
}

#[test]
fn independent_steps_run_in_parallel() {
    RENDEZVOUS.get_or_init(|| Arc::new(Barrier::new(2)));
    let pipeline = Pipeline::build("parallel", |p| {
        p.invoke_as("left", meet, ());
        p.invoke_as("right", meet, ());
    })
    .unwrap();
    let config = json!({"storage": {"in_memory": {}}, "execution": {"in_process": {"config": {"max_concurrent": 2}}}});
    let result = execute_pipeline(&pipeline, config).unwrap();
    assert!(result.success(), "{:#?}", result.events());
}

static ATTEMPTS: AtomicUsize = AtomicUsize::new(0);

#[solid(retry(max_retries = 3, delay = 0.01))]
fn flaky(ctx: &SolidContext) -> Result<u32, SolidError> {
    ATTEMPTS.fetch_add(1, Ordering::SeqCst);
    if ctx.attempt() < 3 {
        Err(SolidError::new("not yet"))
    } else {
        Ok(ctx.attempt())
    }
}

#[test]
fn retries_follow_the_policy() {
    let pipeline = Pipeline::build("retry", |p| {
        p.invoke(flaky, ());
    })
    .unwrap();
    let result = execute_pipeline(&pipeline, memory()).unwrap();
    assert!(result.success());
    assert_eq!(result.result::<u32>("flaky").unwrap(), 3);
    let kinds: Vec<&str> = result
        .step_events("flaky.compute")
        .map(|e| e.event_type())
        .filter(|t| t.contains("RETRY") || t.contains("RESTART"))
        .collect();
    assert_eq!(
        kinds,
        [
            "STEP_UP_FOR_RETRY",
            "STEP_RESTARTED",
            "STEP_UP_FOR_RETRY",
            "STEP_RESTARTED"
        ]
    );
}

#[test]
fn wiring_errors_name_pipeline_solid_and_input() {
    let dup = Pipeline::build("dup", |p| {
        p.invoke(numbers, ());
        p.invoke(numbers, ());
    })
    .unwrap_err();
    assert!(matches!(dup, DefinitionError::DuplicateAlias { .. }));
    assert!(dup.to_string().contains("pipeline `dup`") && dup.to_string().contains("`numbers`"));

    let mismatch = Pipeline::build("types", |p| {
        p.add(
            "source",
            SolidDefinition::new("source", |_, _| Ok(Outputs::result("x".to_string())))
                .output("result", TypeInfo::of::<String>()),
            vec![],
        );
        let def = SolidDefinition::new("sink", |_, _| Ok(Outputs::new()))
            .input("n", TypeInfo::of::<i64>());
        let src = p.result("source");
        p.add("sink", def, vec![("n".into(), src)]);
    })
    .unwrap_err();
    let text = mismatch.to_string();
    assert!(
        text.contains("input `n` of solid `sink`")
            && text.contains("i64")
            && text.contains("String"),
        "{text}"
    );

    let cycle = Pipeline::build("cycle", |p| {
        let a = SolidDefinition::new("a", |_, _| Ok(Outputs::result(1i64)))
            .input("x", TypeInfo::of::<i64>())
            .output("result", TypeInfo::of::<i64>());
        let b = a.clone();
        let (ra, rb) = (p.result("b"), p.result("a"));
        p.add("a", a, vec![("x".into(), ra)]);
        p.add("b", b, vec![("x".into(), rb)]);
    })
    .unwrap_err();
    assert!(matches!(cycle, DefinitionError::Cycle { .. }), "{cycle}");

    let unwired = Pipeline::build("unwired", |p| {
        p.add(
            "sink",
            SolidDefinition::new("sink", |_, _| Ok(Outputs::new()))
                .input("n", TypeInfo::of::<i64>()),
            vec![],
        );
    })
    .unwrap_err();
    assert!(
        unwired
            .to_string()
            .contains("input `n` of solid `sink` is not wired"),
        "{unwired}"
    );

    let unknown = Pipeline::build("unknown", |p| {
        let src = p.result("nowhere");
        p.add(
            "sink",
            SolidDefinition::new("sink", |_, _| Ok(Outputs::new()))
                .input("n", TypeInfo::of::<i64>()),
            vec![("n".into(), src)],
        );
    })
    .unwrap_err();
    assert!(
        unknown.to_string().contains("unknown solid `nowhere`"),
        "{unknown}"
    );
}

#[test]
fn config_inputs_are_validated_against_their_type() {
    let pipeline = Pipeline::build("config_inputs", |p| {
        let n = p.config_input::<Vec<i64>>();
        p.invoke(total, (n,));
    })
    .unwrap();
    let ok = execute_pipeline(
        &pipeline,
        json!({"solids": {"total": {"inputs": {"numbers": [5, 6]}}}}),
    )
    .unwrap();
    assert_eq!(ok.result::<i64>("total").unwrap(), 11);
    let Err(solidflow::execution::run::RunError::Config(errors)) = execute_pipeline(
        &pipeline,
        json!({"solids": {"total": {"inputs": {"numbers": "five"}}}}),
    ) else {
        panic!("expected a config error")
    };
    assert_eq!(
        errors.errors[0].path,
        ["solids", "total", "inputs", "numbers"]
    );
    let Err(solidflow::execution::run::RunError::Config(missing)) =
        execute_pipeline(&pipeline, json!({}))
    else {
        panic!("expected a config error")
    };
    assert!(missing.to_string().contains("solids.total"), "{missing}");
}

#[test]
fn resource_requirements_beyond_the_declaration_are_rejected_before_running() {
    let gpu = SolidDefinition::new("train", |_, _| Ok(Outputs::new())).requires("GPU", 2.0);
    let pipeline = Pipeline::build("gpu", |p| p.add("train", gpu, vec![])).unwrap();
    let config = json!({"execution": {"in_process": {"config": {"resources": {"GPU": 1}}}}});
    let err = execute_pipeline(&pipeline, config)
        .err()
        .expect("must be rejected");
    let text = err.to_string();
    assert!(
        text.contains("train.compute") && text.contains("GPU=2"),
        "{text}"
    );
}
