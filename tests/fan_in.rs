//! Typed fan-in and configured invocations, end to end through the `tables` example's
//! CLI: ten branches, each configured in code with its own index, gathered by `collect`
//! into one `Vec<i64>`. The fan-in must receive every value, in branch order, whether
//! the steps run in process, in child processes or on a Dask cluster.
//!
//! Run: `cargo test --test fan_in`.

mod common;
#[path = "support/dask.rs"]
mod dask_support;
#[path = "support/s3.rs"]
mod s3_support;

use common::{example, json_lines, run};

/// Runs `tables execute fan_in` with `config` and returns the `collected=` log line.
fn collected(config: &str) -> String {
    collected_with(config, &[])
}

/// [`collected`] with extra environment variables (S3 credentials).
fn collected_with(config: &str, env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("run.yaml");
    std::fs::write(&file, config).unwrap();
    let (out, stdout, stderr) = run(example("tables", &dir.path().join("home"))
        .args(["execute", "fan_in", "--json", "-c"])
        .arg(&file)
        .env("SOLIDFLOW_PYTHON", dask_support::python())
        .envs(env.iter().copied()));
    assert!(out.status.success(), "run failed:\n{stdout}\n{stderr}");
    json_lines(&stdout)
        .iter()
        .filter_map(|e| e["message"].as_str())
        .find(|m| m.starts_with("collected="))
        .unwrap_or_else(|| panic!("no collected= log:\n{stdout}\n{stderr}"))
        .to_string()
}

const ALL: &str = "collected=[0, 10, 20, 30, 40, 50, 60, 70, 80, 90]";

#[test]
fn in_process_gathers_every_branch_in_order() {
    assert_eq!(collected("{}"), ALL);
    assert_eq!(collected("storage: {filesystem: {}}"), ALL);
}

#[test]
fn multiprocess_gathers_every_branch_in_order() {
    assert_eq!(
        collected("storage: {filesystem: {}}\nexecution: {multiprocess: {}}"),
        ALL
    );
}

#[test]
fn dask_gathers_every_branch_in_order() {
    assert_eq!(
        collected("storage: {filesystem: {}}\nexecution: {dask: {}}"),
        ALL
    );
}

#[test]
fn dask_with_s3_gathers_every_branch_in_order() {
    let server = s3_support::S3Server::start();
    server.create_bucket("fan-in");
    let config = format!(
        "storage: {{s3: {{config: {{s3_bucket: fan-in, endpoint_url: '{}', allow_http: true}}}}}}\n\
         execution: {{dask: {{}}}}",
        server.endpoint()
    );
    let env = [
        ("AWS_ACCESS_KEY_ID", s3_support::ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", s3_support::SECRET_KEY),
    ];
    assert_eq!(collected_with(&config, &env), ALL);
}

#[test]
fn run_config_overrides_the_config_set_in_code() {
    let out = collected("solids: {branch_3: {config: {scale: 1}}, branch_9: {config: {index: 0}}}");
    assert_eq!(out, "collected=[0, 10, 20, 3, 40, 50, 60, 70, 80, 0]");
}

#[test]
fn plan_json_lists_every_upstream_of_the_fan_in() {
    let dir = tempfile::tempdir().unwrap();
    let (out, stdout, stderr) =
        run(example("tables", dir.path()).args(["plan", "fan_in", "--json"]));
    assert!(out.status.success(), "{stderr}");
    let plan: serde_json::Value = serde_json::from_str(&stdout).expect("plan JSON");
    let collect = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["key"] == "collect.compute")
        .expect("collect step");
    let sources: Vec<&str> = collect["inputs"][0]["source"]["sources"]
        .as_array()
        .expect("fan-in sources")
        .iter()
        .map(|s| s["step_key"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..10).map(|i| format!("branch_{i}.compute")).collect();
    assert_eq!(sources, expected);
}
