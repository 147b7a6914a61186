//! Messages of the bridge protocol: what the bridge writes on its stdout (replies to
//! requests and task events), and how a wire line is parsed. See `docs/dask-bridge.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The bridge's first message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ReadyInfo {
    /// Protocol version.
    pub protocol: u32,
    /// Python version.
    pub python: String,
    /// `sys.executable`.
    pub executable: String,
    /// dask version.
    pub dask: String,
    /// distributed version.
    pub distributed: String,
    /// Bridge process id.
    pub pid: u32,
}

/// A Dask worker as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct WorkerInfo {
    /// `tcp://host:port`.
    pub address: String,
    /// Resources it offers.
    #[serde(default)]
    pub resources: BTreeMap<String, f64>,
    /// Threads (concurrent tasks).
    pub nthreads: Option<u32>,
    /// Worker name.
    #[serde(default)]
    pub name: Option<String>,
}

/// Reply to `connect`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ConnectedInfo {
    /// Scheduler address.
    pub scheduler: String,
    /// Dashboard URL, if any.
    pub dashboard: Option<String>,
    /// Whether the bridge created (and will close) the cluster.
    pub created_cluster: bool,
    /// Workers connected now.
    pub workers: Vec<WorkerInfo>,
}

/// Final message of a task whose command ran to the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TaskDone {
    /// The key.
    pub key: String,
    /// Exit code, or `None` if killed by a signal.
    pub exit_code: Option<i32>,
    /// Signal that killed the process.
    pub signal: Option<i32>,
    /// Worker it ran on.
    pub worker: String,
    /// Last stderr lines (at most 8 KiB).
    pub stderr_tail: String,
    /// Run time in seconds.
    pub duration: f64,
    /// Set when some live lines did not arrive within 5 s of the end.
    #[serde(default)]
    pub lines_missing: Option<u64>,
    /// The worker-side copies of the output that were written (`stdout`, `stderr`).
    #[serde(default)]
    pub log_files: BTreeMap<String, String>,
}

/// Why a task failed without its command finishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FailureReason {
    /// Its worker died (more often than `allowed_failures`).
    WorkerLost,
    /// Canceled (by `cancel`, or by Dask).
    Canceled,
    /// The command could not be started on the worker (no such file, not executable).
    NotStarted,
    /// The connection to the scheduler was lost.
    SchedulerLost,
    /// A task submitted with `after` did not run: a task it waited for did not
    /// succeed (or was released already). The step was not launched.
    Withdrawn,
    /// Anything else: a bad request, a task exception.
    Error,
    /// A reason this client does not know.
    #[serde(other)]
    Other,
}

/// What kind of request failed (an `error` message's `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ErrorKind {
    /// The request was malformed (unknown op, missing field, duplicate key).
    BadRequest,
    /// `connect` has not succeeded yet.
    NotConnected,
    /// A second `connect`.
    AlreadyConnected,
    /// The scheduler did not answer within the timeout.
    SchedulerUnreachable,
    /// The address answered, but not as a Dask scheduler (the dashboard, another
    /// service); the message says what answered.
    NotAScheduler,
    /// A `tls://` scheduler without certificate files.
    TlsConfig,
    /// Workers did not join within the timeout.
    WorkersTimeout,
    /// A cluster manager's package is not installed.
    MissingPackage,
    /// `distributed` is not importable (only in place of `ready`).
    DistributedMissing,
    /// An unexpected exception in the bridge.
    Internal,
    /// A kind this client does not know.
    #[serde(other)]
    Other,
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = serde_json::to_value(self).map_err(|_| std::fmt::Error)?;
        f.write_str(value.as_str().unwrap_or("other"))
    }
}

/// Final message of a task that failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TaskFailed {
    /// The key.
    pub key: String,
    /// Category.
    pub reason: FailureReason,
    /// Human-readable detail.
    pub message: String,
    /// The causes of the failure, outermost first (Python's exception chain).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<String>,
}

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Stream {
    /// The step's stdout.
    #[default]
    Stdout,
    /// The step's stderr.
    Stderr,
}

/// Reply to `upload_binary`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Uploaded {
    /// Content hash.
    pub sha256: String,
    /// Path on the workers, if the same on all of them.
    pub remote_path: Option<String>,
    /// Path per worker.
    #[serde(default)]
    pub worker_paths: BTreeMap<String, String>,
    /// What to put in `command[0]`: `{uploaded:<sha256>}`.
    pub command0: String,
    /// The scheduler had the build already: nothing was uploaded.
    #[serde(default)]
    pub cached: bool,
    /// Bytes of the build sent to the scheduler (0 when `cached`).
    #[serde(default)]
    pub bytes_sent: u64,
    /// The builds the scheduler keeps now, most recently used first.
    #[serde(default)]
    pub kept: Vec<String>,
    /// The builds this upload evicted from the scheduler.
    #[serde(default)]
    pub evicted: Vec<String>,
}

