//! Pipelines for the fault tests (`tests/faults_*.rs`).
//!
//! Not an example to copy: these solids leave processes behind, write large values and
//! wait for the test to break something (kill a process, stop the S3 server, fill the
//! disk). They coordinate with the test through files in `$SF_FAULTS_DIR`, polled with
//! deadlines, never through fixed sleeps.
//!
//! ```sh
//! cargo run --bin faults -- list
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::Deserialize;
use solidflow::prelude::*;

use solidflow::conformance::files::{shared_dir, wait_for, write_atomic};

fn dir() -> PathBuf {
    shared_dir("SF_FAULTS_DIR")
}

// --- processes a solid leaves behind ----------------------------------------------------

/// What the spawning solid does once its children run.
#[derive(Deserialize, JsonSchema)]
pub struct SpawnConfig {
    /// `return`: finish at once, leaving the children running; `wait`: sleep until
    /// killed or canceled (120 s at most).
    then: String,
}

/// Starts two long-running shells, one in the step's process group and one in a new
/// session (`setsid`, as a daemon would), writes `<alias>.pid`, `<alias>.child.pid` and
/// `<alias>.daemon.pid`, logs `<alias> spawned`, then returns or waits.
#[solid(config = SpawnConfig)]
fn spawner(ctx: &SolidContext) -> Result<i64, SolidError> {
    let cfg: SpawnConfig = ctx.config()?;
    let me = ctx.solid_name();
    let dir = dir();
    for (kind, setsid) in [("child", false), ("daemon", true)] {
        let pid_file = dir.join(format!("{me}.{kind}.pid"));
        let script = format!(
            "trap '' TERM INT HUP; echo $$ > '{0}.tmp'; mv '{0}.tmp' '{0}'; while :; do sleep 0.05; done",
            pid_file.display()
        );
        let mut command = std::process::Command::new("sh");
        command
            .arg("-c")
            .arg(script)
            .stdin(std::process::Stdio::null());
        if setsid {
            use std::os::unix::process::CommandExt;
            // SAFETY: setsid(2) in the forked child before exec; no allocation.
            unsafe {
                command.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                });
            }
        }
        // Dropping a `Child` neither waits for nor kills the process: it keeps running.
        drop(command.spawn()?);
        if !wait_for(&pid_file, Duration::from_secs(30)) {
            return Err(SolidError::new(format!("{kind} never wrote its pid")));
        }
    }
    write_atomic(
        &dir.join(format!("{me}.pid")),
        &std::process::id().to_string(),
    )?;
    ctx.log().info(format!("{me} spawned"));
    if cfg.then == "wait" {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        return Err(SolidError::new("spawner was never killed or canceled"));
    }
    Ok(7)
}

/// Runs after the spawner.
#[solid]
fn after(_ctx: &SolidContext, value: i64) -> i64 {
    value + 1
}

fn orphans() -> Pipeline {
    Pipeline::build("orphans", |p| {
        let s = p.invoke(spawner, ());
        p.invoke(after, (s,));
    })
    .expect("valid pipeline")
}

// --- storage under stress ---------------------------------------------------------------

/// How big a value to write, and whether to wait for `go` first.
#[derive(Deserialize, JsonSchema)]
pub struct WriteConfig {
    /// Size of the value in MiB.
    mib: u64,
    /// Log `ready`, then wait for the file `go` in `$SF_FAULTS_DIR` before returning.
    #[serde(default)]
    wait_for_go: bool,
}

/// Returns a value of `mib` MiB (after `go`, if asked), to be written by the storage.
#[solid(config = WriteConfig)]
fn big_value(ctx: &SolidContext) -> Result<Vec<u8>, SolidError> {
    let cfg: WriteConfig = ctx.config()?;
    if cfg.wait_for_go {
        ctx.log().info("ready");
        if !wait_for(&dir().join("go"), Duration::from_secs(60)) {
            return Err(SolidError::new("the go file never appeared"));
        }
    }
    let len = usize::try_from(cfg.mib << 20).map_err(|e| SolidError::new(e.to_string()))?;
    Ok((0..len).map(|i| (i % 251) as u8).collect())
}

/// Reads the value back and reports its length.
#[solid]
fn measure(ctx: &SolidContext, value: &Vec<u8>) -> u64 {
    ctx.log().info(format!("read {} bytes", value.len()));
    value.len() as u64
}

fn write_big() -> Pipeline {
    Pipeline::build("write_big", |p| {
        let v = p.invoke(big_value, ());
        p.invoke(measure, (v,));
    })
    .expect("valid pipeline")
}

/// Logs a lot of lines (each one is an event in run history), then succeeds.
#[derive(Deserialize, JsonSchema)]
pub struct ChattyConfig {
    /// How many lines.
    lines: u32,
}

/// Logs `ready`, waits for `go`, then logs `lines` lines of 1 KiB.
#[solid(config = ChattyConfig)]
fn chatty(ctx: &SolidContext) -> Result<u32, SolidError> {
    let cfg: ChattyConfig = ctx.config()?;
    ctx.log().info("ready");
    if !wait_for(&dir().join("go"), Duration::from_secs(60)) {
        return Err(SolidError::new("the go file never appeared"));
    }
    let filler = "x".repeat(1024);
    for i in 0..cfg.lines {
        ctx.log().info(format!("line {i} {filler}"));
    }
    Ok(cfg.lines)
}

fn chatty_pipeline() -> Pipeline {
    Pipeline::build("chatty", |p| {
        p.invoke(chatty, ());
    })
    .expect("valid pipeline")
}

// --- a step that fails ----------------------------------------------------------------

/// Fails every attempt; its policy retries it once.
#[solid(retry(max_retries = 1, delay = 0.1))]
fn always_fails(_ctx: &SolidContext) -> Result<i64, SolidError> {
    Err(SolidError::new("always_fails fails on purpose"))
}

/// Never runs: its upstream fails.
#[solid]
fn after_failure(_ctx: &SolidContext, value: i64) -> i64 {
    value
}

fn failing() -> Pipeline {
    Pipeline::build("failing", |p| {
        let v = p.invoke(always_fails, ());
        p.invoke(after_failure, (v,));
    })
    .expect("valid pipeline")
}

fn main() {
    let mut executors = default_executors();
    executors.push(dask_executor());
    [orphans(), write_big(), chatty_pipeline(), failing()]
        .into_iter()
        .fold(Repository::new("faults"), |repo, p| {
            repo.with_pipeline(p.with_executors(executors.clone()))
        })
        .main();
}
