//! The conformance pipelines: solids that misbehave on purpose (fail, panic, crash, hang,
//! ignore SIGTERM) so that every executor can be checked to handle them the same way.
//! Not an example to copy. Solids coordinate with the cases through files in
//! `$SF_CONFORMANCE_DIR` and never through fixed sleeps: a solid that must wait polls for
//! a file, with a deadline.
//!
//! | pipeline | steps | what it checks |
//! |---|---|---|
//! | `success` | `numbers` → `sum_evens`, `sum_odds` → `total` | values flow, `total=55` is logged |
//! | `failure` | `boom` → `downstream`; `numbers` → `sum_evens` | a failure skips its dependents only |
//! | `panic` | `kaboom` → `downstream`; `numbers` → `sum_evens` | a panic is a failure with a location |
//! | `retries` | `flaky`, `asks_retry`, `overridden` → `attempts` | retry policies, explicit retries, run-config retries |
//! | `pair` | `left`, `right` (each needs `GPU: 1`) | resources and concurrency |
//! | `live` | `waits_for_go` | events arrive while the step runs |
//! | `noisy` | `noisy` → `downstream` | a step's own stdout and stderr are captured |
//! | `crash` | `crash` → `downstream`; `numbers` → `sum_evens` | abort, SIGKILL and segfault are contained |
//! | `cancel` | `sleep_a` → `downstream`; `sleep_b` | Ctrl-C, SIGTERM-ignoring steps, grandchildren |

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use schemars::JsonSchema;
use serde::Deserialize;

use crate::conformance::files::{shared_dir, wait_for, write_atomic};
use crate::definition::executor::ExecutorDefinition;
use crate::prelude::*;

/// The environment variable naming the directory the solids share with the cases.
pub(super) const DIR_VAR: &str = "SF_CONFORMANCE_DIR";

fn dir() -> PathBuf {
    shared_dir(DIR_VAR)
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos()
}

// --- success -------------------------------------------------------------------------

/// One to ten.
#[solid]
fn numbers(_ctx: &SolidContext) -> Vec<i64> {
    (1..=10).collect()
}

/// Sum of the even numbers.
#[solid]
fn sum_evens(_ctx: &SolidContext, numbers: &Vec<i64>) -> i64 {
    numbers.iter().filter(|n| *n % 2 == 0).sum()
}

/// Sum of the odd numbers.
#[solid]
fn sum_odds(_ctx: &SolidContext, numbers: &Vec<i64>) -> i64 {
    numbers.iter().filter(|n| *n % 2 == 1).sum()
}

/// Adds both sums and logs the total.
#[solid]
fn total(ctx: &SolidContext, evens: i64, odds: i64) -> i64 {
    ctx.log().info(format!("total={}", evens + odds));
    evens + odds
}

fn success() -> Pipeline {
    Pipeline::build("success", |p| {
        let n = p.invoke(numbers, ());
        let e = p.invoke(sum_evens, (n.clone(),));
        let o = p.invoke(sum_odds, (n,));
        p.invoke(total, (e, o));
    })
    .expect("valid pipeline")
}

// --- failure and panic -----------------------------------------------------------------

/// Always fails.
#[solid]
fn boom(_ctx: &SolidContext) -> Result<i64, SolidError> {
    Err(SolidError::new("boom: the source is unavailable").caused_by("connection refused"))
}

/// Always panics.
#[solid]
fn kaboom(_ctx: &SolidContext) -> i64 {
    let answer = 42;
    panic!("kaboom {answer}")
}

/// Depends on a step that fails; must be skipped.
#[solid]
fn downstream(_ctx: &SolidContext, value: i64) -> i64 {
    value + 1
}

fn failure() -> Pipeline {
    Pipeline::build("failure", |p| {
        let b = p.invoke(boom, ());
        p.invoke(downstream, (b,));
        let n = p.invoke(numbers, ());
        p.invoke(sum_evens, (n,));
    })
    .expect("valid pipeline")
}

fn panics() -> Pipeline {
    Pipeline::build("panic", |p| {
        let b = p.invoke(kaboom, ());
        p.invoke(downstream, (b,));
        let n = p.invoke(numbers, ());
        p.invoke(sum_evens, (n,));
    })
    .expect("valid pipeline")
}

// --- retries ---------------------------------------------------------------------------

