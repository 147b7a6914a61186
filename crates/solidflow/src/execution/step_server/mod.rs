//! Warm step servers: `<binary> step-server`, a long-lived process of the pipeline's own
//! binary that runs steps on request, so a step pays neither the process start (exec,
//! dynamic loading) nor the repository build.
//!
//! The server is a **fork server**. It builds the repository once (and each lazy
//! pipeline the first time a step of it comes), stays single-threaded, and forks one
//! child per step. The child runs the step exactly as `<binary> step` would
//! ([`run_invocation`](super::protocol::run_invocation)), in its own process group, with
//! the step's stdout and stderr on pipes the parent handed over. So every step still has
//! its own process: a crash (abort, segfault, OOM kill) ends only that child and is
//! reported as a crash with that child's pid and signal, exactly as in `isolation:
//! process`; a panic stays a step failure; cancellation is SIGTERM, then SIGKILL, to the
//! child's process group. The server never runs a step's code itself, which is why it
//! can be the step's supervisor: it is a child subreaper, and when the step's child
//! exits it SIGKILLs whatever the step left running (see `execution/supervisor.rs`). Running
//! steps inside the server (faster by one fork, but a crash or a leak would take the
//! server and every later step with it) was the alternative; the fork keeps the
//! isolation of one process per step for about the cost of a `fork`.
//!
//! The protocol, on the Unix stream socket that is the server's stdin (one request at a
//! time, JSON lines):
//!
//! - parent → server: `{"run": <StepInvocation>}` plus two descriptors (`SCM_RIGHTS`,
//!   with the line's first bytes): the write ends of the step's stdout and stderr; or
//!   `{"run_on_kept_pipes": <StepInvocation>}` with two descriptors the server keeps for
//!   later steps, or with none to use the kept ones again ([`ServerRequest`]);
//! - server → parent: `{"started": {"pid": P, "forked": true}}`, then
//!   `{"exited": {"pid": P, "code": C, "signal": S, "core_dumped": false}}` once the
//!   child and everything it left are gone; or `{"not_started": {"message": "..."}}`.
//!
//! End of stream on the socket ends the server. On Linux the server dies with its
//! parent (`PR_SET_PDEATHSIG`), taking the running step and its descendants with it.
//! If the process is not single-threaded when a step comes (a `main` that started
//! threads before handing over to solidflow), forking would be unsafe: the server then
//! starts `<binary> step` for that step instead, which is correct but not warm.

mod fds;
#[cfg(target_os = "linux")]
mod here;
#[cfg(target_os = "linux")]
mod server;

pub use fds::{recv_with_fds, send_with_fds};
#[cfg(target_os = "linux")]
pub use server::serve;

use serde::{Deserialize, Serialize};

use super::protocol::StepInvocation;

/// Set to `1` on a step server's environment: it runs each step itself instead of
/// forking it (`isolation: warm_in_server`).
pub const IN_SERVER_ENV: &str = "SOLIDFLOW_STEP_SERVER_IN_SERVER";

/// A request to a step server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerRequest {
    /// Run this step; the step's stdout and stderr come as two descriptors, which the
    /// server closes after the step (so their end of stream tells the parent the
    /// step's output is complete).
    Run(Box<StepInvocation>),
    /// Run this step on the server's kept stdout and stderr pipes: two descriptors
    /// that come with the request replace them; without descriptors the last ones
    /// are used again. The server never closes kept pipes (until they are replaced or
    /// it ends), so the parent reads a step's output up to its `exited` reply, which
    /// comes after everything the step and its processes wrote. This saves a parent
    /// two pipes and the descriptor passing per step.
    RunOnKeptPipes(Box<StepInvocation>),
}

/// What a step server reports about the request it is serving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerMessage {
    /// The step's process is running.
    Started {
        /// Its pid, also its process group id.
        pid: u32,
        /// Whether it was forked from the warm server (`false`: started as
        /// `<binary> step` because the server was not single-threaded, or run in
        /// the server).
        forked: bool,
        /// The step runs in the server process itself (`pid` is the server's).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        in_server: bool,
    },
    /// The step's process and everything it left running are gone.
    Exited {
        /// The step process's pid.
        pid: u32,
        /// Its exit status, when it exited.
        code: Option<i32>,
        /// The signal that killed it.
        signal: Option<i32>,
        /// Whether it dumped core.
        core_dumped: bool,
        /// The server ends after this reply (a step run in it left threads).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        retire: bool,
    },
    /// The step could not be started.
    NotStarted {
        /// Why.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_tagged_object_each() {
        let started = ServerMessage::Started {
            pid: 7,
            forked: true,
            in_server: false,
        };
        let text = serde_json::to_string(&started).unwrap();
        assert_eq!(text, r#"{"started":{"pid":7,"forked":true}}"#);
        assert_eq!(
            serde_json::from_str::<ServerMessage>(&text).unwrap(),
            started
        );
        let exited: ServerMessage = serde_json::from_str(
            r#"{"exited":{"pid":7,"code":null,"signal":6,"core_dumped":true}}"#,
        )
        .unwrap();
        assert!(matches!(
            exited,
            ServerMessage::Exited {
                signal: Some(6),
                ..
            }
        ));
    }
}
