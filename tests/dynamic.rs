//! Dynamic fan-out (`DynamicOutput`, `PipelineBuilder::map`, `DynamicHandle::collect`):
//! one step per item, `<solid>[<key>].compute`, collected in item order; on every
//! executor, with retries, skips and re-execution as for static steps.
//!
//! Run: `cargo build --examples --bins && cargo test --test dynamic`.

mod common;
#[path = "support/dask.rs"]
mod dask_support;
#[path = "support/s3.rs"]
mod s3_support;

use std::sync::atomic::{AtomicU32, Ordering};

use common::{example, json_lines, run};
use solidflow::definition::solid::{Outputs, SolidDefinition};
use solidflow::definition::types::TypeInfo;
use solidflow::prelude::*;

#[solid]
fn numbers(_ctx: &SolidContext, count: u32) -> DynamicOutput<i64> {
    (0..count)
        .map(|i| (format!("n{i}"), i64::from(i)))
        .collect()
}

#[solid]
fn double(_ctx: &SolidContext, x: i64) -> i64 {
    x * 2
}

#[solid]
fn offset(_ctx: &SolidContext) -> i64 {
    1000
}

#[solid]
fn add(_ctx: &SolidContext, x: i64, offset: i64) -> i64 {
    x + offset
}

#[solid]
fn gather(_ctx: &SolidContext, values: Vec<i64>) -> Vec<i64> {
    values
}

fn doubled(count: u32) -> (Pipeline, serde_json::Value) {
    let pipeline = Pipeline::build("doubled", |p| {
        let count = p.config_input();
        let items = p.invoke(numbers, (count,));
        let doubled = p.map(&items, |p, x| p.invoke(double, (x,)));
        p.invoke(gather, (doubled.collect(),));
    })
    .unwrap();
    let config = serde_json::json!({"solids": {"numbers": {"inputs": {"count": count}}}});
    (pipeline, config)
}

#[test]
fn ten_thousand_items_run_as_ten_thousand_steps_collected_in_item_order() {
    let (pipeline, config) = doubled(10_000);
    let result = execute_pipeline(&pipeline, config).unwrap();
    assert!(result.success());
    let values = result.result::<Vec<i64>>("gather").unwrap();
    assert_eq!(values, (0..10_000).map(|i| i * 2).collect::<Vec<i64>>());
    let started = result
        .events()
        .iter()
        .filter(|e| e.kind.name() == "STEP_START")
        .filter(|e| {
            e.step_key
                .as_deref()
                .is_some_and(|k| k.starts_with("double["))
        })
        .count();
    assert_eq!(started, 10_000);
    assert!(result.step_events("double[n9999].compute").count() > 0);
}

#[test]
fn an_empty_dynamic_output_runs_no_mapped_step_and_collects_an_empty_list() {
    let (pipeline, config) = doubled(0);
    let result = execute_pipeline(&pipeline, config).unwrap();
    assert!(result.success());
    assert_eq!(
        result.result::<Vec<i64>>("gather").unwrap(),
        Vec::<i64>::new()
    );
    assert!(!result.events().iter().any(|e| {
        e.step_key
            .as_deref()
            .is_some_and(|k| k.starts_with("double[n"))
    }));
}

#[test]
fn filesystem_storage_keeps_each_item_and_the_keys() {
    let (pipeline, mut config) = doubled(5);
    let home = tempfile::tempdir().unwrap();
    config["storage"] = serde_json::json!({"filesystem": {"config": {"base_dir": home.path()}}});
    let result = execute_pipeline(&pipeline, config).unwrap();
    assert!(result.success());
    assert_eq!(
        result.result::<Vec<i64>>("gather").unwrap(),
        [0, 2, 4, 6, 8]
    );
    let dir = home.path().join(result.run_id()).join("intermediates");
    assert!(dir.join("numbers.compute").join("result[n3]").is_file());
    assert!(dir.join("numbers.compute").join("result").is_file());
    assert!(dir.join("double[n3].compute").join("result").is_file());
}

#[solid]
fn pair(_ctx: &SolidContext, mapped: Vec<i64>, raw: Vec<i64>) -> Vec<i64> {
    mapped.into_iter().chain(raw).collect()
}

