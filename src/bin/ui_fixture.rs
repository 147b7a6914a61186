//! Pipelines for the web page's browser tests (`tests/ui_browser.rs`) and benchmark
//! (`benches/ui.rs`).
//!
//! Not an example to copy: `fragile` fails until the test creates a file, `live` waits
//! for the test, `greet` logs a line with HTML in it, and `chatty` logs thousands of
//! lines around a wait. Solids coordinate with the
//! test through files in `$SF_UI_DIR`, polled with deadlines, never fixed sleeps.
//!
//! ```sh
//! cargo run --bin ui_fixture -- ui
//! ```

use std::path::PathBuf;
use std::time::Duration;

use solidflow::definition::solid::{Outputs, SolidDefinition};
use solidflow::definition::types::TypeInfo;
use solidflow::prelude::*;

use solidflow::conformance::files::{shared_dir, wait_for};

fn dir() -> PathBuf {
    shared_dir("SF_UI_DIR")
}

// --- greet: succeeds, retries once, logs HTML, materializes -------------------------

/// One to five.
#[solid]
fn numbers(_ctx: &SolidContext) -> Vec<i64> {
    (1..=5).collect()
}

/// Fails its first attempt, so the timeline shows two bars.
#[solid(retry(max_retries = 1))]
fn warm_up(ctx: &SolidContext) -> Result<u32, SolidError> {
    if ctx.attempt() == 1 {
        return Err(SolidError::new("cold start").caused_by("cache empty"));
    }
    Ok(ctx.attempt())
}

/// Sums, logs a line that looks like markup, and records a materialization.
#[solid]
fn summarize(ctx: &SolidContext, numbers: &Vec<i64>, warm: u32) -> i64 {
    ctx.log()
        .info("<script>window.__xss = 1</script> is only text");
    let total = numbers.iter().sum::<i64>() + i64::from(warm);
    ctx.materialize(
        "summary",
        "the total",
        serde_json::json!({"rows": numbers.len(), "total": total}),
    );
    total
}

fn greet() -> Pipeline {
    Pipeline::build("greet", |p| {
        let n = p.invoke(numbers, ());
        let w = p.invoke(warm_up, ());
        p.invoke(summarize, (n, w));
    })
    .expect("valid pipeline")
}

// --- fragile: fails until `$SF_UI_DIR/fixed` exists -----------------------------------

/// Reads a source that is "down" until the test fixes it.
#[solid]
fn load_source(ctx: &SolidContext) -> Result<i64, SolidError> {
    if !dir().join("fixed").exists() {
        return Err(SolidError::new("the source is unavailable")
            .caused_by("connection refused by 127.0.0.1:9"));
    }
    ctx.log().info("source is back");
    Ok(41)
}

/// Independent work that succeeds either way.
#[solid]
fn side_work(_ctx: &SolidContext) -> i64 {
    1
}

/// Depends on the source; skipped when it fails.
#[solid]
fn combine(ctx: &SolidContext, source: i64, side: i64) -> i64 {
    ctx.log().info(format!("combined {}", source + side));
    source + side
}

fn fragile() -> Pipeline {
    Pipeline::build("fragile", |p| {
        let s = p.invoke(load_source, ());
        let w = p.invoke(side_work, ());
        p.invoke(combine, (s, w));
    })
    .expect("valid pipeline")
}

// --- live: waits for the test between steps --------------------------------------------

/// Logs, then waits for `$SF_UI_DIR/go`.
#[solid]
fn first_half(ctx: &SolidContext) -> Result<i64, SolidError> {
    ctx.log().info("first half waiting for go");
    if !wait_for(&dir().join("go"), Duration::from_secs(120)) {
        return Err(SolidError::new("the go file never appeared"));
    }
    Ok(1)
}

/// Logs, then waits for `$SF_UI_DIR/go2`.
#[solid]
fn second_half(ctx: &SolidContext, first: i64) -> Result<i64, SolidError> {
    ctx.log().info("second half waiting for go2");
    if !wait_for(&dir().join("go2"), Duration::from_secs(120)) {
        return Err(SolidError::new("the go2 file never appeared"));
    }
    Ok(first + 1)
}

fn live() -> Pipeline {
    Pipeline::build("live", |p| {
        let f = p.invoke(first_half, ());
        p.invoke(second_half, (f,));
    })
    .expect("valid pipeline")
}

// --- chatty: `$SF_UI_LINES` log lines (default 6,000), half before and half after `go` ---

fn lines() -> usize {
    std::env::var("SF_UI_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6_000)
}

/// Logs `chatter line N` for N in `range`, every tenth line a warning.
fn chatter(ctx: &SolidContext, range: std::ops::Range<usize>) {
    for i in range {
        if i % 10 == 0 {
            ctx.log().warning(format!("chatter line {i}"));
        } else {
            ctx.log().info(format!("chatter line {i}"));
        }
    }
}

/// Logs the first half of its lines, waits for `$SF_UI_DIR/go`, logs the rest.
#[solid]
fn talk(ctx: &SolidContext) -> Result<u64, SolidError> {
    let n = lines();
    chatter(ctx, 1..n / 2 + 1);
    ctx.log().info("talk waiting for go");
    if !wait_for(&dir().join("go"), Duration::from_secs(120)) {
        return Err(SolidError::new("the go file never appeared"));
    }
    chatter(ctx, n / 2 + 1..n + 1);
    Ok(n as u64)
}

/// One line of its own, so the log can be filtered to another step.
#[solid]
fn listen(ctx: &SolidContext, heard: u64) -> u64 {
    ctx.log().info(format!("listen heard {heard} lines"));
    heard
}

fn chatty() -> Pipeline {
    Pipeline::build("chatty", |p| {
        let t = p.invoke(talk, ());
        p.invoke(listen, (t,));
    })
    .expect("valid pipeline")
}

// --- grid: `$SF_UI_STEPS` steps (default 200) in chains of trivial steps -----------------

fn zero() -> SolidDefinition {
    SolidDefinition::new("zero", |_, _| Ok(Outputs::result(0i64)))
        .output("result", TypeInfo::of::<i64>())
}

fn increment() -> SolidDefinition {
    SolidDefinition::new("increment", |_, mut inputs| {
        Ok(Outputs::result(inputs.take::<i64>("x")? + 1))
    })
    .input("x", TypeInfo::of::<i64>())
    .output("result", TypeInfo::of::<i64>())
}

/// `n` steps as `sqrt(n)` chains of `sqrt(n)` steps: 200 steps are 14 chains.
fn grid() -> Pipeline {
    let n: usize = std::env::var("SF_UI_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let chains = (n as f64).sqrt().ceil().max(1.0) as usize;
    Pipeline::build("grid", |p| {
        for i in 0..n {
            let (chain, pos) = (i % chains, i / chains);
            let name = format!("c{chain}_s{pos}");
            if pos == 0 {
                p.add(&name, zero(), vec![]);
            } else {
                let up = p.result(&format!("c{chain}_s{}", pos - 1));
                p.add(&name, increment(), vec![("x".into(), up)]);
            }
        }
    })
    .expect("valid grid")
}

fn main() {
    Repository::new("ui_fixture")
        .with_pipeline(greet())
        .with_pipeline(fragile())
        .with_pipeline(live())
        .with_pipeline(chatty())
        .with_lazy_pipeline("grid", grid)
        .main();
}
