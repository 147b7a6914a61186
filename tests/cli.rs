//! The CLI every pipeline binary gets, driven through the built example binaries.

mod common;

use common::{example, json_lines, run};

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn hello_world_runs_on_the_embedded_default_with_no_arguments() {
    let home = tempfile::tempdir().unwrap();
    let (out, _, stderr) = run(&mut example("hello_world", home.path()));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("LOG_MESSAGE hello_world.compute - saying hello"),
        "{stderr}"
    );
    assert!(stderr.contains("PIPELINE_SUCCESS"), "{stderr}");
    assert!(
        home.path().join("history.db").is_file(),
        "run history must be recorded"
    );
}

#[test]
fn the_seeds_config_blocks_are_accepted_verbatim() {
    let home = tempfile::tempdir().unwrap();
    let local = write(
        home.path(),
        "local.yaml",
        "{'storage': {'filesystem': {}}, 'execution': {'dask': {}}}",
    );
    let remote = write(
        home.path(),
        "remote.yaml",
        "{'storage': {'s3': {'config': {'s3_bucket': 'YOUR_BUCKET_HERE'}}},\n 'execution': {'dask': {'config': {'address': 'dask_scheduler.dns-name:8787'}}}}",
    );
    for config in [local, remote] {
        // `plan` checks what `execute` checks, including that S3 credentials can be
        // found (from the environment: the test support turns the metadata service
        // off). Building the storage makes no request, so nothing leaves the machine.
        let (out, stdout, stderr) = run(example("hello_world", home.path())
            .env("AWS_ACCESS_KEY_ID", "seed-example")
            .env("AWS_SECRET_ACCESS_KEY", "seed-example")
            .args(["plan", "dask_pipeline", "-c"])
            .arg(&config));
        assert_eq!(out.status.code(), Some(0), "{}: {stderr}", config.display());
        assert!(stdout.contains("hello_world.compute"), "{stdout}");
    }
}

#[test]
fn list_plan_and_config_schema_describe_the_pipeline() {
    let home = tempfile::tempdir().unwrap();
    let (out, stdout, _) = run(example("etl", home.path()).arg("list"));
    assert!(out.status.success());
    assert!(stdout.starts_with("etl\t5 solids"), "{stdout}");

    let (out, stdout, stderr) = run(example("etl", home.path()).args([
        "plan",
        "etl",
        "-c",
        "examples/config/etl.yaml",
        "--json",
    ]));
    assert!(out.status.success(), "{stderr}");
    let plan: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let keys: Vec<&str> = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "extract_orders.compute",
            "validate.compute",
            "revenue_by_region.compute",
            "top_customers.compute",
            "write_report.compute"
        ]
    );
    let report = &plan["steps"][4];
    assert_eq!(report["level"], 3);
    assert_eq!(
        report["inputs"][2]["source"],
        serde_json::json!({"from": "step", "step_key": "validate.compute", "output": "rejected"})
    );

    let (_, text, _) =
        run(example("etl", home.path()).args(["plan", "etl", "-c", "examples/config/etl.yaml"]));
    assert!(
        text.contains("in  rejected: alloc::vec::Vec<etl::Order> <- validate.compute.rejected"),
        "{text}"
    );

    let (out, schema, _) = run(example("etl", home.path()).args(["config-schema", "etl"]));
    assert!(out.status.success());
    assert!(
        schema.contains("orders: <an integer ≥ 0> (required)"),
        "{schema}"
    );
    assert!(schema.contains("seed: <an integer ≥ 0> = 0"), "{schema}");
    assert!(
        schema.contains("# one of: in_process | multiprocess"),
        "{schema}"
    );
}

#[test]
fn etl_runs_records_history_and_prints_json_events() {
    let home = tempfile::tempdir().unwrap();
    let report = home.path().join("report.json");
    let overrides = write(
        home.path(),
        "out.yaml",
        &format!(
            "solids: {{write_report: {{config: {{path: '{}'}}}}}}",
            report.display()
        ),
    );
    let (out, stdout, stderr) = run(example("etl", home.path())
        .args(["execute", "etl", "-c", "examples/config/etl.yaml", "-c"])
        .arg(&overrides)
        .arg("--json"));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let events = json_lines(&stdout);
    assert_eq!(events.first().unwrap()["event_type"], "PIPELINE_START");
    assert_eq!(events.last().unwrap()["event_type"], "PIPELINE_SUCCESS");
    let mat = events
        .iter()
        .find(|e| e["event_type"] == "MATERIALIZATION")
        .expect("materialization event");
    assert_eq!(
        mat["data"]["metadata"]["path"],
        report.display().to_string()
    );
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(written["revenue_by_region"].as_object().unwrap().len(), 3);
    let run_id = events[0]["run_id"].as_str().unwrap();

    let (_, runs, _) = run(example("etl", home.path()).args(["runs", "--json"]));
    let runs = json_lines(&runs);
    assert_eq!(runs[0]["run_id"], run_id);
    assert_eq!(runs[0]["status"], "SUCCESS");
    let (_, logs, _) = run(example("etl", home.path()).args(["logs", &run_id[..8], "--json"]));
    assert_eq!(
        json_lines(&logs).len(),
        events.len(),
        "run history keeps every event"
    );
}