/// A message from the bridge. Task events (`Started`, `Line`, `Done`, `Failed`)
/// arrive on the receiver from [`Bridge::spawn`](super::Bridge::spawn); replies are returned by
/// the request methods.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum BridgeMessage {
    /// The bridge started.
    Ready(ReadyInfo),
    /// Reply to `connect`.
    Connected(ConnectedInfo),
    /// Reply to `submit`: accepted.
    Submitted {
        /// The key.
        key: String,
    },
    /// The command started on a worker. `attempt` > 1 means Dask re-ran it after
    /// losing a worker.
    Started {
        /// The key.
        key: String,
        /// Worker address.
        worker: String,
        /// Process id on the worker.
        pid: Option<u32>,
        /// 1 for the first start.
        attempt: u32,
    },
    /// The scheduler removed the worker that was running this task (it died or
    /// stopped answering); Dask re-runs the task elsewhere unless it has used up
    /// `allowed_failures`.
    WorkerLost {
        /// The key.
        key: String,
        /// The address of the worker that was lost.
        worker: String,
    },
    /// The connection to the scheduler was lost and came back within the connect
    /// timeout: the task, canceled by distributed when the connection went, is
    /// submitted again.
    Resubmitted {
        /// The key.
        key: String,
        /// The scheduler's address.
        scheduler: String,
        /// Seconds the connection was lost.
        lost_for: f64,
    },
    /// One line of the command's output, live.
    Line {
        /// The key.
        key: String,
        /// Worker address.
        worker: String,
        /// stdout or stderr.
        #[serde(default)]
        stream: Stream,
        /// The line, without its newline.
        line: String,
    },
    /// The command ran to the end (any exit code).
    Done(TaskDone),
    /// The task failed without a result.
    Failed(TaskFailed),
    /// Reply to `cancel`.
    Canceled {
        /// Keys asked for.
        keys: Vec<String>,
        /// Keys whose running process was killed, with the worker.
        #[serde(default)]
        killed: BTreeMap<String, String>,
    },
    /// Reply to `release`.
    Released {
        /// Keys forgotten.
        keys: Vec<String>,
    },
    /// Reply to `upload_binary`.
    Uploaded(Uploaded),
    /// Reply to `shutdown`.
    Shutdown,
    /// A request failed.
    Error {
        /// Category.
        kind: ErrorKind,
        /// Detail.
        message: String,
        /// The causes, outermost first (Python's exception chain).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        causes: Vec<String>,
    },
    /// Not from the wire: the bridge exited. Last message on the receiver.
    #[serde(skip)]
    Exited {
        /// Whether it was asked to (shutdown / dropped handle).
        expected: bool,
        /// Exit status as text.
        status: String,
        /// Last lines of stderr.
        stderr_tail: String,
    },
}

impl BridgeMessage {
    /// The task key, for task events.
    pub(crate) fn key(&self) -> Option<&str> {
        match self {
            Self::Started { key, .. }
            | Self::Line { key, .. }
            | Self::Submitted { key, .. }
            | Self::WorkerLost { key, .. }
            | Self::Resubmitted { key, .. } => Some(key),
            Self::Done(d) => Some(&d.key),
            Self::Failed(f) => Some(&f.key),
            _ => None,
        }
    }

    /// Whether this is the last message for its key (`done` or `failed`).
    pub(crate) fn is_final(&self) -> bool {
        matches!(self, Self::Done(_) | Self::Failed(_))
    }

    pub(super) fn is_task_event(&self) -> bool {
        matches!(
            self,
            Self::Started { .. }
                | Self::Line { .. }
                | Self::WorkerLost { .. }
                | Self::Resubmitted { .. }
        ) || self.is_final()
    }
}

/// Splits a wire message into its request id (if any) and typed content.
pub(super) fn parse_message(line: &str) -> Result<(Option<u64>, BridgeMessage), serde_json::Error> {
    let value: Value = serde_json::from_str(line)?;
    let id = value.get("id").and_then(Value::as_u64);
    let msg = serde_json::from_value(value)?;
    Ok((id, msg))
}

#[cfg(test)]
mod tests {
    use super::super::SubmitRequest;
    use super::*;

    #[test]
    fn messages_parse() {
        let (id, msg) = parse_message(
            r#"{"type":"failed","id":7,"key":"k","reason":"worker_lost","message":"m"}"#,
        )
        .unwrap();
        assert_eq!(id, Some(7));
        assert_eq!(
            msg,
            BridgeMessage::Failed(TaskFailed {
                key: "k".into(),
                reason: FailureReason::WorkerLost,
                message: "m".into(),
                causes: vec![],
            })
        );
        let (_, msg) =
            parse_message(r#"{"type":"failed","key":"k","reason":"new_reason","message":"m"}"#)
                .unwrap();
        assert!(matches!(
            msg,
            BridgeMessage::Failed(TaskFailed {
                reason: FailureReason::Other,
                ..
            })
        ));
        let req = serde_json::to_value(SubmitRequest::new("k", vec!["x".into()], "t")).unwrap();
        assert_eq!(req["resources"], serde_json::json!({}));
    }
}
