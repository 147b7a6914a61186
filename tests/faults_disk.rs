//! A full disk (issue 10, items 10 and 12), on small tmpfs mounts made by the test.
//!
//! - Intermediate storage on a 1 MiB file system, a 2 MiB value: the step fails with
//!   the cause first (`No space left on device`, ENOSPC) and the file's path.
//! - Run history on a file system the test fills mid-run: the run does not end as a
//!   plain success; the console says history is incomplete and the exit code is 1.
//!
//! Mounting needs root (`mount -t tmpfs`); without it the tests fail and say so.
//!
//! Run: `cargo test --test faults_disk -- --test-threads=2`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use solidflow::conformance::executor::LiveRun;

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct SmallDisk {
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("disk");
        std::fs::create_dir(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .unwrap_or_else(|e| panic!("the disk-full tests need `mount` (as root): {e}"));
        assert!(
            out.status.success(),
            "the disk-full tests mount a {size} tmpfs and need root for it: `mount -t tmpfs` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir, _tmp: tmp }
    }

    /// Fills the file system until a write fails with ENOSPC.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.dir.join("filler")).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        loop {
            match f.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the disk failed otherwise: {e}"),
            }
        }
        let _ = f.sync_all();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn faults(pipeline: &str, config: &Path, home: &Path, work: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_faults"));
    command
        .args(["execute", pipeline, "--json", "-c"])
        .arg(config)
        .env("SOLIDFLOW_HOME", home)
        .env("SF_FAULTS_DIR", work);
    command
}

#[test]
fn disk_full_storage_errors_put_enospc_and_the_path_first() {
    let disk = SmallDisk::mount("1m");
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("run.yaml");
    for executor in ["in_process", "multiprocess"] {
        std::fs::write(
            &config,
            format!(
                "execution: {{{executor}: {{}}}}\n\
                 storage: {{filesystem: {{config: {{base_dir: '{}'}}}}}}\n\
                 solids: {{big_value: {{config: {{mib: 2}}}}}}\n",
                disk.dir.display()
            ),
        )
        .unwrap();
        let out = LiveRun::start(faults(
            "write_big",
            &config,
            &tmp.path().join("home"),
            tmp.path(),
        ))
        .finish();
        assert_eq!(out.code, Some(1), "{}", out.describe());
        let failure = out
            .of_type("STEP_FAILURE")
            .next()
            .unwrap_or_else(|| panic!("no STEP_FAILURE: {}", out.describe()));
        let message = failure["data"]["error"]["message"].as_str().unwrap_or("");
        let expected = format!(
            "No space left on device (os error 28) (ENOSPC) at {}/",
            disk.dir.display()
        );
        assert!(
            message.starts_with(&expected),
            "{executor}: the cause and the path come first:\n{message}\n(expected it to start with {expected:?})"
        );
        assert!(
            message.contains("big_value.compute/result"),
            "{executor}: {message}"
        );
    }
}

#[test]
fn run_history_write_failures_fail_the_run_and_say_history_is_incomplete() {
    let disk = SmallDisk::mount("4m");
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("run.yaml");
    std::fs::write(
        &config,
        "execution: {in_process: {}}\nstorage: {in_memory: {}}\nsolids: {chatty: {config: {lines: 3000}}}\n",
    )
    .unwrap();
    let mut run = LiveRun::start(faults("chatty", &config, &disk.dir, tmp.path()));
    run.wait_log("ready");
    disk.fill();
    std::fs::write(tmp.path().join("go"), "go").unwrap();
    let out = run.finish();
    assert_eq!(out.code, Some(1), "{}", out.describe());
    // The events themselves are complete on the console; the record is not.
    assert_eq!(
        out.of_type("PIPELINE_SUCCESS").count(),
        1,
        "{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("run history is incomplete")
            && out.stderr.contains("history.db")
            && out.stderr.contains("full"),
        "{}",
        out.stderr
    );
}