#[test]
fn maps_chain_read_shared_outputs_and_collect_without_a_map() {
    let pipeline = Pipeline::build("chain", |p| {
        let count = p.config_input();
        let items = p.invoke(numbers, (count,));
        let base = p.invoke(offset, ());
        let doubled = p.map(&items, |p, x| p.invoke(double, (x,)));
        let shifted = p.map(&doubled, |p, x| p.invoke(add, (x, base.clone())));
        p.invoke(pair, (shifted.collect(), items.collect()));
    })
    .unwrap();
    let config = serde_json::json!({"solids": {"numbers": {"inputs": {"count": 3}}}});
    let result = execute_pipeline(&pipeline, config).unwrap();
    assert!(result.success());
    let templates: Vec<&str> = result
        .plan()
        .steps
        .iter()
        .filter(|s| s.is_template())
        .map(|s| s.key.as_str())
        .collect();
    assert_eq!(templates, ["double[?].compute", "add[?].compute"]);
    assert_eq!(
        result.result::<Vec<i64>>("pair").unwrap(),
        [1000, 1002, 1004, 0, 1, 2]
    );
    assert!(
        result
            .step_events("add[n2].compute")
            .any(|e| e.kind.name() == "STEP_SUCCESS")
    );
}

#[solid]
fn bad_keys(_ctx: &SolidContext, keys: Vec<String>) -> DynamicOutput<i64> {
    keys.into_iter().map(|k| (k, 1)).collect()
}

fn failure_of(keys: serde_json::Value) -> String {
    let pipeline = Pipeline::build("bad", |p| {
        let keys = p.config_input();
        let items = p.invoke(bad_keys, (keys,));
        let doubled = p.map(&items, |p, x| p.invoke(double, (x,)));
        p.invoke(gather, (doubled.collect(),));
    })
    .unwrap();
    let config = serde_json::json!({"solids": {"bad_keys": {"inputs": {"keys": keys}}}});
    let result = execute_pipeline(&pipeline, config).unwrap();
    assert!(!result.success());
    assert!(
        result
            .step_events("gather.compute")
            .any(|e| e.kind.name() == "STEP_SKIPPED")
    );
    result
        .step_events("bad_keys.compute")
        .find(|e| e.kind.name() == "STEP_FAILURE")
        .map(|e| e.message.clone())
        .expect("the step with the bad key fails")
}

#[test]
fn a_bad_or_repeated_mapping_key_fails_the_step_naming_it() {
    let bad = failure_of(serde_json::json!(["ok", "a/b"]));
    assert!(
        bad.contains("bad_keys.compute") && bad.contains("\"a/b\"") && bad.contains("'/'"),
        "{bad}"
    );
    let empty = failure_of(serde_json::json!([""]));
    assert!(empty.contains("must not be empty"), "{empty}");
    let twice = failure_of(serde_json::json!(["a", "b", "a"]));
    assert!(
        twice.contains("two items with the mapping key \"a\""),
        "{twice}"
    );
}

static FLAKES: AtomicU32 = AtomicU32::new(0);

#[solid(retry(max_retries = 2))]
fn flaky_double(ctx: &SolidContext, x: i64) -> Result<i64, SolidError> {
    if ctx.mapping_key() == Some("n1") && FLAKES.fetch_add(1, Ordering::SeqCst) == 0 {
        return Err(SolidError::new("first attempt of n1 fails"));
    }
    Ok(x * 2)
}

#[solid]
fn fail_on_n2(ctx: &SolidContext, x: i64) -> Result<i64, SolidError> {
    match ctx.mapping_key() {
        Some("n2") => Err(SolidError::new("n2 fails")),
        _ => Ok(x),
    }
}

#[test]
fn a_mapped_step_retries_like_a_static_one() {
    let pipeline = Pipeline::build("flaky", |p| {
        let count = p.config_input();
        let items = p.invoke(numbers, (count,));
        let doubled = p.map(&items, |p, x| p.invoke(flaky_double, (x,)));
        p.invoke(gather, (doubled.collect(),));
    })
    .unwrap();
    let config = serde_json::json!({"solids": {"numbers": {"inputs": {"count": 3}}}});
    let result = execute_pipeline(&pipeline, config).unwrap();
    assert!(result.success());
    assert_eq!(result.result::<Vec<i64>>("gather").unwrap(), [0, 2, 4]);
    let kinds: Vec<&str> = result
        .step_events("flaky_double[n1].compute")
        .map(|e| e.kind.name())
        .collect();
    assert!(
        kinds.contains(&"STEP_UP_FOR_RETRY") && kinds.contains(&"STEP_RESTARTED"),
        "{kinds:?}"
    );
}

