//! Bad input met the way an operator meets it (issue 10, items 13 to 16), driven through
//! the built example binaries: `plan` refuses what `execute` refuses, numbers out of
//! range are refused with their path and never panic, run ids cannot escape storage,
//! an ambiguous run-id prefix lists its candidates, and a closed stdout is not a panic.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};

use common::{example, run};

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `plan` and `execute` of `pipeline` in example `bin` with `config`, and returns
/// (exit code, stderr) of each.
fn plan_and_execute(bin: &str, pipeline: &str, config: &str) -> [(Option<i32>, String); 2] {
    let home = tempfile::tempdir().unwrap();
    let file = write(home.path(), "run.yaml", config);
    ["plan", "execute"].map(|command| {
        let (out, _, stderr) = run(example(bin, home.path())
            .args([command, pipeline, "-c"])
            .arg(&file));
        (out.status.code(), stderr)
    })
}

#[test]
fn plan_refuses_every_config_that_execute_refuses() {
    let cases = [
        (
            "hello_world",
            "dask_pipeline",
            "{storage: {in_memory: {}}, execution: {multiprocess: {}}}",
            "in_memory",
        ),
        (
            "hello_world",
            "dask_pipeline",
            "{storage: {filesystem: {}}, execution: {dask: {config: {timeout: -5}}}}",
            "execution.dask.config.timeout",
        ),
        (
            "resources_retries",
            "model_refresh",
            "{storage: {filesystem: {}}, execution: {in_process: {config: {resources: {CPU: 4}}}}, solids: {fetch_features: {config: {rows: 5}}}}",
            "GPU",
        ),
    ];
    for (bin, pipeline, config, expected) in cases {
        for (command, (code, stderr)) in ["plan", "execute"]
            .into_iter()
            .zip(plan_and_execute(bin, pipeline, config))
        {
            assert_eq!(code, Some(2), "{command} {config}: {stderr}");
            assert!(
                stderr.contains(expected),
                "{command} {config}: expected {expected:?} in\n{stderr}"
            );
        }
    }
}

#[test]
fn numbers_out_of_range_are_refused_with_their_path_and_never_panic() {
    let dask = |config: &str| {
        format!("{{storage: {{filesystem: {{}}}}, execution: {{dask: {{config: {config}}}}}}}")
    };
    let retry = |retry: &str| format!("{{solids: {{hello_world: {{retry: {retry}}}}}}}");
    let cases = [
        (dask("{timeout: 1e30}"), "execution.dask.config.timeout"),
        (
            dask("{timeout: 18446744073709551616}"),
            "execution.dask.config.timeout",
        ),
        (dask("{timeout: -5}"), "execution.dask.config.timeout"),
        (
            dask("{n_workers: -2}"),
            "execution.dask.config.n_workers",
        ),
        (
            retry("{max_retries: 1, delay: 1e30}"),
            "solids.hello_world.retry.delay",
        ),
        (
            retry("{max_retries: 1, backoff: 1e308}"),
            "solids.hello_world.retry.backoff",
        ),
        (retry("{delay: -1}"), "solids.hello_world.retry.delay"),
        (
            "{execution: {in_process: {config: {resources: {GPU: -1}}}}}".to_string(),
            "execution.in_process.config.resources.GPU",
        ),
        (
            "{execution: {multiprocess: {config: {max_concurrent: -1}}}, storage: {filesystem: {}}}"
                .to_string(),
            "execution.multiprocess.config.max_concurrent",
        ),
        (
            "{storage: {filesystem: {config: {base_dir: ''}}}}".to_string(),
            "storage.filesystem.config.base_dir",
        ),
        (
            "{storage: {s3: {config: {s3_bucket: b, part_size_mb: -16}}}}".to_string(),
            "storage.s3.config.part_size_mb",
        ),
    ];
    for (config, path) in cases {
        for (command, (code, stderr)) in ["plan", "execute"].into_iter().zip(plan_and_execute(
            "hello_world",
            "dask_pipeline",
            &config,
        )) {
            assert!(!stderr.contains("panicked"), "{command} {config}: {stderr}");
            assert_eq!(code, Some(2), "{command} {config}: {stderr}");
            assert!(
                stderr.contains(path),
                "{command} {config}: expected the path {path} in\n{stderr}"
            );
        }
    }
}

