//! Dask faults that must be reported as what they are (issue 10, items 5, 6 and 9):
//! an address that answers but is not a scheduler (a plain TCP listener, an HTTP
//! server, a real scheduler's dashboard), a scheduler lost mid-run (SIGKILL by pid,
//! restarted on the same port or not), and which worker each event happened on.
//!
//! Everything is real: `dask scheduler` / `dask worker` processes from
//! `tests/support/dask.rs`, the `faults` binary through its CLI, listeners on
//! 127.0.0.1. Waits are on conditions with generous deadlines.
//!
//! Run: `cargo build --bins && cargo test --test faults_dask -- --test-threads=2`.

#[path = "support/dask.rs"]
mod dask_support;
#[path = "support/fault_world.rs"]
mod fault_world;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dask_support::{DaskCluster, WorkerSpec};
use fault_world::World;
use serde_json::Value;
use solidflow::conformance::executor::{LiveRun, Outcome, assert_dies};

/// Generous upper bound for a connect that must honour `timeout: 5`.
const CONNECT_DEADLINE: Duration = Duration::from_secs(60);

/// Starts `faults execute <pipeline> --json` with this Dask config block and `solids`
/// config.
fn start(w: &World, pipeline: &str, dask: &str, solids: &str) -> LiveRun {
    w.execute(
        pipeline,
        &format!(
            "execution: {{dask: {{config: {dask}}}}}\nstorage: {{filesystem: {{}}}}\nsolids: {solids}\n"
        ),
    )
}

/// Runs `chatty` against `address` with `timeout` and waits for its end.
fn connect_to(w: &World, address: &str, timeout: u32) -> Outcome {
    start(
        w,
        "chatty",
        &format!("{{address: '{address}', timeout: {timeout}}}"),
        "{chatty: {config: {lines: 1}}}",
    )
    .finish()
}

