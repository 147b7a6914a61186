//! Starting the bridge process: unpacking its Python package (once per build), spawning
//! it under Python, and the tasks that read its stdout (replies and task events), read its
//! stderr (logs, kept as a tail for error messages) and wait for its exit.

use std::collections::{HashMap, VecDeque};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot, watch};

use super::messages::{ErrorKind, parse_message};
use super::{
    Bridge, BridgeError, BridgeMessage, BridgeOptions, PACKAGE, PROTOCOL_VERSION, Pending,
    ReadyInfo,
};

/// How many stderr lines of the bridge are kept for error messages.
const STDERR_TAIL_LINES: usize = 60;

pub(super) type Tail = Arc<Mutex<VecDeque<String>>>;

pub(super) fn tail_text(tail: &Tail) -> String {
    let lines = tail.lock().unwrap_or_else(|e| e.into_inner());
    if lines.is_empty() {
        "(no stderr output)".to_string()
    } else {
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

fn status_text(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("could not wait for it: {e}"),
    }
}

impl Bridge {
    /// Starts the bridge with `options.python` and waits for its `ready` message.
    ///
    /// Returns the handle and the receiver of task events (and, at the end,
    /// [`BridgeMessage::Exited`]).
    pub(crate) async fn spawn(
        options: BridgeOptions,
    ) -> Result<(Bridge, mpsc::UnboundedReceiver<BridgeMessage>), BridgeError> {
        let python = options.python.clone();
        let package =
            install_package(&options.package_root).map_err(|source| BridgeError::Package {
                root: options.package_root.clone(),
                source,
            })?;
        // `-c` rather than `-m`: worker processes a LocalCluster spawns re-import the
        // main module, and a `-c` main has none to re-import.
        let program = format!(
            "import sys; sys.path.insert(0, {}); from solidflow_dask_bridge.server import main; main()",
            serde_json::to_string(&package.display().to_string()).expect("strings serialize")
        );

        let mut cmd = Command::new(&python);
        cmd.args(&options.python_args)
            .arg("-c")
            .arg(program)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                BridgeError::PythonNotFound {
                    python: python.clone(),
                    source,
                }
            } else {
                BridgeError::Spawn {
                    python: python.clone(),
                    source,
                }
            }
        })?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");

        // stderr -> tracing + tail
        let stderr_tail: Tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_done = {
            let tail = stderr_tail.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains(" - ERROR - ") || line.contains("Traceback") {
                        tracing::warn!(target: "solidflow::dask::bridge", "{line}");
                    } else {
                        tracing::debug!(target: "solidflow::dask::bridge", "{line}");
                    }
                    let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                    if t.len() == STDERR_TAIL_LINES {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            })
        };

        // reaper: waits for exit (or kills on request) and publishes the status
        let (exit_tx, exit_rx) = watch::channel(None);
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                _ = kill_rx => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let _ = exit_tx.send(Some(status_text(status)));
        });

        // stdout -> ready / replies / events
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<BridgeMessage, ()>>();
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let expected_exit = Arc::new(AtomicBool::new(false));
        {
            let pending = pending.clone();
            let tail = stderr_tail.clone();
            let mut exit_rx = exit_rx.clone();
            let expected_exit = expected_exit.clone();
            tokio::spawn(async move {
                let mut ready_tx = Some(ready_tx);
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let (id, msg) = match parse_message(&line) {
                        Ok(parsed) => parsed,
                        Err(e) => {
                            tracing::warn!(target: "solidflow::dask::bridge", "unreadable bridge message ({e}): {line}");
                            continue;
                        }
                    };
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(Ok(msg));
                        continue;
                    }
                    let waiter = id.and_then(|id| {
                        pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&id)
                    });
                    match waiter {
                        Some(w) => {
                            if msg.is_task_event() {
                                let _ = events_tx.send(msg.clone());
                            }
                            let _ = w.send(msg);
                        }
                        None => {
                            let _ = events_tx.send(msg);
                        }
                    }
                }
                // stdout closed: the bridge is exiting.
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(Err(()));
                }
                pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
                let status = match tokio::time::timeout(
                    Duration::from_secs(30),
                    exit_rx.wait_for(|s| s.is_some()),
                )
                .await
                {
                    Ok(Ok(s)) => s.clone().unwrap_or_default(),
                    _ => "still running after closing its stdout".to_string(),
                };
                let _ = tokio::time::timeout(Duration::from_secs(2), stderr_done).await;
                let _ = events_tx.send(BridgeMessage::Exited {
                    expected: expected_exit.load(Ordering::SeqCst),
                    status,
                    stderr_tail: tail_text(&tail),
                });
            });
        }

        let mut bridge = Bridge {
            python: python.clone(),
            stdin: tokio::sync::Mutex::new(Some(stdin)),
            pending,
            next_id: AtomicU64::new(1),
            stderr_tail,
            exit: exit_rx,
            expected_exit,
            kill: Mutex::new(Some(kill_tx)),
            ready: ReadyInfo {
                protocol: 0,
                python: String::new(),
                executable: String::new(),
                dask: String::new(),
                distributed: String::new(),
                pid: 0,
            },
            request_timeout: options.request_timeout,
        };

        let first = match tokio::time::timeout(options.startup_timeout, ready_rx).await {
            Err(_) => {
                bridge.kill();
                return Err(BridgeError::StartupTimeout {
                    python,
                    timeout: options.startup_timeout,
                    stderr_tail: tail_text(&bridge.stderr_tail),
                });
            }
            Ok(Ok(Ok(msg))) => msg,
            Ok(_) => return Err(bridge.died().await),
        };
        match first {
            BridgeMessage::Ready(info) => {
                if info.protocol != PROTOCOL_VERSION {
                    bridge.kill();
                    return Err(BridgeError::ProtocolMismatch {
                        found: info.protocol,
                    });
                }
                tracing::debug!(
                    target: "solidflow::dask::bridge",
                    "bridge pid {} ready: python {} ({}), dask {}, distributed {}",
                    info.pid, info.python, info.executable, info.dask, info.distributed
                );
                bridge.ready = info;
                Ok((bridge, events_rx))
            }
            BridgeMessage::Error {
                kind: ErrorKind::DistributedMissing,
                message,
                ..
            } => Err(BridgeError::DistributedMissing { python, message }),
            other => {
                bridge.kill();
                Err(BridgeError::UnexpectedReply {
                    op: "startup".into(),
                    reply: Box::new(other),
                })
            }
        }
    }
}