#[test]
fn a_failed_mapped_step_skips_the_collect_and_the_others_still_run() {
    let pipeline = Pipeline::build("partial", |p| {
        let count = p.config_input();
        let items = p.invoke(numbers, (count,));
        let checked = p.map(&items, |p, x| p.invoke(fail_on_n2, (x,)));
        p.invoke(gather, (checked.collect(),));
    })
    .unwrap();
    let config = serde_json::json!({"solids": {"numbers": {"inputs": {"count": 4}}}});
    let result = execute_pipeline(&pipeline, config).unwrap();
    assert!(!result.success());
    for key in ["n0", "n1", "n3"] {
        let step = format!("fail_on_n2[{key}].compute");
        assert!(
            result
                .step_events(&step)
                .any(|e| e.kind.name() == "STEP_SUCCESS"),
            "{step}"
        );
    }
    let skipped = result
        .step_events("gather.compute")
        .find(|e| e.kind.name() == "STEP_SKIPPED")
        .expect("collect skipped");
    assert!(
        skipped.message.contains("fail_on_n2[n2].compute"),
        "{}",
        skipped.message
    );
}

#[test]
fn an_upstream_failure_skips_the_template_and_the_collect() {
    #[solid]
    fn broken(_ctx: &SolidContext) -> Result<DynamicOutput<i64>, SolidError> {
        Err(SolidError::new("no items today"))
    }
    let pipeline = Pipeline::build("broken", |p| {
        let items = p.invoke(broken, ());
        let doubled = p.map(&items, |p, x| p.invoke(double, (x,)));
        p.invoke(gather, (doubled.collect(),));
    })
    .unwrap();
    let result = execute_pipeline(&pipeline, serde_json::json!({})).unwrap();
    assert!(!result.success());
    for step in ["double[?].compute", "gather.compute"] {
        assert!(
            result
                .step_events(step)
                .any(|e| e.kind.name() == "STEP_SKIPPED"),
            "{step}"
        );
    }
}

