//! Actions: re-execute a run and terminate a running one. Both are POSTs from the
//! page's own origin, and both are refused with a reason where they cannot work.
//!
//! Re-execution runs the very code of the CLI: this binary is started as
//! `reexecute <run> (--from-failure | --all | --select SEL) --run-id <new>`, detached in
//! its own process group with its output in `<home>/ui/<new>.log`, and the page moves
//! to the new run once it is recorded. Terminating sends SIGINT to the process that
//! runs the run, as Ctrl-C in its terminal would (the CLI's cancel path), and only on
//! the host that runs it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axum::Form;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

use super::AppState;
use super::auth::same_origin;
use super::history::{self, encode};
use super::pages::message_page;
use super::pages::run::refusal;
use super::run_state::RunState;

/// How long a started re-execution may take to record its run.
const RECORD_DEADLINE: Duration = Duration::from_secs(30);

/// The re-execute form.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct ReexecuteForm {
    /// `all`, `from_failure` or `selected`.
    strategy: String,
    /// The step selection for `selected` (`*x`, `x+`, `a,b`).
    #[serde(default)]
    selection: Option<String>,
}

fn refused(title: &str, reason: &str) -> Response {
    message_page(StatusCode::CONFLICT, title, reason)
}

/// What both actions check first: the request comes from the page itself, and the run
/// exists (with what its events say).
async fn load(
    state: &AppState,
    run_id: &str,
    headers: &HeaderMap,
) -> Result<(crate::storage::run_history::RunRecord, RunState), Response> {
    if let Err(why) = same_origin(headers) {
        return Err(message_page(StatusCode::FORBIDDEN, "Action refused", why));
    }
    let id = run_id.to_string();
    match history::blocking(state, move |h| history::run_with_events(h, &id)).await? {
        Some((run, events)) => Ok((run, RunState::from_events(&events))),
        None => Err(message_page(
            StatusCode::NOT_FOUND,
            "Run not found",
            &format!("There is no run `{run_id}` in run history."),
        )),
    }
}