/// Unpacks the bridge package into `<root>/<hash of its contents>/solidflow_dask_bridge/`
/// unless it is there already; returns the directory to put on `sys.path`.
pub(super) fn install_package(root: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    PACKAGE.hash(&mut hasher);
    let dir = root.join(format!(
        "{}-{:016x}",
        env!("CARGO_PKG_VERSION"),
        hasher.finish()
    ));
    if dir
        .join("solidflow_dask_bridge")
        .join("__init__.py")
        .is_file()
    {
        return Ok(dir);
    }
    std::fs::create_dir_all(root)?;
    // Written beside it and renamed into place, so a reader never sees half of it.
    let staging = tempfile::Builder::new()
        .prefix(".unpacking-")
        .tempdir_in(root)?;
    let package = staging.path().join("solidflow_dask_bridge");
    std::fs::create_dir(&package)?;
    for (name, source) in PACKAGE {
        std::fs::write(package.join(name), source)?;
    }
    match std::fs::rename(staging.path(), &dir) {
        Ok(()) => {
            let _ = staging.keep();
            Ok(dir)
        }
        // Another process unpacked it first.
        Err(_)
            if dir
                .join("solidflow_dask_bridge")
                .join("__init__.py")
                .is_file() =>
        {
            Ok(dir)
        }
        Err(e) => Err(e),
    }
}
