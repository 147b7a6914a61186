//! What the web page costs: serving the run page of a 10,000-step run, how long an event
//! takes from being emitted to reaching an open page's event stream, and how much a
//! watched page slows a 10,000-step in-process run.
//!
//! ```sh
//! cargo bench --bench ui                  # 10,000 steps, 5 rounds alone/watched
//! SF_UI_BENCH_STEPS=2000 cargo bench --bench ui
//! ```
//!
//! Runs the `ui_fixture` binary (`grid` pipeline) with its own solidflow home. The
//! "page" is an HTTP client on 127.0.0.1 that follows the run's server-sent events, as
//! the browser's EventSource does; latency is measured from the event's own timestamp
//! (taken when it is emitted, before the history writer records it) to its arrival, so
//! it is an upper bound on recorded → page. The `ui` server's own CPU time per watched
//! run (from `/proc`) is printed too: unlike wall time it hardly depends on how loaded
//! the machine is.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn fixture(home: &Path, steps: usize) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ui_fixture"));
    cmd.env("SOLIDFLOW_HOME", home)
        .env("SF_UI_STEPS", steps.to_string())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn run_grid(home: &Path, steps: usize, run_id: &str) -> Duration {
    let started = Instant::now();
    let status = fixture(home, steps)
        .args(["execute", "grid", "--run-id", run_id])
        .status()
        .expect("run grid");
    assert!(status.success(), "grid run failed");
    started.elapsed()
}

struct Ui {
    child: Child,
    addr: String,
}

impl Drop for Ui {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_ui(home: &Path, steps: usize) -> Ui {
    let mut child = fixture(home, steps)
        .args(["ui", "--port", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start ui");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ui url");
    let addr = line
        .trim()
        .strip_prefix("solidflow ui: http://")
        .expect("ui url")
        .trim_end_matches('/')
        .to_string();
    Ui { child, addr }
}

/// CPU seconds (user + system) process `pid` has used so far, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // Fields after the command (which is in parentheses): state is 3rd, utime 14th, stime 15th.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    // SAFETY: sysconf only reads a constant.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn request(addr: &str, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("send");
    s
}

fn get(addr: &str, path: &str) -> (Duration, usize) {
    let started = Instant::now();
    let mut body = Vec::new();
    request(addr, path).read_to_end(&mut body).expect("read");
    assert!(
        body.starts_with(b"HTTP/1.") && body[9..12] == *b"200",
        "GET {path} failed"
    );
    (started.elapsed(), body.len())
}

/// Follows a run's event stream until its `end` event; returns each event's latency (ms).
fn follow(addr: &str, run_id: &str) -> Vec<f64> {
    follow_with(addr, run_id, |_| {})
}

/// [`follow`], calling `on_message` with each event's message.
fn follow_with(addr: &str, run_id: &str, mut on_message: impl FnMut(&str)) -> Vec<f64> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut latencies = Vec::new();
    loop {
        let stream = request(addr, &format!("/runs/{run_id}/events"));
        let mut not_found = false;
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if line.contains(" 404 ") {
                not_found = true;
            }
            if line == "event: end" {
                return latencies;
            }
            if let Some(data) = line.strip_prefix("data: ")
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(data)
                && let Some(t) = v["t"].as_i64()
            {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock")
                    .as_millis() as i64;
                latencies.push((now - t) as f64);
                on_message(v["msg"].as_str().unwrap_or_default());
            }
        }
        assert!(
            not_found && Instant::now() < deadline,
            "event stream ended early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let steps: usize = std::env::var("SF_UI_BENCH_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rounds: usize = std::env::var("SF_UI_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let home = tempfile::tempdir().expect("home");

    // 1. The run page of a finished run of `steps` steps.
    run_grid(home.path(), steps, "bench-page");
    let ui = start_ui(home.path(), steps);
    get(&ui.addr, "/runs/bench-page");
    let mut page_ms = Vec::new();
    let mut size = 0;
    for _ in 0..5 {
        let (t, n) = get(&ui.addr, "/runs/bench-page");
        page_ms.push(t.as_secs_f64() * 1000.0);
        size = n;
    }
    let (list, _) = get(&ui.addr, "/");
    println!(
        "run page, {steps} steps: median {:.0} ms, max {:.0} ms ({} KB); runs list {:.0} ms",
        median(page_ms.clone()),
        page_ms.iter().copied().fold(0.0, f64::max),
        size / 1024,
        list.as_secs_f64() * 1000.0
    );

    // 2 and 3. Runs alone vs. watched live (run page's event stream + runs list stream).
    let mut alone = Vec::new();
    let mut watched = Vec::new();
    let mut latencies = Vec::new();
    let mut server_cpu = Vec::new();
    for round in 0..rounds {
        alone.push(run_grid(home.path(), steps, &format!("alone-{round}")).as_secs_f64());
        let run_id = format!("watched-{round}");
        let watcher = {
            let (addr, id) = (ui.addr.clone(), run_id.clone());
            std::thread::spawn(move || follow(&addr, &id))
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let list = {
            let addr = ui.addr.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut s = request(&addr, "/runs/stream");
                s.set_read_timeout(Some(Duration::from_millis(200))).ok();
                let mut buf = [0u8; 65536];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => break,
                    }
                }
            })
        };
        let cpu_before = cpu_seconds(ui.child.id());
        watched.push(run_grid(home.path(), steps, &run_id).as_secs_f64());
        latencies.extend(watcher.join().expect("watcher"));
        server_cpu.push(cpu_seconds(ui.child.id()) - cpu_before);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        list.join().expect("list watcher");
    }
    let (a, w) = (median(alone.clone()), median(watched.clone()));
    println!(
        "{steps}-step in-process run: alone median {a:.3} s {alone:.3?}, watched live median {w:.3} s {watched:.3?}: {:+.1}%",
        (w / a - 1.0) * 100.0
    );
    println!(
        "ui server CPU per watched run (user + system, while the run goes and its stream drains): median {:.3} s {server_cpu:.3?}",
        median(server_cpu.clone())
    );
    let n = latencies.len();
    println!(
        "busy run, emitted -> open page's stream, {n} events: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile(&mut latencies, 0.5),
        percentile(&mut latencies, 0.99),
        percentile(&mut latencies, 1.0)
    );

    // 4. A quiet run: each step waits until the watcher has seen its log line, so every
    // event is measured on its own rather than behind a backlog.
    let dir = tempfile::tempdir().expect("dir");
    let mut quiet = Vec::new();
    for round in 0..5 {
        for f in ["go", "go2"] {
            let _ = std::fs::remove_file(dir.path().join(f));
        }
        let run_id = format!("quiet-{round}");
        let mut run = fixture(home.path(), steps)
            .env("SF_UI_DIR", dir.path())
            .args(["execute", "live", "--run-id", &run_id])
            .spawn()
            .expect("start live");
        let d = dir.path().to_path_buf();
        quiet.extend(follow_with(&ui.addr, &run_id, |msg| {
            let go = match msg {
                "first half waiting for go" => "go",
                "second half waiting for go2" => "go2",
                _ => return,
            };
            std::fs::write(d.join(go), "").expect("go file");
        }));
        assert!(run.wait().expect("live run").success());
    }
    let n = quiet.len();
    println!(
        "quiet run, emitted -> open page's stream, {n} events: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile(&mut quiet, 0.5),
        percentile(&mut quiet, 0.99),
        percentile(&mut quiet, 1.0)
    );
    drop(ui);
    std::process::exit(0);
}
