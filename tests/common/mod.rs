//! Helpers shared by the CLI integration tests: locating example binaries and running them
//! with an isolated `SOLIDFLOW_HOME`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The path of a built example binary (`cargo test` builds examples before tests).
pub(crate) fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/..");
    let bin = profile_dir.join("examples").join(name);
    assert!(
        bin.is_file(),
        "example binary {} not found; run the tests with `cargo test` so examples are built",
        bin.display()
    );
    bin
}

/// A command for example `name` with its own solidflow home.
pub(crate) fn example(name: &str, home: &Path) -> Command {
    let mut cmd = Command::new(example_bin(name));
    cmd.env("SOLIDFLOW_HOME", home)
        .env("NO_COLOR", "1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}

/// Runs a command and returns its output, with stdout/stderr as strings.
pub(crate) fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().expect("spawn example");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// Parses `--json` output: one event per line.
pub(crate) fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}
