//! Test helper: a real S3 server (s3s-fs) on a free loopback port, torn down on drop.
//!
//! Include it from an integration test with
//! `#[path = "support/s3.rs"] mod s3_support;`.
//!
//! The server checks SigV4 signatures against a fixed access key and secret, stores its
//! data in a temporary directory, and is killed when the [`S3Server`] is dropped. A bucket
//! is a directory in the server's root, so [`S3Server::create_bucket`] makes one directly.
//!
//! The binary comes from `$SOLIDFLOW_S3S_FS` or `<repo>/.tools/bin/s3s-fs`; when it is
//! missing the helper panics and says to run `scripts/s3-server.sh`. Tests never skip
//! silently.
//!
//! [`FaultProxy`] sits between a client and the server and fails chosen requests
//! (503 Slow Down, or a dropped connection), to test retries and error reporting.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use solidflow::storage::{S3Config, S3Credentials, S3Storage};

/// The access key id the test server accepts.
pub(crate) const ACCESS_KEY: &str = "solidflow-test-access";
/// The secret the test server accepts.
pub(crate) const SECRET_KEY: &str = "solidflow-test-secret-5f2a9c";

/// A running s3s-fs server.
pub(crate) struct S3Server {
    child: Child,
    addr: SocketAddr,
    root: tempfile::TempDir,
    log: PathBuf,
}

/// Where the s3s-fs binary is expected.
pub(crate) fn s3s_fs_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SOLIDFLOW_S3S_FS") {
        return PathBuf::from(path);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/s3s-fs")
}

impl S3Server {
    /// Starts a server with an empty root, waiting (with a deadline) until it accepts connections.
    pub(crate) fn start() -> Self {
        let binary = s3s_fs_binary();
        assert!(
            binary.is_file(),
            "the S3 test server is not installed at {}: run scripts/s3-server.sh (or set SOLIDFLOW_S3S_FS to an s3s-fs binary)",
            binary.display()
        );
        let root = tempfile::Builder::new()
            .prefix("solidflow-s3-")
            .tempdir()
            .expect("temp dir for the S3 server");
        let data = root.path().join("data");
        std::fs::create_dir(&data).expect("create S3 data dir");
        let log = root.path().join("s3s-fs.log");
        // The port is chosen by binding :0 and releasing it; another process may grab it in
        // between, so a server that dies at startup is retried on a new port.
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut child = spawn_server(&binary, port, &data, &log);
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            match wait_until_listening(&mut child, addr, Duration::from_secs(20)) {
                Ok(()) => {
                    return Self {
                        child,
                        addr,
                        root,
                        log,
                    };
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = format!(
                        "{e}; log: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
        }
        panic!("the S3 test server did not start: {last_error}");
    }

    /// `http://127.0.0.1:<port>`.
    pub(crate) fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server (SIGKILL), as an outage: connections are refused until
    /// [`restart`](Self::restart). Data and port are kept.
    pub(crate) fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port with the same data, waiting (with a
    /// deadline) until it accepts connections.
    pub(crate) fn restart(&mut self) {
        self.stop();
        self.child = spawn_server(
            &s3s_fs_binary(),
            self.addr.port(),
            &self.data_dir(),
            &self.log,
        );
        wait_until_listening(&mut self.child, self.addr, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("the S3 test server did not restart: {e}"));
    }

    /// The listening address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's data directory (one subdirectory per bucket).
    pub(crate) fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// Creates bucket `name` (for s3s-fs, a directory in its root).
    pub(crate) fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.data_dir().join(name)).expect("create bucket directory");
    }

    /// Settings for `bucket` on this server with the right credentials, small parts (so
    /// multipart is exercised by modest values) and quick retries.
    pub(crate) fn config(&self, bucket: &str) -> S3Config {
        self.config_via(bucket, &self.endpoint())
    }

    /// Like [`config`](Self::config), but talking to `endpoint` (e.g. a [`FaultProxy`]).
    pub(crate) fn config_via(&self, bucket: &str, endpoint: &str) -> S3Config {
        let mut config = S3Config::new(bucket);
        config.endpoint_url = Some(endpoint.to_owned());
        config.allow_http = true;
        config.credentials = Some(S3Credentials::new(ACCESS_KEY, SECRET_KEY));
        config.part_size = 5 * 1024 * 1024;
        config.concurrency = 2;
        config.max_retries = 3;
        config.retry_timeout = Duration::from_secs(30);
        config.instance_metadata = false;
        config
    }

    /// A storage on a fresh bucket `bucket`.
    pub(crate) fn storage(&self, bucket: &str) -> S3Storage {
        self.create_bucket(bucket);
        S3Storage::new(self.config(bucket)).expect("S3 storage")
    }

    /// What the server logged so far (for assertion messages).
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(
    binary: &std::path::Path,
    port: u16,
    data: &std::path::Path,
    log: &std::path::Path,
) -> Child {
    Command::new(binary)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
        .arg(data)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .expect("S3 server log file"),
        )
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free loopback port")
        .port()
}

fn wait_until_listening(
    child: &mut Child,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("s3s-fs exited with {status}"));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "s3s-fs did not listen on {addr} within {timeout:?}"
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// How a [`FaultProxy`] fails a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Answer `503 Slow Down`, as S3 does when throttling.
    SlowDown,
    /// Read the request, then close the connection without answering.
    Reset,
}

/// A TCP proxy in front of an [`S3Server`] that fails the first `failures` requests it sees
/// (or every request, with `usize::MAX`), then forwards everything. One request per
/// connection: every response is sent with `Connection: close`.
pub(crate) struct FaultProxy {
    addr: SocketAddr,
    faults_served: Arc<AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl FaultProxy {
    /// Starts the proxy on a free loopback port.
    pub(crate) fn start(upstream: SocketAddr, fault: Fault, failures: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let faults_served = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (served, stopped) = (faults_served.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let served = served.clone();
                std::thread::spawn(move || {
                    let _ = handle(conn, upstream, fault, failures, &served);
                });
            }
        });
        Self {
            addr,
            faults_served,
            stop,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub(crate) fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many requests were failed so far.
    pub(crate) fn faults_served(&self) -> usize {
        self.faults_served.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn handle(
    client: TcpStream,
    upstream: SocketAddr,
    fault: Fault,
    failures: usize,
    served: &AtomicUsize,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    // Read the request head, rewriting keep-alive to close: one request per connection.
    let mut head = Vec::new();
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("connection:") {
            continue;
        }
        if line == "\r\n" {
            head.extend_from_slice(b"connection: close\r\n\r\n");
            break;
        }
        head.extend_from_slice(line.as_bytes());
    }
    let mut body = vec![0; content_length];
    reader.read_exact(&mut body)?;

    let fail = served
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < failures).then_some(n + 1)
        })
        .is_ok();
    let mut client = client;
    if fail {
        match fault {
            Fault::SlowDown => {
                let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
                write!(
                    client,
                    "HTTP/1.1 503 Slow Down\r\ncontent-type: application/xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )?;
            }
            Fault::Reset => {}
        }
        let _ = client.shutdown(Shutdown::Both);
        return Ok(());
    }
    let mut server = TcpStream::connect(upstream)?;
    server.write_all(&head)?;
    server.write_all(&body)?;
    std::io::copy(&mut server, &mut client)?;
    let _ = client.shutdown(Shutdown::Both);
    Ok(())
}