#[test]
fn wiring_mistakes_the_compiler_cannot_see_are_named_when_the_pipeline_is_built() {
    let items =
        || SolidDefinition::new("items", |_, _| Ok(Outputs::new())).dynamic_output::<i64>("result");
    let one = |name: &str| {
        SolidDefinition::new(name, |_, _| Ok(Outputs::result(1i64)))
            .input("x", TypeInfo::of::<i64>())
            .output("result", TypeInfo::of::<i64>())
    };
    // A dynamic output read as one value.
    let err = Pipeline::build("plain", |p| {
        p.add("items", items(), vec![]);
        let r = p.result("items");
        p.add("one", one("one"), vec![("x".into(), r)]);
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("solid `one`")
            && err.contains("reads dynamic output `items.result` as one value"),
        "{err}"
    );
    // A mapped result used outside its map.
    let err = Pipeline::build("leak", |p| {
        let parts = p.invoke(numbers, (p.config_input(),));
        let mut leaked = None;
        p.map(&parts, |p, x| {
            let d = p.invoke(double, (x,));
            leaked = Some(d.clone());
            d
        });
        p.invoke_as("outside", double, (leaked.unwrap(),));
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("gather them with `.collect()`"), "{err}");
    // Nested fan-outs.
    let err = Pipeline::build("nested", |p| {
        let parts = p.invoke(numbers, (p.config_input(),));
        p.map(&parts, |p, x| {
            let inner = p.invoke_as("inner", numbers, (p.config_input(),));
            p.map(&inner, |p, y| p.invoke(double, (y,)));
            x
        });
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("nested"), "{err}");
}

/// Runs the `tables` example's `partitioned` pipeline with `config`; returns the
/// process output, stdout (JSON events) and stderr.
fn partitioned(home: &std::path::Path, config: &str) -> (bool, Vec<serde_json::Value>, String) {
    let file = home.join("run.yaml");
    std::fs::create_dir_all(home).unwrap();
    std::fs::write(&file, config).unwrap();
    let (out, stdout, stderr) = run(example("tables", home)
        .args(["execute", "partitioned", "--json", "-c"])
        .arg(&file)
        .env("SOLIDFLOW_PYTHON", dask_support::python()));
    (out.status.success(), json_lines(&stdout), stderr)
}

fn totals(events: &[serde_json::Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["message"].as_str())
        .find(|m| m.starts_with("partitions="))
        .unwrap_or_else(|| panic!("no totals in {events:?}"))
        .to_string()
}

fn expected(count: i64) -> String {
    let totals: Vec<i64> = (0..count).map(|n| 16 * n + 6).collect();
    format!("partitions={count} totals={totals:?}")
}

#[test]
fn multiprocess_runs_one_process_per_item() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, events, stderr) = partitioned(
        dir.path(),
        "storage: {filesystem: {}}\nexecution: {multiprocess: {config: {max_concurrent: 2}}}\nsolids: {partitions: {config: {count: 12}}}",
    );
    assert!(ok, "{stderr}");
    assert_eq!(totals(&events), expected(12));
    let pids: std::collections::BTreeSet<u64> = events
        .iter()
        .filter(|e| {
            e["step_key"]
                .as_str()
                .is_some_and(|k| k.starts_with("summarize[part_"))
        })
        .filter(|e| e["event_type"] == "STEP_SUCCESS")
        .filter_map(|e| e["pid"].as_u64())
        .collect();
    assert_eq!(pids.len(), 12, "one step process per item: {pids:?}");
}

#[test]
fn dask_runs_the_items_as_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, events, stderr) = partitioned(
        dir.path(),
        "storage: {filesystem: {}}\nexecution: {dask: {}}\nsolids: {partitions: {config: {count: 6}}}",
    );
    assert!(ok, "{stderr}");
    assert_eq!(totals(&events), expected(6));
    let on_workers = events
        .iter()
        .filter(|e| {
            e["step_key"]
                .as_str()
                .is_some_and(|k| k.starts_with("summarize[part_"))
        })
        .filter(|e| e["event_type"] == "STEP_SUCCESS")
        .filter(|e| {
            e["worker"]
                .as_str()
                .is_some_and(|w| w.starts_with("tcp://127.0.0.1:"))
        })
        .count();
    assert_eq!(on_workers, 6);
}

#[test]
fn dask_with_s3_keeps_every_item_in_the_bucket_and_collects_them_in_order() {
    let server = s3_support::S3Server::start();
    server.create_bucket("dynamic");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("run.yaml");
    std::fs::write(
        &file,
        format!(
            "storage: {{s3: {{config: {{s3_bucket: dynamic, endpoint_url: '{}', allow_http: true}}}}}}\n\
             execution: {{dask: {{}}}}\n\
             solids: {{partitions: {{config: {{count: 5}}}}}}\n",
            server.endpoint()
        ),
    )
    .unwrap();
    let (out, stdout, stderr) = run(example("tables", dir.path())
        .args(["execute", "partitioned", "--json", "-c"])
        .arg(&file)
        .env("SOLIDFLOW_PYTHON", dask_support::python())
        .env("AWS_ACCESS_KEY_ID", s3_support::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", s3_support::SECRET_KEY));
    assert!(out.status.success(), "{stderr}");
    let events = json_lines(&stdout);
    assert_eq!(totals(&events), expected(5));
    // Every item's step wrote its output to the bucket, under its own key.
    let mut stored: Vec<String> = Vec::new();
    let mut dirs = vec![server.data_dir().join("dynamic")];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                stored.push(path.to_string_lossy().into_owned());
            }
        }
    }
    for n in 0..5 {
        let item = format!("part_{n}");
        assert!(
            stored
                .iter()
                .any(|p| p.contains("summarize") && p.contains(&item)),
            "no stored output of summarize[{item}] among {stored:?}"
        );
    }
}

