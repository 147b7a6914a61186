//! Test helper for the fault tests: one test's directory — a solidflow home, a work
//! directory shared with the `faults` binary's solids (`$SF_FAULTS_DIR`) and a
//! temporary directory that every process of the test gets as `$TMPDIR` — and
//! `faults execute` started in it.
//!
//! Include it with `#[path = "support/fault_world.rs"] mod fault_world;` next to
//! `support/dask.rs` (as `mod dask_support`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use solidflow::conformance::executor::LiveRun;

/// One test's directories.
pub(crate) struct World {
    tmp: tempfile::TempDir,
}

impl World {
    /// Fresh directories (`work/`, `tmp/`) in the test process's temporary directory.
    pub(crate) fn new() -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        for dir in ["work", "tmp"] {
            std::fs::create_dir_all(tmp.path().join(dir)).expect("create test dirs");
        }
        Self { tmp }
    }

    /// A file in the work directory the solids share with the test.
    pub(crate) fn work(&self, name: &str) -> PathBuf {
        self.tmp.path().join("work").join(name)
    }

    /// The `$TMPDIR` of every process the test starts (pipeline, scheduler, workers).
    pub(crate) fn tmpdir(&self) -> PathBuf {
        self.tmp.path().join("tmp")
    }

    /// The solidflow home.
    pub(crate) fn home(&self) -> PathBuf {
        self.tmp.path().join("home")
    }

    /// Starts `faults execute <pipeline> --json` with the run config `config` (YAML),
    /// in this world's directories.
    pub(crate) fn execute(&self, pipeline: &str, config: &str) -> LiveRun {
        let path = self.tmp.path().join(format!("{pipeline}.yaml"));
        std::fs::write(&path, config).expect("write run config");
        let mut command = Command::new(env!("CARGO_BIN_EXE_faults"));
        command
            .args(["execute", pipeline, "--json", "-c"])
            .arg(&path)
            .current_dir(self.tmp.path())
            .env("SOLIDFLOW_HOME", self.home())
            .env("SF_FAULTS_DIR", self.tmp.path().join("work"))
            .env("TMPDIR", self.tmpdir())
            .env("SOLIDFLOW_PYTHON", crate::dask_support::python());
        LiveRun::start(command)
    }

    /// The status `faults runs` shows for the newest run in this home.
    pub(crate) fn run_status(&self) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_faults"))
            .arg("runs")
            .env("SOLIDFLOW_HOME", self.home())
            .env("TMPDIR", self.tmpdir())
            .output()
            .expect("faults runs");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let line = text.lines().next().unwrap_or_default().to_string();
        line.split('\t').nth(2).unwrap_or_default().to_string()
    }

    /// Asserts that nothing of solidflow's is left in `$TMPDIR` after `fault` (what Dask
    /// keeps there, its `dask-scratch-space`, is Dask's and is listed only).
    pub(crate) fn assert_tmpdir_clean(&self, fault: &str) {
        let mut entries = Vec::new();
        list(&self.tmpdir(), &self.tmpdir(), &mut entries);
        let leftovers: Vec<&String> = entries
            .iter()
            .filter(|p| p.to_lowercase().contains("solidflow"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "after {fault}, solidflow left {leftovers:?} in $TMPDIR ({}); everything there: {entries:?}",
            self.tmpdir().display()
        );
    }
}

/// Every path under `dir`, relative to `root`.
fn list(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let relative = path.strip_prefix(root).unwrap_or(&path);
        out.push(relative.display().to_string());
        if path.is_dir() {
            list(root, &path, out);
        }
    }
}
