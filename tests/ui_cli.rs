//! `<binary> ui` from the outside: bad input fails clearly, the token and same-origin
//! checks hold. (The pages themselves are tested in a browser: `tests/ui_browser.rs`.)

#[path = "support/browser.rs"]
mod browser;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;

use browser::Fixture;

/// Sends a raw HTTP/1.0 request (so the body is not chunked) and returns the response.
fn http(url: &str, request: &str) -> String {
    let addr = url.strip_prefix("http://").expect("http url");
    let mut stream = TcpStream::connect(addr).expect("connect");
    let request = request.replace("{host}", addr);
    stream.write_all(request.as_bytes()).expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

/// The status code of a response.
fn status(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn get(url: &str, path: &str) -> String {
    http(
        url,
        &format!("GET {path} HTTP/1.0\r\nHost: {{host}}\r\nConnection: close\r\n\r\n"),
    )
}

#[test]
fn a_port_in_use_is_a_clear_error_with_exit_2() {
    let fixture = Fixture::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = fixture
        .command()
        .args(["ui", "--port", &port])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(stderr.contains("--port"), "says what to do: {stderr}");
}

#[test]
fn a_corrupt_history_database_is_a_clear_error() {
    let fixture = Fixture::new();
    let db = fixture.home.path().join("history.db");
    std::fs::write(
        &db,
        "this is not a database, it is a text file that got in the way\n".repeat(100),
    )
    .unwrap();
    let out = fixture
        .command()
        .args(["ui", "--port", "0"])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&db.display().to_string()),
        "names the file: {stderr}"
    );
    assert!(
        stderr.contains("move it aside"),
        "says what to do: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_missing_history_database_is_reported_and_the_page_serves() {
    let fixture = Fixture::new();
    let ui = fixture.ui();
    let page = get(&ui.url, "/");
    assert!(status(&page) == 200, "{page}");
    assert!(page.contains("No runs yet"), "{page}");
    let missing = get(&ui.url, "/runs/does-not-exist");
    assert!(status(&missing) == 404, "{missing}");
    assert!(
        missing.contains("Run not found") && missing.contains("href=\"/\""),
        "{missing}"
    );
}

#[test]
fn a_token_is_required_when_given_and_actions_need_the_same_origin() {
    let fixture = Fixture::new();
    assert_eq!(fixture.execute("fragile", "token-run"), 1);
    let mut child = fixture
        .command()
        .args(["ui", "--port", "0", "--token", "s3cret"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let url = line
        .trim()
        .strip_prefix("solidflow ui: ")
        .unwrap()
        .to_string();
    assert!(
        url.ends_with("/?token=s3cret"),
        "the URL carries the token: {url}"
    );
    let base = url.trim_end_matches("/?token=s3cret").to_string();

    let denied = get(&base, "/");
    assert!(
        status(&denied) == 403 && denied.contains("Token required"),
        "{denied}"
    );
    let allowed = get(&base, "/?token=s3cret");
    assert!(status(&allowed) == 200, "{allowed}");
    assert!(
        allowed.contains("solidflow_token=s3cret"),
        "sets the cookie: {allowed}"
    );
    let with_cookie = http(
        &base,
        "GET /runs/token-run HTTP/1.0\r\nHost: {host}\r\nCookie: solidflow_token=s3cret\r\nConnection: close\r\n\r\n",
    );
    assert!(status(&with_cookie) == 200, "{with_cookie}");

    // A POST from another site (or with no Origin) is refused.
    for origin in ["Origin: http://evil.example\r\n", ""] {
        let body = "strategy=all";
        let post = http(
            &base,
            &format!(
                "POST /runs/token-run/reexecute HTTP/1.0\r\nHost: {{host}}\r\nCookie: solidflow_token=s3cret\r\n{origin}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        );
        assert!(
            status(&post) == 403 && post.contains("Action refused"),
            "{post}"
        );
    }
    // A Host that is not loopback is refused (DNS rebinding).
    let rebound = http(
        &base,
        "GET /?token=s3cret HTTP/1.0\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    );
    assert!(status(&rebound) == 403, "{rebound}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn actions_are_refused_with_a_reason_where_they_cannot_work() {
    let fixture = Fixture::new();
    // An in_memory run cannot be re-executed from its failure: its outputs are gone.
    let exit = fixture
        .command()
        .args(["execute", "fragile", "--run-id", "memory-run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(exit.code(), Some(1));
    let ui = fixture.ui();
    let post = |path: &str, body: &str| {
        http(
            &ui.url,
            &format!(
                "POST {path} HTTP/1.0\r\nHost: {{host}}\r\nOrigin: http://{{host}}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
    };
    let refused = post("/runs/memory-run/reexecute", "strategy=from_failure");
    assert!(status(&refused) == 409, "{refused}");
    assert!(refused.contains("in_memory storage"), "{refused}");
    let not_running = post("/runs/memory-run/terminate", "");
    assert!(
        status(&not_running) == 409 && not_running.contains("is not running"),
        "{not_running}"
    );
    let unknown = post("/runs/nope/terminate", "");
    assert!(status(&unknown) == 404, "{unknown}");
}