/// Fails on attempts 1 and 2; its policy allows 2 retries.
#[solid(retry(max_retries = 2))]
fn flaky(ctx: &SolidContext) -> Result<u32, SolidError> {
    ctx.log().info(format!("flaky attempt {}", ctx.attempt()));
    if ctx.attempt() < 3 {
        return Err(SolidError::new(format!(
            "flaky failed on attempt {}",
            ctx.attempt()
        )));
    }
    Ok(ctx.attempt())
}

/// Has no retry policy but asks for one retry explicitly.
#[solid]
fn asks_retry(ctx: &SolidContext) -> Result<u32, SolidError> {
    if ctx.attempt() == 1 {
        return Err(SolidError::retry(
            "not ready yet",
            Some(Duration::from_millis(10)),
        ));
    }
    Ok(ctx.attempt())
}

/// Has no retry policy; run config gives it one (`solids.overridden.retry`).
#[solid]
fn overridden(ctx: &SolidContext) -> Result<u32, SolidError> {
    if ctx.attempt() < 3 {
        return Err(SolidError::new(format!(
            "overridden failed on attempt {}",
            ctx.attempt()
        )));
    }
    Ok(ctx.attempt())
}

/// Reports the attempts each retried solid needed.
#[solid]
fn attempts(ctx: &SolidContext, flaky: u32, asked: u32, overridden: u32) -> String {
    let text = format!("attempts flaky={flaky} asks_retry={asked} overridden={overridden}");
    ctx.log().info(text.clone());
    text
}

fn retries() -> Pipeline {
    Pipeline::build("retries", |p| {
        let f = p.invoke(flaky, ());
        let a = p.invoke(asks_retry, ());
        let o = p.invoke(overridden, ());
        p.invoke(attempts, (f, a, o));
    })
    .expect("valid pipeline")
}

// --- resources and concurrency ----------------------------------------------------------

/// How long a pair member waits for its peer.
#[derive(Deserialize, JsonSchema)]
struct PairConfig {
    /// Seconds to wait for the peer to start before giving up.
    wait_secs: f64,
}

/// One of two steps (`left`, `right`) that each need a GPU. It records when it ran and
/// waits for its peer to start: running both at once is seen as `saw_peer=true`.
#[solid(config = PairConfig, resources(GPU = 1))]
fn pair_member(ctx: &SolidContext) -> Result<String, SolidError> {
    let cfg: PairConfig = ctx.config()?;
    let me = ctx.solid_name();
    let peer = if me == "left" { "right" } else { "left" };
    let dir = dir();
    // Checked before announcing ourselves: a peer running alongside cannot finish
    // before it has seen our start file.
    let peer_finished_before = dir.join(format!("{peer}.end")).exists();
    write_atomic(
        &dir.join(format!("{me}.start")),
        &format!("{} {}", now_ns(), std::process::id()),
    )?;
    let saw_peer = !peer_finished_before
        && wait_for(
            &dir.join(format!("{peer}.start")),
            Duration::from_secs_f64(cfg.wait_secs),
        );
    let text = format!("{me}: saw_peer={saw_peer}");
    ctx.log().info(text.clone());
    write_atomic(
        &dir.join(format!("{me}.end")),
        &format!("{} {saw_peer}", now_ns()),
    )?;
    Ok(text)
}

fn pair() -> Pipeline {
    Pipeline::build("pair", |p| {
        p.invoke_as("left", pair_member, ());
        p.invoke_as("right", pair_member, ());
    })
    .expect("valid pipeline")
}

// --- live events --------------------------------------------------------------------------

/// Logs, then waits until the test (having seen the log line) creates `go`.
#[solid]
fn waits_for_go(ctx: &SolidContext) -> Result<String, SolidError> {
    ctx.log().info("waiting for go");
    if !wait_for(&dir().join("go"), Duration::from_secs(60)) {
        return Err(SolidError::new(
            "the go file never appeared: the log line was not seen live",
        ));
    }
    Ok("went".into())
}

fn live() -> Pipeline {
    Pipeline::build("live", |p| {
        p.invoke(waits_for_go, ());
    })
    .expect("valid pipeline")
}

// --- output capture (out-of-process executors) ---------------------------------------------

/// Prints to stdout and stderr directly instead of logging.
#[solid]
fn noisy(ctx: &SolidContext) -> i64 {
    println!("noisy says hello on stdout");
    eprintln!("noisy says hello on stderr");
    ctx.log().info("noisy logged normally");
    7
}

