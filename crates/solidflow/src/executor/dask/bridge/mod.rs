//! Rust client for the Dask bridge.
//!
//! Dask's client protocol is pickled Python, so the Dask executor does not speak it:
//! it runs the Python package `solidflow_dask_bridge` (its modules embedded in this
//! crate with `include_str!`, unpacked into a content-addressed directory under the
//! solidflow home, see [`BridgeOptions::package_root`]) under a Python interpreter
//! that has `distributed` installed, and talks to it in JSON lines: requests on the
//! bridge's stdin, messages on its stdout. The protocol is documented in
//! `docs/dask-bridge.md`; its golden examples are `tests/fixtures/protocol/*.jsonl`.
//!
//! [`Bridge::spawn`] starts the program and waits for its `ready` message. It returns
//! the [`Bridge`] handle, used to send requests, and a receiver of [`BridgeMessage`]s
//! where everything that happens to submitted tasks arrives, in order: `started`,
//! `line` (live stdout/stderr of the step), and one final `done` or `failed` per
//! key. Replies to requests (`connected`, `canceled`, `uploaded`, ...)
//! are returned by the request methods instead. When the bridge exits, the receiver
//! gets [`BridgeMessage::Exited`] and then closes.
//!
//! The bridge's stderr (Dask's own logs, Python tracebacks) is forwarded to
//! `tracing` under the target `solidflow::dask::bridge`, and its tail is kept for
//! error messages.
//!
//! Dropping a [`Bridge`] closes its stdin: the bridge then kills the steps it is
//! running, closes its client and, if it created the cluster, the cluster, and
//! exits. [`Bridge::shutdown`] does the same and waits for it.
//!
//! Files: `requests` and `messages` are the protocol's types, `error` the
//! [`BridgeError`]s, `process` starts the bridge and reads its output, and this module
//! is the client that sends requests and waits for their replies.

mod error;
#[cfg(test)]
mod fixtures;
mod messages;
mod process;
mod requests;
#[cfg(test)]
mod tests;

pub(crate) use self::error::BridgeError;
pub(crate) use self::messages::{
    BridgeMessage, ConnectedInfo, ErrorKind, FailureReason, ReadyInfo, Stream, TaskDone, Uploaded,
    WorkerInfo,
};
pub use self::requests::{AdaptSpec, ClusterKind, ClusterSpec, TlsConfig};
pub(crate) use self::requests::{
    ConnectRequest, Request, SubmitRequest, WarmTask, WorkerResources,
};

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::ChildStdin;
use tokio::sync::{oneshot, watch};

use self::process::{Tail, tail_text};

/// The bridge's Python package: `(file name, source)` of each module of
/// `solidflow_dask_bridge`.
pub(crate) const PACKAGE: &[(&str, &str)] = &[
    (
        "__init__.py",
        include_str!("solidflow_dask_bridge/__init__.py"),
    ),
    (
        "__main__.py",
        include_str!("solidflow_dask_bridge/__main__.py"),
    ),
    (
        "protocol.py",
        include_str!("solidflow_dask_bridge/protocol.py"),
    ),
    ("worker.py", include_str!("solidflow_dask_bridge/worker.py")),
    ("warm.py", include_str!("solidflow_dask_bridge/warm.py")),
    (
        "shipping.py",
        include_str!("solidflow_dask_bridge/shipping.py"),
    ),
    ("topics.py", include_str!("solidflow_dask_bridge/topics.py")),
    (
        "cluster.py",
        include_str!("solidflow_dask_bridge/cluster.py"),
    ),
    ("probe.py", include_str!("solidflow_dask_bridge/probe.py")),
    (
        "connection.py",
        include_str!("solidflow_dask_bridge/connection.py"),
    ),
    (
        "cluster_events.py",
        include_str!("solidflow_dask_bridge/cluster_events.py"),
    ),
    ("server.py", include_str!("solidflow_dask_bridge/server.py")),
];

/// Version of the JSON-lines protocol this client speaks (the bridge's `ready`
/// message must report the same).
pub(crate) const PROTOCOL_VERSION: u32 = 1;