/// A loopback server that accepts connections and answers each with `answer` (run on
/// its own thread); stops when dropped.
struct Server {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Server {
    fn start(answer: fn(TcpStream)) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        std::thread::spawn(move || answer(stream));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self { port, stop }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Holds the connection open and says nothing (a service that waits for its client).
fn say_nothing(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
    let mut buf = [0u8; 1024];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}

/// A minimal HTTP server: answers every request with 404.
fn http_404(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => request.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
    let _ = stream.write_all(
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found",
    );
}

fn assert_fails_quickly_saying(out: &Outcome, needles: &[&str]) {
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(
        out.elapsed < CONNECT_DEADLINE,
        "took {:?} with timeout: 5\n{}",
        out.elapsed,
        out.describe()
    );
    let text = out.failure_text();
    for needle in needles {
        assert!(
            text.contains(needle),
            "the failure does not say {needle:?}:\n{}",
            out.describe()
        );
    }
    assert!(
        out.of_type("STEP_START").next().is_none(),
        "{}",
        out.describe()
    );
}

/// Item 5: a listener that accepts but never speaks Dask's protocol, and an HTTP server,
/// fail the run within about `timeout`, saying the address is not a Dask scheduler
/// (before: 190 s with `timeout: 5`).
#[test]
fn an_address_that_answers_but_is_not_a_scheduler_fails_within_the_timeout() {
    let w = World::new();
    let quiet = Server::start(say_nothing);
    let address = format!("tcp://127.0.0.1:{}", quiet.port);
    let out = connect_to(&w, &address, 5);
    assert_fails_quickly_saying(
        &out,
        &[
            &format!("{address} is not a Dask scheduler"),
            "no Dask handshake",
            "8786",
        ],
    );

    let http = Server::start(http_404);
    let address = format!("127.0.0.1:{}", http.port);
    let out = connect_to(&w, &address, 5);
    assert_fails_quickly_saying(
        &out,
        &[
            &format!("{address} is not a Dask scheduler"),
            "an HTTP server",
            "404 Not Found",
        ],
    );
}

/// Item 5, the seed's mistake: the address is a real scheduler's dashboard (8787 in the
/// seed). The error says it is the dashboard and names the scheduler's address.
#[test]
fn the_dashboard_port_is_named_as_the_dashboard_with_the_scheduler_address() {
    let w = World::new();
    let cluster = DaskCluster::start_with_env(&[], &[("TMPDIR", &w.tmpdir())]);
    let dashboard = cluster.dashboard_address();
    let out = connect_to(&w, &dashboard, 5);
    assert_fails_quickly_saying(
        &out,
        &[
            &format!("{dashboard} is the Dask dashboard"),
            &format!("set `address: {}`", cluster.address),
        ],
    );
}

/// The pid of the step process that sent the step's STEP_START.
fn step_pid(run: &mut LiveRun, step: &str) -> u32 {
    let start = run.wait_event(&format!("STEP_START of {step}"), |e| {
        e["event_type"] == "STEP_START" && e["step_key"] == step
    });
    start["pid"].as_u64().expect("pid") as u32
}

/// Item 6: the scheduler is SIGKILLed mid-step and started again on the same port
/// within `timeout` (as a supervisor would), with a new worker. distributed reconnects,
/// solidflow submits the step again, and the run succeeds.
#[test]
fn a_scheduler_back_within_the_timeout_is_reconnected_and_the_run_succeeds() {
    let w = World::new();
    let mut cluster =
        DaskCluster::start_with_env(&[WorkerSpec::plain("before")], &[("TMPDIR", &w.tmpdir())]);
    let mut run = start(
        &w,
        "chatty",
        &format!(
            "{{address: '{}', timeout: 60, forward_env: [SF_FAULTS_DIR]}}",
            cluster.address
        ),
        "{chatty: {config: {lines: 3}}}",
    );
    let pid = step_pid(&mut run, "chatty.compute");
    run.wait_log("ready");
    cluster.kill_scheduler();
    // The worker shuts down without its scheduler, and the step process with it.
    assert_dies(pid, "the step process of the lost scheduler's worker");
    cluster.restart_scheduler();
    cluster.add_worker(WorkerSpec::plain("after"));
    std::fs::write(w.work("go"), "").unwrap();
    let out = run.finish();
    assert_eq!(out.code, Some(0), "{}\n{}", out.describe(), cluster.logs());
    let reconnected = out
        .of_type("ENGINE_EVENT")
        .find(|e| e["data"]["details"]["scheduler_reconnected"] == true)
        .unwrap_or_else(|| panic!("no reconnect event: {}", out.describe()));
    let message = reconnected["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&cluster.address) && message.contains("came back"),
        "{message}"
    );
    assert!(
        !out.stdout.contains("canceled by Dask"),
        "{}",
        out.describe()
    );
    let success = out
        .of_type("STEP_SUCCESS")
        .next()
        .unwrap_or_else(|| panic!("{}", out.describe()));
    assert_eq!(
        success["worker"],
        cluster.worker_address(1),
        "{}",
        out.describe()
    );
    assert_eq!(w.run_status(), "SUCCESS");
    w.assert_tmpdir_clean("a scheduler SIGKILL and restart");
}

/// Item 6: the scheduler is SIGKILLed mid-step and does not come back. The run fails
/// within about `timeout` saying the connection was lost (not "canceled by Dask"), is
/// recorded FAILURE, exits non-zero, and leaves no step process behind.
#[test]
fn a_scheduler_lost_past_the_timeout_fails_the_run_as_lost() {
    let w = World::new();
    let mut cluster =
        DaskCluster::start_with_env(&[WorkerSpec::plain("w1")], &[("TMPDIR", &w.tmpdir())]);
    let mut run = start(
        &w,
        "chatty",
        &format!(
            "{{address: '{}', timeout: 5, forward_env: [SF_FAULTS_DIR]}}",
            cluster.address
        ),
        "{chatty: {config: {lines: 3}}}",
    );
    let pid = step_pid(&mut run, "chatty.compute");
    run.wait_log("ready");
    let killed = Instant::now();
    cluster.kill_scheduler();
    let out = run.finish();
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(
        killed.elapsed() < CONNECT_DEADLINE,
        "took {:?} after the scheduler was killed (timeout 5 s)\n{}",
        killed.elapsed(),
        out.describe()
    );
    let text = out.failure_text();
    assert!(
        text.contains(&format!(
            "lost the connection to the Dask scheduler at {}",
            cluster.address
        )) && text.contains(" s:"),
        "{}",
        out.describe()
    );
    assert!(
        !out.stdout.contains("canceled by Dask"),
        "{}",
        out.describe()
    );
    assert_eq!(w.run_status(), "FAILURE", "{}", out.describe());
    assert_dies(pid, "the step process");
    w.assert_tmpdir_clean("a scheduler SIGKILL");
}

fn worker_of(out: &Outcome, event_type: &str, step: &str) -> Value {
    out.of_type(event_type)
        .find(|e| e["step_key"] == step)
        .unwrap_or_else(|| panic!("no {event_type} for {step}: {}", out.describe()))["worker"]
        .clone()
}

/// Item 9: STEP_UP_FOR_RETRY, STEP_RESTARTED and STEP_FAILURE name the worker, like
/// STEP_START; STEP_SKIPPED names none (the step never ran: it is not submitted).
#[test]
fn step_failure_retry_and_restart_events_name_their_worker() {
    let w = World::new();
    let cluster =
        DaskCluster::start_with_env(&[WorkerSpec::plain("only")], &[("TMPDIR", &w.tmpdir())]);
    let worker = cluster.worker_address(0).to_string();
    let out = start(
        &w,
        "failing",
        &format!("{{address: '{}'}}", cluster.address),
        "{}",
    )
    .finish();
    assert_eq!(out.code, Some(1), "{}", out.describe());
    let step = "always_fails.compute";
    for event_type in [
        "STEP_START",
        "STEP_UP_FOR_RETRY",
        "STEP_RESTARTED",
        "STEP_FAILURE",
    ] {
        assert_eq!(
            worker_of(&out, event_type, step),
            worker.as_str(),
            "{event_type}: {}",
            out.describe()
        );
    }
    let failure = out.of_type("STEP_FAILURE").next().unwrap();
    assert!(
        failure["message"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("on worker {worker}"))),
        "{failure}"
    );
    assert_eq!(
        worker_of(&out, "STEP_SKIPPED", "after_failure.compute"),
        Value::Null,
        "{}",
        out.describe()
    );
}

/// Item 9: the worker running a step is SIGKILLed; the worker-lost event names the
/// worker that was lost (before: the new one, and only when the re-run started), and
/// comes from that worker, before the step starts again on the other one.
#[test]
fn the_worker_lost_event_names_the_lost_worker() {
    let w = World::new();
    let mut cluster =
        DaskCluster::start_with_env(&[WorkerSpec::plain("first")], &[("TMPDIR", &w.tmpdir())]);
    let first = cluster.worker_address(0).to_string();
    let mut run = start(
        &w,
        "chatty",
        &format!(
            "{{address: '{}', forward_env: [SF_FAULTS_DIR]}}",
            cluster.address
        ),
        "{chatty: {config: {lines: 1}}}",
    );
    run.wait_log("ready");
    let second = cluster.add_worker(WorkerSpec::plain("second"));
    let second = cluster.worker_address(second).to_string();
    cluster.kill_worker(0);
    let lost = run.wait_event("the worker-lost event", |e| {
        e["data"]["details"]["worker_lost"] == true
    });
    assert_eq!(lost["worker"], first.as_str(), "{lost}");
    assert_eq!(
        lost["data"]["details"]["lost_worker"],
        first.as_str(),
        "{lost}"
    );
    assert!(
        lost["message"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("Dask worker {first} was lost"))),
        "{lost}"
    );
    std::fs::write(w.work("go"), "").unwrap();
    let out = run.finish();
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let position = |pred: &dyn Fn(&Value) -> bool| out.events.iter().position(pred);
    let lost_at = position(&|e| e["data"]["details"]["worker_lost"] == true).unwrap();
    let restarted_at =
        position(&|e| e["event_type"] == "STEP_START" && e["worker"] == second.as_str())
            .unwrap_or_else(|| panic!("no STEP_START on {second}: {}", out.describe()));
    assert!(lost_at < restarted_at, "{}", out.describe());
    assert_eq!(
        worker_of(&out, "STEP_SUCCESS", "chatty.compute"),
        second.as_str(),
        "{}",
        out.describe()
    );
}