#[test]
fn a_failing_step_exits_1_and_names_the_cause() {
    let home = tempfile::tempdir().unwrap();
    let blocker = write(home.path(), "not-a-dir", "");
    let overrides = write(
        home.path(),
        "bad.yaml",
        &format!(
            "solids: {{write_report: {{config: {{path: '{}/report.json'}}}}}}",
            blocker.display()
        ),
    );
    let (out, _, stderr) = run(example("etl", home.path())
        .args(["execute", "etl", "-c", "examples/config/etl.yaml", "-c"])
        .arg(&overrides));
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("STEP_FAILURE write_report.compute"),
        "{stderr}"
    );
    assert!(stderr.contains("PIPELINE_FAILURE"), "{stderr}");
}

#[test]
fn bad_config_lists_every_error_with_path_line_and_hint_and_exits_2() {
    let home = tempfile::tempdir().unwrap();
    let bad = write(
        home.path(),
        "bad.yaml",
        "solids:\n  extract_orders:\n    config:\n      orders: many\n  validat: {}\nstorage:\n  filesytem: {}\nexecution:\n  in_process:\n    config:\n      max_concurrent: two\n",
    );
    let (out, _, stderr) = run(example("etl", home.path())
        .args(["execute", "etl", "-c"])
        .arg(&bad));
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let file = bad.display().to_string();
    for expected in [
        format!(
            "solids.extract_orders.config.orders: expected an integer ≥ 0, found the string \"many\" (at {file}:4:"
        ),
        format!("solids.validat: unknown key `validat` (at {file}:5:3); did you mean `validate`?"),
        "solids.write_report.config.path: missing required key `path`".to_string(),
        format!(
            "storage.filesytem: unknown key `filesytem` (at {file}:7:3); did you mean `filesystem`?"
        ),
        format!(
            "execution.in_process.config.max_concurrent: expected an integer from 0 to 4096, found the string \"two\" (at {file}:11:"
        ),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert!(stderr.contains("(5 errors)"), "{stderr}");
    assert!(
        !home.path().join("history.db").exists() || !stderr.contains("PIPELINE_START"),
        "nothing runs on bad config"
    );
}

#[test]
fn usage_errors_exit_2_with_a_hint() {
    let home = tempfile::tempdir().unwrap();
    let (out, _, stderr) =
        run(example("hello_world", home.path()).args(["execute", "dask_pipelin"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("no pipeline `dask_pipelin`")
            && stderr.contains("Did you mean `dask_pipeline`?"),
        "{stderr}"
    );
    let (out, _, _) = run(example("hello_world", home.path()).arg("frobnicate"));
    assert_eq!(out.status.code(), Some(2));
    let (out, stdout, _) = run(example("hello_world", home.path()).args(["execute", "--help"]));
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout.contains("--config"), "{stdout}");
    let (out, _, stderr) = run(example("hello_world", home.path()).args([
        "execute",
        "dask_pipeline",
        "-c",
        "/nonexistent.yaml",
    ]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("cannot read config file /nonexistent.yaml"),
        "{stderr}"
    );
}

#[test]
fn the_resources_example_runs_with_warm_step_servers() {
    let home = tempfile::tempdir().unwrap();
    let (out, stdout, stderr) = run(example("resources_retries", home.path()).args([
        "execute",
        "model_refresh",
        "--json",
        "-c",
        "examples/config/multiprocess.yaml",
        "-c",
        "examples/config/multiprocess_warm.yaml",
    ]));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let events = json_lines(&stdout);
    let warm_launches = events
        .iter()
        .filter(|e| {
            e["data"]["details"]["isolation"] == "warm" && e["data"]["details"]["forked"] == true
        })
        .count();
    assert!(
        warm_launches >= 4,
        "every step forked by a warm server: {stdout}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["event_type"] == "STEP_UP_FOR_RETRY"),
        "the flaky fetch is retried as with process isolation"
    );
}