/// Environment variable naming the Python interpreter for the bridge, used when the
/// executor config has no `python:`.
pub(crate) const PYTHON_ENV_VAR: &str = "SOLIDFLOW_PYTHON";

/// Extra time, beyond a request's own Dask timeout, that a reply may take.
const REPLY_MARGIN: Duration = Duration::from_secs(30);

/// The interpreter to use when none is configured: `$SOLIDFLOW_PYTHON`, else `python3`.
pub(crate) fn default_python() -> PathBuf {
    std::env::var_os(PYTHON_ENV_VAR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// How to start the bridge.
#[derive(Debug, Clone)]
pub(crate) struct BridgeOptions {
    /// Python interpreter with `distributed` installed.
    pub python: PathBuf,
    /// Extra interpreter arguments, placed before the program (e.g. `-X dev`).
    pub python_args: Vec<OsString>,
    /// Extra environment variables for the bridge (and a LocalCluster it creates).
    pub env: Vec<(OsString, OsString)>,
    /// How long the bridge may take to import `distributed` and say `ready`.
    pub startup_timeout: Duration,
    /// How long quick requests (submit, cancel, workers, ...) may take to be answered.
    pub request_timeout: Duration,
    /// Where the package is unpacked, in a directory named after a hash of its
    /// contents (so it is written once per solidflow build, and never left behind in
    /// the temporary directory). Default: `<solidflow home>/bridge`.
    pub package_root: PathBuf,
}

impl Default for BridgeOptions {
    fn default() -> Self {
        Self {
            python: default_python(),
            python_args: Vec::new(),
            env: Vec::new(),
            startup_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(60),
            package_root: crate::execution::run::solidflow_home().join("bridge"),
        }
    }
}
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<BridgeMessage>>>>;

/// A running bridge process. See the module docs.
pub(crate) struct Bridge {
    python: PathBuf,
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    pending: Pending,
    next_id: AtomicU64,
    stderr_tail: Tail,
    exit: watch::Receiver<Option<String>>,
    expected_exit: Arc<AtomicBool>,
    kill: Mutex<Option<oneshot::Sender<()>>>,
    ready: ReadyInfo,
    request_timeout: Duration,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("python", &self.python)
            .field("ready", &self.ready)
            .finish()
    }
}
impl Bridge {
    /// Versions and pid reported by the bridge at startup.
    pub(crate) fn info(&self) -> &ReadyInfo {
        &self.ready
    }

    /// Last lines of the bridge's stderr.
    pub(crate) fn stderr_tail(&self) -> String {
        tail_text(&self.stderr_tail)
    }

    /// Sends a raw request (an object with `"op"`; an `"id"` is added) and waits up
    /// to `timeout` for the reply with that id. Error replies become
    /// [`BridgeError::Remote`] (or a more specific variant).
    pub(crate) async fn request(
        &self,
        mut request: Value,
        timeout: Duration,
    ) -> Result<BridgeMessage, BridgeError> {
        let op = request
            .get("op")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        if let Value::Object(map) = &mut request {
            map.insert("id".into(), Value::from(id));
        }
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        if let Err(e) = self.write_line(&request).await {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            return Err(e);
        }
        self.reply(&op, id, rx, timeout).await
    }

    /// Waits up to `timeout` for the reply to request `id`.
    async fn reply(
        &self,
        op: &str,
        id: u64,
        rx: oneshot::Receiver<BridgeMessage>,
        timeout: Duration,
    ) -> Result<BridgeMessage, BridgeError> {
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(BridgeMessage::Error {
                kind,
                message,
                causes,
            })) => {
                let message = with_causes(message, &causes);
                Err(match kind {
                    ErrorKind::MissingPackage => BridgeError::MissingPackage { message },
                    _ => BridgeError::Remote { kind, message },
                })
            }
            Ok(Ok(msg)) => Ok(msg),
            Ok(Err(_)) => Err(self.died().await),
            Err(_) => {
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                Err(BridgeError::ReplyTimeout {
                    op: op.to_string(),
                    timeout,
                })
            }
        }
    }

    /// Creates or joins a cluster (see [`ConnectRequest`]).
    pub(crate) async fn connect(
        &self,
        request: &ConnectRequest,
    ) -> Result<ConnectedInfo, BridgeError> {
        let dask_timeout = Duration::from_secs_f64(request.timeout.unwrap_or(30.0).max(0.0));
        let value = Request::Connect(request).to_value();
        // A cluster manager may wait for its scheduler and then for workers.
        match self
            .request(value, dask_timeout * 2 + REPLY_MARGIN * 2)
            .await
        {
            Ok(BridgeMessage::Connected(info)) => Ok(info),
            Ok(other) => Err(BridgeError::UnexpectedReply {
                op: "connect".into(),
                reply: Box::new(other),
            }),
            Err(BridgeError::Remote {
                kind: ErrorKind::SchedulerUnreachable,
                message,
            }) => Err(BridgeError::SchedulerUnreachable {
                address: request.address.clone().unwrap_or_default(),
                timeout: dask_timeout,
                message,
            }),
            Err(e) => Err(e),
        }
    }

    /// Submits tasks: all requests are written before the first reply is awaited, so
    /// the bridge works through them without a round trip per task. One result per
    /// request, in order; `Ok` once the bridge accepted the task. Everything that
    /// happens to it (including an immediate `failed` for unsatisfiable resources)
    /// arrives on the event receiver.
    pub(crate) async fn submit_many(
        &self,
        requests: &[SubmitRequest],
    ) -> Vec<Result<(), BridgeError>> {
        let mut bytes = Vec::new();
        let mut waiting = Vec::with_capacity(requests.len());
        for request in requests {
            let mut value = Request::Submit(request).to_value();
            let id = self.next_id.fetch_add(1, Ordering::SeqCst);
            value["id"] = id.into();
            serde_json::to_writer(&mut bytes, &value).expect("requests serialize");
            bytes.push(b'\n');
            let (tx, rx) = oneshot::channel();
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, tx);
            waiting.push((id, rx));
        }
        if let Err(e) = self.write_bytes(&bytes).await {
            {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                for (id, _) in &waiting {
                    pending.remove(id);
                }
            }
            let mut results = vec![Err(e)];
            for _ in 1..waiting.len() {
                results.push(Err(self.died().await));
            }
            return results;
        }
        let mut results = Vec::with_capacity(waiting.len());
        for (id, rx) in waiting {
            let reply = self.reply("submit", id, rx, self.request_timeout).await;
            results.push(match reply {
                Ok(BridgeMessage::Submitted { .. } | BridgeMessage::Failed(_)) => Ok(()),
                Ok(other) => Err(BridgeError::UnexpectedReply {
                    op: "submit".into(),
                    reply: Box::new(other),
                }),
                Err(e) => Err(e),
            });
        }
        results
    }

    /// Cancels tasks and kills their running processes (SIGTERM to the process
    /// group, SIGKILL after `grace`). Returns the keys whose process was killed, with
    /// the worker. Each canceled task also gets `failed` / `canceled` on the receiver.
    pub(crate) async fn cancel(
        &self,
        keys: &[String],
        grace: Duration,
    ) -> Result<BTreeMap<String, String>, BridgeError> {
        let value = Request::Cancel {
            keys,
            grace: grace.as_secs_f64(),
        }
        .to_value();
        match self.request(value, self.request_timeout).await? {
            BridgeMessage::Canceled { killed, .. } => Ok(killed),
            other => Err(BridgeError::UnexpectedReply {
                op: "cancel".into(),
                reply: Box::new(other),
            }),
        }
    }

    /// Forgets finished tasks so Dask can release them.
    pub(crate) async fn release(&self, keys: &[String]) -> Result<(), BridgeError> {
        let value = Request::Release { keys }.to_value();
        match self.request(value, self.request_timeout).await? {
            BridgeMessage::Released { .. } => Ok(()),
            other => Err(BridgeError::UnexpectedReply {
                op: "release".into(),
                reply: Box::new(other),
            }),
        }
    }

    /// Ships an executable to the workers, content-addressed and once: the scheduler
    /// is asked first and receives it only when it does not hold it already; it keeps
    /// the `keep` most recently used builds, and a worker fetches a build from it when
    /// a task first needs it. Use [`Uploaded::command0`] as `command[0]` to run it.
    pub(crate) async fn upload_binary(
        &self,
        path: &Path,
        sha256: Option<&str>,
        keep: u32,
    ) -> Result<Uploaded, BridgeError> {
        let value = Request::UploadBinary { path, sha256, keep }.to_value();
        match self
            .request(value, self.request_timeout + REPLY_MARGIN * 4)
            .await?
        {
            BridgeMessage::Uploaded(u) => Ok(u),
            other => Err(BridgeError::UnexpectedReply {
                op: "upload_binary".into(),
                reply: Box::new(other),
            }),
        }
    }

    /// Kills running steps, closes the client (and the cluster, if the bridge
    /// created it) and waits for the bridge to exit; kills it if it takes longer
    /// than `timeout`.
    pub(crate) async fn shutdown(self, timeout: Duration) -> Result<(), BridgeError> {
        self.expected_exit.store(true, Ordering::SeqCst);
        let reply = self.request(Request::Shutdown.to_value(), timeout).await;
        let mut exit = self.exit.clone();
        let exited = tokio::time::timeout(timeout, exit.wait_for(|s| s.is_some()))
            .await
            .is_ok();
        if !exited {
            self.kill();
        }
        match reply {
            Ok(BridgeMessage::Shutdown) => Ok(()),
            Ok(other) => Err(BridgeError::UnexpectedReply {
                op: "shutdown".into(),
                reply: Box::new(other),
            }),
            Err(e) => Err(e),
        }
    }

    /// Kills the bridge process at once (no cleanup of a created cluster).
    pub(crate) fn kill(&self) {
        self.expected_exit.store(true, Ordering::SeqCst);
        if let Some(tx) = self.kill.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(());
        }
    }

    async fn write_line(&self, request: &Value) -> Result<(), BridgeError> {
        let mut line = serde_json::to_vec(request).expect("requests serialize");
        line.push(b'\n');
        self.write_bytes(&line).await
    }

    /// Writes whole request lines to the bridge's stdin.
    async fn write_bytes(&self, line: &[u8]) -> Result<(), BridgeError> {
        let mut guard = self.stdin.lock().await;
        let Some(stdin) = guard.as_mut() else {
            return Err(self.died().await);
        };
        let result = async {
            stdin.write_all(line).await?;
            stdin.flush().await
        }
        .await;
        if result.is_err() {
            *guard = None;
            drop(guard);
            return Err(self.died().await);
        }
        Ok(())
    }

    /// The error for a bridge that went away: waits briefly for its exit status.
    async fn died(&self) -> BridgeError {
        let mut exit = self.exit.clone();
        let status = match tokio::time::timeout(
            Duration::from_secs(5),
            exit.wait_for(|s| s.is_some()),
        )
        .await
        {
            Ok(Ok(s)) => s.clone().unwrap_or_default(),
            _ => "its stdout closed; still running".to_string(),
        };
        // give the stderr reader a moment to collect the traceback
        tokio::time::sleep(Duration::from_millis(50)).await;
        BridgeError::BridgeDied {
            status,
            stderr_tail: self.stderr_tail(),
        }
    }
}

/// `message`, followed by its causes (so "Nanny failed to start" says why).
fn with_causes(message: String, causes: &[String]) -> String {
    causes
        .iter()
        .fold(message, |text, cause| format!("{text}: caused by {cause}"))
}

impl Drop for Bridge {
    fn drop(&mut self) {
        // Closing stdin makes the bridge clean up (kill steps, close a created
        // cluster) and exit on its own.
        self.expected_exit.store(true, Ordering::SeqCst);
        if let Ok(mut guard) = self.stdin.try_lock() {
            guard.take();
        }
    }
}
