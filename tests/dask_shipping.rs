//! `ship_binary: true` against a real Dask cluster (`dask scheduler` + `dask worker`
//! processes from the test helper): a build is uploaded to the scheduler once, a second
//! run of it sends nothing, the scheduler keeps only the last `keep_builds` builds, and a
//! worker fetches a build only when one of its tasks needs it, so a worker that joins
//! late runs the current build without downloading the others.
//!
//! The builds are copies of the conformance binary, stripped (so each upload is tens of
//! MB, not hundreds) and each with a different tail, which makes a different sha256 of a
//! binary that runs the same. Needs the venv from `scripts/python-env.sh` (or
//! `SOLIDFLOW_PYTHON`) and `strip` (binutils); without them it fails and says so.
//!
//! Run: `cargo test --test dask_shipping`.

#[path = "support/dask.rs"]
mod dask_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use dask_support::{DaskCluster, WorkerSpec, python};
use serde_json::Value;
use solidflow::conformance::executor::{LiveRun, Outcome};

const STEPS: [&str; 4] = ["numbers", "sum_evens", "sum_odds", "total"];

/// A stripped copy of the conformance binary, then one copy per name with the name
/// appended: same program, different build.
fn builds(dir: &Path, names: &[&str]) -> Vec<(PathBuf, u64)> {
    let base = dir.join("conformance-stripped");
    std::fs::copy(env!("CARGO_BIN_EXE_conformance"), &base).expect("copy the conformance binary");
    let status = Command::new("strip").arg(&base).status().unwrap_or_else(|e| {
        panic!("this test needs `strip` (binutils) to make small builds, but it cannot be run ({e}): install binutils")
    });
    assert!(
        status.success(),
        "strip {} failed: {status}",
        base.display()
    );
    let bytes = std::fs::read(&base).expect("read the stripped binary");
    names
        .iter()
        .map(|name| {
            let path = dir.join(format!("pipeline-{name}"));
            let mut build = bytes.clone();
            build.extend_from_slice(format!("\nsolidflow test build {name}\n").as_bytes());
            std::fs::write(&path, &build).expect("write a build");
            let mut perms = std::fs::metadata(&path).unwrap().permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
            std::fs::set_permissions(&path, perms).unwrap();
            (path, build.len() as u64)
        })
        .collect()
}

/// Runs `<build> execute success --json` on the cluster with `ship_binary: true`.
fn run(dir: &Path, build: &Path, address: &str) -> Outcome {
    let config = dir.join("ship.yaml");
    std::fs::write(
        &config,
        format!(
            "storage: {{filesystem: {{}}}}\nexecution: {{dask: {{config: {{address: '{address}', ship_binary: true, keep_builds: 2}}}}}}\n"
        ),
    )
    .unwrap();
    let mut command = Command::new(build);
    command
        .args(["execute", "success", "--json", "-c"])
        .arg(&config)
        .env("SOLIDFLOW_HOME", dir.join("home"))
        .env("SOLIDFLOW_PYTHON", python())
        .current_dir(dir);
    let out = LiveRun::start(command).finish();
    assert_eq!(out.code, Some(0), "{}", out.describe());
    for step in STEPS {
        assert!(
            out.of_type("STEP_SUCCESS")
                .any(|e| e["step_key"] == format!("{step}.compute")),
            "{step} did not succeed: {}",
            out.describe()
        );
    }
    out
}

/// The details of the run's shipping event.
fn shipped(out: &Outcome) -> Value {
    out.of_type("ENGINE_EVENT")
        .find(|e| e["data"]["details"].get("bytes_sent").is_some())
        .unwrap_or_else(|| panic!("no shipping event: {}", out.describe()))["data"]["details"]
        .clone()
}

fn sha_of(out: &Outcome) -> String {
    shipped(out)["sha256"].as_str().unwrap().to_string()
}

/// The builds in a worker's cache (file names are hashes; partial downloads start with `.`).
fn cached(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_build_ships_once_old_builds_are_evicted_and_late_workers_fetch_on_first_use() {
    let mut cluster = DaskCluster::start(&[WorkerSpec::plain("first")]);
    let address = cluster.address.clone();
    let dir = tempfile::Builder::new()
        .prefix("solidflow-ship-test-")
        .tempdir()
        .unwrap();
    let dir = dir.path();
    let builds = builds(dir, &["a", "b", "c"]);
    let [(a, a_size), (b, _), (c, c_size)] = &builds[..] else {
        unreachable!()
    };

    // First run of build a: uploaded whole.
    let out = run(dir, a, &address);
    let first = shipped(&out);
    assert_eq!(first["cached"], false, "{first}");
    assert_eq!(first["bytes_sent"], *a_size, "{first}");
    let sha_a = sha_of(&out);

    // Second run of the same build: the scheduler has it, nothing is uploaded.
    let out = run(dir, a, &address);
    let again = shipped(&out);
    assert_eq!(again["cached"], true, "{again}");
    assert_eq!(again["bytes_sent"], 0, "{again}");
    assert_eq!(again["kept"], serde_json::json!([sha_a]), "{again}");
    let first_worker = cluster.worker_named("first");
    assert_eq!(
        cached(&cluster.bin_cache(first_worker)),
        vec![sha_a.clone()]
    );

    // Builds b and c: with keep_builds 2 the scheduler evicts a, the least recently used.
    let sha_b = sha_of(&run(dir, b, &address));
    let out = run(dir, c, &address);
    let third = shipped(&out);
    let sha_c = sha_of(&out);
    assert_eq!(third["cached"], false, "{third}");
    assert_eq!(third["bytes_sent"], *c_size, "{third}");
    assert_eq!(third["evicted"], serde_json::json!([sha_a]), "{third}");
    assert_eq!(
        third["kept"],
        serde_json::json!([sha_c.clone(), sha_b.clone()]),
        "{third}"
    );

    // A worker that joins now fetches nothing until a task of the current build runs on
    // it, and then only that build.
    cluster.kill_worker(first_worker);
    let late = cluster.add_worker(WorkerSpec::plain("late"));
    let late_address = cluster.worker_address(late).to_string();
    assert!(
        cached(&cluster.bin_cache(late)).is_empty(),
        "a joining worker downloaded builds: {:?}",
        cached(&cluster.bin_cache(late))
    );
    let out = run(dir, c, &address);
    assert_eq!(shipped(&out)["cached"], true, "{}", out.describe());
    assert!(
        out.of_type("STEP_SUCCESS")
            .all(|e| e["worker"] == late_address.as_str()),
        "{}",
        out.describe()
    );
    assert_eq!(cached(&cluster.bin_cache(late)), vec![sha_c.clone()]);

    // The evicted build is uploaded again when it is needed again.
    let out = run(dir, a, &address);
    let back = shipped(&out);
    assert_eq!(back["cached"], false, "{back}");
    assert_eq!(back["bytes_sent"], *a_size, "{back}");
    assert_eq!(back["evicted"], serde_json::json!([sha_b]), "{back}");
}