fn noisy_pipeline() -> Pipeline {
    Pipeline::build("noisy", |p| {
        let n = p.invoke(noisy, ());
        p.invoke(downstream, (n,));
    })
    .expect("valid pipeline")
}

// --- crashes (out-of-process executors) ---------------------------------------------------

/// How to crash.
#[derive(Deserialize, JsonSchema)]
struct CrashConfig {
    /// `abort`, `kill9` (SIGKILL, like the OOM killer) or `segv` (a real segfault).
    how: String,
}

/// Takes its own process down.
#[solid(config = CrashConfig)]
fn crash(ctx: &SolidContext) -> Result<i64, SolidError> {
    let cfg: CrashConfig = ctx.config()?;
    eprintln!("about to crash by {}", cfg.how);
    let pid = std::process::id() as libc::pid_t;
    match cfg.how.as_str() {
        "abort" => std::process::abort(),
        // SAFETY: signals this process; that is the point of the solid.
        "kill9" => unsafe {
            libc::kill(pid, libc::SIGKILL);
        },
        // SAFETY: none; this reads an unmapped address to fault like a buggy native
        // library would (std's handler re-raises it as a real SIGSEGV).
        "segv" => unsafe {
            std::hint::black_box(std::ptr::without_provenance::<u8>(8).read_volatile());
        },
        other => return Err(SolidError::new(format!("unknown crash `{other}`"))),
    }
    // The signal is delivered asynchronously; never return normally.
    loop {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn crash_pipeline() -> Pipeline {
    Pipeline::build("crash", |p| {
        let c = p.invoke(crash, ());
        p.invoke(downstream, (c,));
        let n = p.invoke(numbers, ());
        p.invoke(sum_evens, (n,));
    })
    .expect("valid pipeline")
}

// --- cancellation --------------------------------------------------------------------------

/// Writes `<alias>.pid` with its process id, then sleeps until canceled (or 120 s).
/// With `SF_CONFORMANCE_IGNORE_TERM=1` it ignores SIGTERM, and with
/// `SF_CONFORMANCE_GRANDCHILD=1` it starts a shell that ignores SIGTERM and writes
/// `<alias>.grandchild.pid`.
#[solid]
fn sleeper(ctx: &SolidContext) -> Result<i64, SolidError> {
    let dir = dir();
    let me = ctx.solid_name();
    if std::env::var_os("SF_CONFORMANCE_IGNORE_TERM").is_some() {
        // SAFETY: sets this process's SIGTERM disposition; no handler code runs.
        unsafe {
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
        }
    }
    let _grandchild = if std::env::var_os("SF_CONFORMANCE_GRANDCHILD").is_some() {
        let pid_file = dir.join(format!("{me}.grandchild.pid"));
        let script = format!(
            "trap '' TERM; echo $$ > '{}.tmp'; mv '{0}.tmp' '{0}'; while :; do sleep 0.05; done",
            pid_file.display()
        );
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .spawn()?;
        wait_for(&pid_file, Duration::from_secs(30));
        Some(child)
    } else {
        None
    };
    write_atomic(
        &dir.join(format!("{me}.pid")),
        &std::process::id().to_string(),
    )?;
    ctx.log().info(format!("{me} sleeping"));
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(SolidError::new("sleeper was never canceled"))
}

fn cancel_pipeline() -> Pipeline {
    Pipeline::build("cancel", |p| {
        let a = p.invoke_as("sleep_a", sleeper, ());
        p.invoke_as("sleep_b", sleeper, ());
        p.invoke(downstream, (a,));
    })
    .expect("valid pipeline")
}

/// The conformance repository, on the default executors plus Dask: what the repository's
/// own `conformance` binary runs. A pipeline binary for the suite is one line,
/// `fn main() { solidflow::conformance::executor::repository().main() }`.
pub fn repository() -> Repository {
    repository_with([dask_executor()])
}

/// The conformance repository on the default executors plus `extra` (a third-party
/// executor): `repository_with([my_executor()]).main()` is the `main` of its pipeline
/// binary.
pub fn repository_with(extra: impl IntoIterator<Item = ExecutorDefinition>) -> Repository {
    let mut executors = default_executors();
    executors.extend(extra);
    [
        success(),
        failure(),
        panics(),
        retries(),
        pair(),
        live(),
        noisy_pipeline(),
        crash_pipeline(),
        cancel_pipeline(),
    ]
    .into_iter()
    .fold(Repository::new("conformance"), |repo, p| {
        repo.with_pipeline(p.with_executors(executors.clone()))
    })
}