#[test]
fn enum_values_are_checked_and_listed() {
    let home = tempfile::tempdir().unwrap();
    let (out, schema, stderr) =
        run(example("hello_world", home.path()).args(["config-schema", "dask_pipeline"]));
    assert!(out.status.success(), "{stderr}");
    assert!(
        schema.contains("log_level: <one of DEBUG, INFO, WARNING, ERROR> = \"INFO\""),
        "{schema}"
    );
    assert!(
        schema.contains("# one of: local | existing | slurm"),
        "{schema}"
    );
    let [(code, stderr), _] = plan_and_execute(
        "hello_world",
        "dask_pipeline",
        "{storage: {filesystem: {}}, execution: {dask: {config: {cluster: {slurmm: {}}}}}}",
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("execution.dask.config.cluster.slurmm")
            && stderr.contains("did you mean `slurm`"),
        "{stderr}"
    );
}

#[test]
fn run_ids_that_could_escape_storage_are_refused_before_anything_is_written() {
    let root = tempfile::tempdir().unwrap();
    let home = root.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let config = write(&home, "fs.yaml", "{storage: {filesystem: {}}}");
    let too_long = "r".repeat(200);
    for id in ["../../escaped/x", "", "a/b", ".hidden", too_long.as_str()] {
        let (out, _, stderr) = run(example("hello_world", &home)
            .args(["execute", "dask_pipeline", "-c"])
            .arg(&config)
            .args(["--run-id", id]));
        assert_eq!(out.status.code(), Some(2), "--run-id {id:?}: {stderr}");
        assert!(stderr.contains("invalid run id"), "{stderr}");
    }
    assert!(!root.path().join("escaped").exists());
    assert!(!home.join("storage").exists(), "nothing may be written");
    let (out, _, stderr) = run(example("hello_world", &home)
        .args(["execute", "dask_pipeline", "-c"])
        .arg(&config)
        .args(["--run-id", "nightly-2026.12.01"]));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        home.join("storage/nightly-2026.12.01/intermediates")
            .is_dir()
    );
}

#[test]
fn logs_with_an_ambiguous_run_id_prefix_lists_the_candidates() {
    let home = tempfile::tempdir().unwrap();
    for id in ["batch-1", "batch-2", "batch-10"] {
        let (out, _, stderr) = run(example("hello_world", home.path()).args([
            "execute",
            "dask_pipeline",
            "--run-id",
            id,
        ]));
        assert_eq!(out.status.code(), Some(0), "{stderr}");
    }
    let (out, _, stderr) = run(example("hello_world", home.path()).args(["logs", "batch"]));
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("ambiguous"), "{stderr}");
    for id in ["batch-1", "batch-2", "batch-10"] {
        assert!(stderr.contains(id), "{id} missing in\n{stderr}");
    }
    // A whole id is never ambiguous, even when it prefixes another one.
    let (out, stdout, stderr) =
        run(example("hello_world", home.path()).args(["logs", "batch-1", "--json"]));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("\"run_id\":\"batch-1\""), "{stdout}");
    assert!(!stdout.contains("\"run_id\":\"batch-10\""), "{stdout}");
    let (out, _, stderr) = run(example("hello_world", home.path()).args(["logs", "batch-2"]));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

/// Runs `args` with stdout a pipe whose reading end is already closed, like
/// `list | grep -q` after grep exited.
fn with_closed_stdout(home: &Path, args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    example("hello_world", home)
        .args(args)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    let home = tempfile::tempdir().unwrap();
    let (out, _, stderr) =
        run(example("hello_world", home.path()).args(["execute", "dask_pipeline"]));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for args in [
        &["list"][..],
        &["runs"],
        &["runs", "--json"],
        &["plan", "dask_pipeline"],
        &["config-schema", "dask_pipeline"],
    ] {
        let out = with_closed_stdout(home.path(), args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?} must exit quietly: {stderr}");
    }
}