/// `POST /runs/<id>/reexecute`.
pub(crate) async fn reexecute(
    State(state): State<AppState>,
    Path(run_id): Path<String>,
    headers: HeaderMap,
    Form(form): Form<ReexecuteForm>,
) -> Response {
    let (run, view) = match load(&state, &run_id, &headers).await {
        Ok(v) => v,
        Err(page) => return page,
    };
    let flag = match form.strategy.as_str() {
        "all" => vec!["--all".to_string()],
        "from_failure" => vec!["--from-failure".to_string()],
        "selected" => match form
            .selection
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            Some(sel) => vec!["--select".to_string(), sel.to_string()],
            None => {
                return refused(
                    "Cannot re-execute",
                    "Type a step selection first (for example `*total`, `numbers+` or `a,b`).",
                );
            }
        },
        other => {
            return refused(
                "Cannot re-execute",
                &format!("unknown re-execution `{other}`; use all, from_failure or selected"),
            );
        }
    };
    if let Some(reason) = refusal(&state, &run, &view, &form.strategy) {
        return refused("Cannot re-execute", &reason);
    }
    let new_id = uuid::Uuid::new_v4().to_string();
    let home = state.home.clone();
    let parent = run.run_id.clone();
    let spawner = state.spawner.clone();
    let started = tokio::task::spawn_blocking({
        let new_id = new_id.clone();
        move || spawn_reexecute(&spawner, &home, &parent, &flag, &new_id)
    })
    .await;
    let mut child = match started {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return refused("Cannot re-execute", &e),
        Err(e) => return refused("Cannot re-execute", &e.to_string()),
    };
    let log = state.home.join("ui").join(format!("{new_id}.log"));
    let deadline = Instant::now() + RECORD_DEADLINE;
    loop {
        let id = new_id.clone();
        let recorded = history::blocking(&state, move |h| {
            h.run(&id).map(|r| r.is_some()).map_err(|e| e.to_string())
        })
        .await
        .unwrap_or(false);
        if recorded {
            // Reap it when it ends, so it never lingers as a zombie of this server.
            std::thread::spawn(move || child.wait());
            return Redirect::to(&format!("/runs/{new_id}")).into_response();
        }
        if let Ok(Some(status)) = child.try_wait() {
            let output = std::fs::read_to_string(&log).unwrap_or_default();
            return refused(
                "Re-execution did not start",
                &format!(
                    "`reexecute {} {}` exited with {status} before recording a run: {}",
                    run.run_id,
                    form.strategy,
                    output.trim()
                ),
            );
        }
        if Instant::now() > deadline {
            std::thread::spawn(move || child.wait());
            return refused(
                "Re-execution is slow to start",
                &format!(
                    "the re-execution was started as run {new_id} but has not recorded its run after {} s; see {}",
                    RECORD_DEADLINE.as_secs(),
                    log.display()
                ),
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts processes from a thread at normal CPU priority. The server's own threads run
/// at a lower priority so that a busy page never takes CPU from runs; a process started
/// from one of them would inherit that, so re-executions start from here instead.
#[derive(Clone)]
pub(crate) struct Spawner(
    crossbeam_channel::Sender<(
        Command,
        std::sync::mpsc::Sender<std::io::Result<std::process::Child>>,
    )>,
);

impl Spawner {
    /// Starts the spawner thread; call it before lowering any thread's priority.
    pub(crate) fn start() -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded::<(Command, std::sync::mpsc::Sender<_>)>();
        std::thread::Builder::new()
            .name("solidflow-ui-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })?;
        Ok(Self(tx))
    }

    /// Spawns `cmd` from the spawner thread.
    fn spawn(&self, cmd: Command) -> std::io::Result<std::process::Child> {
        let (tx, rx) = std::sync::mpsc::channel();
        let gone = || std::io::Error::other("the spawner thread is gone");
        self.0.send((cmd, tx)).map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
}

/// Lowers the calling thread's CPU priority (nice 10), so the page yields to runs.
pub(crate) fn lower_thread_priority() {
    // SAFETY: gettid has no preconditions; setpriority on this thread's own id only
    // changes its scheduling priority (Linux keeps nice values per thread).
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// Starts `<this binary> reexecute ...` in its own process group, output to a log.
fn spawn_reexecute(
    spawner: &Spawner,
    home: &std::path::Path,
    parent: &str,
    flag: &[String],
    new_id: &str,
) -> Result<std::process::Child, String> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let dir = home.join("ui");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let log_path = dir.join(format!("{new_id}.log"));
    let log = std::fs::File::create(&log_path)
        .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&exe);
    cmd.arg("reexecute")
        .arg(parent)
        .args(flag)
        .args(["--run-id", new_id])
        .env("SOLIDFLOW_HOME", home)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0);
    spawner
        .spawn(cmd)
        .map_err(|e| format!("cannot start {} reexecute: {e}", exe.display()))
}

/// `POST /runs/<id>/terminate`.
pub(crate) async fn terminate(
    State(state): State<AppState>,
    Path(run_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (run, view) = match load(&state, &run_id, &headers).await {
        Ok(v) => v,
        Err(page) => return page,
    };
    if let Some(reason) = refusal(&state, &run, &view, "terminate") {
        return refused("Cannot terminate", &reason);
    }
    let Some(pid) = run.pid.or(view.runner.as_ref().map(|r| r.1)) else {
        return refused("Cannot terminate", "the run has not recorded its process");
    };
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return refused(
            "Cannot terminate",
            &format!("pid {pid} is not a process id"),
        );
    };
    // SAFETY: kill(2) with a pid read from run history and a standard signal.
    let rc = unsafe { libc::kill(pid, libc::SIGINT) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return refused(
            "Cannot terminate",
            &format!(
                "cannot signal process {pid} of run {}: {e} (has it already exited?)",
                run.run_id
            ),
        );
    }
    let notice = format!(
        "Sent an interrupt to process {pid}; the run stops its steps and ends as CANCELED."
    );
    Redirect::to(&format!("/runs/{}?notice={}", run.run_id, encode(&notice))).into_response()
}