#[test]
fn the_plan_shows_the_fan_out_as_a_template() {
    let dir = tempfile::tempdir().unwrap();
    let (out, text, stderr) = run(example("tables", dir.path()).args(["plan", "partitioned"]));
    assert!(out.status.success(), "{stderr}");
    assert!(
        text.contains("summarize[?].compute (one step per item of partitions.compute.result"),
        "{text}"
    );
    assert!(
        text.contains("collect of summarize[?].compute.result"),
        "{text}"
    );
    let (out, json, stderr) =
        run(example("tables", dir.path()).args(["plan", "partitioned", "--json"]));
    assert!(out.status.success(), "{stderr}");
    let plan: serde_json::Value = serde_json::from_str(&json).unwrap();
    let template = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["key"] == "summarize[?].compute")
        .expect("template step");
    assert_eq!(
        template["dynamic"]["over"]["step_key"],
        "partitions.compute"
    );
    assert_eq!(template["inputs"][0]["source"]["from"], "mapped");
}

/// The run id a `--json` run reported.
fn run_id_of(events: &[serde_json::Value]) -> String {
    events
        .iter()
        .find(|e| e["event_type"] == "PIPELINE_START")
        .and_then(|e| e["run_id"].as_str())
        .expect("a PIPELINE_START")
        .to_string()
}

/// `reexecute` (or `logs`) in `home`, with `args`; returns success and the JSON events.
fn tables(home: &std::path::Path, args: &[&str]) -> (bool, Vec<serde_json::Value>, String) {
    let (out, stdout, stderr) = run(example("tables", home)
        .args(args)
        .env("SOLIDFLOW_PYTHON", dask_support::python()));
    (out.status.success(), json_lines(&stdout), stderr)
}

fn started(events: &[serde_json::Value]) -> Vec<String> {
    let mut keys: Vec<String> = events
        .iter()
        .filter(|e| e["event_type"] == "STEP_START")
        .filter_map(|e| e["step_key"].as_str().map(str::to_string))
        .collect();
    keys.sort();
    keys
}

#[test]
fn reexecute_from_failure_runs_only_the_failed_items_and_reuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let (ok, events, _) = partitioned(
        home,
        "storage: {filesystem: {}}\nexecution: {multiprocess: {}}\nsolids: {partitions: {config: {count: 6}}, summarize: {config: {fail_on: part_4}}}",
    );
    assert!(!ok);
    let parent = run_id_of(&events);
    std::fs::write(
        home.join("fix.yaml"),
        "solids: {summarize: {config: {fail_on: no_such_partition}}}",
    )
    .unwrap();
    let fix = home.join("fix.yaml");
    let (ok, events, stderr) = tables(
        home,
        &[
            "reexecute",
            &parent,
            "--from-failure",
            "--json",
            "-c",
            fix.to_str().unwrap(),
        ],
    );
    assert!(ok, "{stderr}");
    assert_eq!(
        started(&events),
        ["report.compute", "summarize[part_4].compute"]
    );
    assert_eq!(totals(&events), expected(6));
    // The child's outputs are complete: a selection of the collect alone in a
    // re-execution of the child reads every item, from the child or the parent.
    let child = run_id_of(&events);
    let (ok, events, stderr) = tables(home, &["reexecute", &child, "--select", "report", "--json"]);
    assert!(ok, "{stderr}");
    assert_eq!(started(&events), ["report.compute"]);
    assert_eq!(totals(&events), expected(6));
    // A selection names one item: only it runs, the collect reads the others.
    let (ok, events, stderr) = tables(
        home,
        &[
            "reexecute",
            &child,
            "--select",
            "summarize[part_1]+",
            "--json",
        ],
    );
    assert!(ok, "{stderr}");
    assert_eq!(
        started(&events),
        ["report.compute", "summarize[part_1].compute"]
    );
    assert_eq!(totals(&events), expected(6));
    // The alias alone selects every item.
    let (ok, events, stderr) = tables(
        home,
        &["reexecute", &child, "--select", "summarize", "--json"],
    );
    assert!(ok, "{stderr}");
    assert_eq!(started(&events).len(), 6, "{:?}", started(&events));
    // Run history keeps the real step keys.
    let (out, stdout, stderr) = run(example("tables", home).args(["logs", &parent]));
    assert!(out.status.success(), "{stderr}");
    let log = format!("{stdout}{stderr}");
    assert!(log.contains("summarize[part_4].compute"), "{log}");
}
