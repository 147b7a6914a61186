//! [`BridgeError`]: what can go wrong between the executor and the bridge, each with
//! what to do about it.

use std::path::PathBuf;
use std::time::Duration;

use super::{BridgeMessage, ErrorKind, PROTOCOL_VERSION};

/// Errors of the bridge client. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BridgeError {
    /// The interpreter could not be found.
    #[error(
        "Python interpreter `{}` not found ({source}); the Dask executor needs Python 3.10+ \
         with dask and distributed: set `python:` in the dask executor config or the \
         SOLIDFLOW_PYTHON environment variable to its path (scripts/python-env.sh creates \
         one in .venv)",
        python.display()
    )]
    PythonNotFound {
        /// The interpreter that was tried.
        python: PathBuf,
        /// The spawn error.
        source: std::io::Error,
    },
    /// The interpreter exists but could not be started.
    #[error("could not start the Dask bridge with `{}`: {source}", python.display())]
    Spawn {
        /// The interpreter that was tried.
        python: PathBuf,
        /// The spawn error.
        source: std::io::Error,
    },
    /// `distributed` cannot be imported by the interpreter.
    #[error(
        "the Dask bridge cannot import `distributed` with `{}`: {message}. Install it with \
         `{} -m pip install dask distributed`, or the pinned versions with \
         `{} -m pip install -r python/requirements.txt`",
        python.display(), python.display(), python.display()
    )]
    DistributedMissing {
        /// The interpreter that was used.
        python: PathBuf,
        /// What the bridge reported.
        message: String,
    },
    /// The bridge did not say `ready` in time.
    #[error(
        "the Dask bridge (`{}`) did not start within {timeout:?}; its stderr ends with:\n{stderr_tail}",
        python.display()
    )]
    StartupTimeout {
        /// The interpreter that was used.
        python: PathBuf,
        /// How long we waited.
        timeout: Duration,
        /// Last lines of the bridge's stderr.
        stderr_tail: String,
    },
    /// The bridge speaks another protocol version (a stale bridge package?).
    #[error("the Dask bridge speaks protocol {found}, this solidflow speaks {PROTOCOL_VERSION}")]
    ProtocolMismatch {
        /// The version the bridge reported.
        found: u32,
    },
    /// The Dask scheduler did not answer within the timeout.
    #[error("Dask scheduler {address} unreachable within {timeout:?}: {message}")]
    SchedulerUnreachable {
        /// The scheduler address from the config.
        address: String,
        /// The connect timeout.
        timeout: Duration,
        /// What `distributed` said.
        message: String,
    },
    /// An optional Python package (e.g. dask-jobqueue) is needed; the message has the
    /// exact `pip install` command.
    #[error("{message}")]
    MissingPackage {
        /// The bridge's message, with the fix.
        message: String,
    },
    /// The bridge exited, or closed its stdout, while it was needed.
    #[error("the Dask bridge died unexpectedly ({status}); its stderr ends with:\n{stderr_tail}")]
    BridgeDied {
        /// Exit status, if it is known yet.
        status: String,
        /// Last lines of the bridge's stderr.
        stderr_tail: String,
    },
    /// A reply did not arrive in time.
    #[error("the Dask bridge did not answer `{op}` within {timeout:?}")]
    ReplyTimeout {
        /// The request's op.
        op: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The bridge reported an error for a request.
    #[error("Dask bridge error ({kind}): {message}")]
    Remote {
        /// The error kind.
        kind: ErrorKind,
        /// The error message.
        message: String,
    },
    /// The bridge answered with a message this request does not expect.
    #[error("unexpected reply from the Dask bridge to `{op}`: {reply:?}")]
    UnexpectedReply {
        /// The request's op.
        op: String,
        /// What came back.
        reply: Box<BridgeMessage>,
    },
    /// Unpacking the bridge's Python package failed.
    #[error(
        "could not unpack the Dask bridge's Python package under {}: {source}; set SOLIDFLOW_HOME to a writable directory",
        root.display()
    )]
    Package {
        /// Where it was to be unpacked.
        root: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}
