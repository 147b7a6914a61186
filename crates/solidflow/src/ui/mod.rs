//! The web page: `<binary> ui` serves run history and live runs in a browser.
//!
//! It is a view of run history, never a second source of truth: pages are rendered on
//! the server (maud) from the same SQLite file the runs write, read through the
//! history's own reader connection (WAL, so a reader never blocks the run's writer
//! thread, which stays the only writer). Live parts (run states, timeline, log, the
//! runs list) follow server-sent events; the small script and stylesheet are embedded
//! in the binary.
//!
//! Security: it listens on 127.0.0.1 unless `--host` says otherwise, and then a token
//! is required (generated and printed in the URL, or given with `--token`). Actions
//! are POST requests that must come from the page's own origin. Every user string is
//! escaped by the templates.

mod actions;
mod auth;
mod dag;
mod history;
mod live;
mod pages;
pub mod run_state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

use crate::definition::repository::Repository;
use crate::storage::run_history::RunHistory;

/// How `ui` listens.
#[derive(Debug, Clone)]
pub struct UiOptions {
    /// The address to bind (default `127.0.0.1`).
    pub host: String,
    /// The port (default 3000; 0 picks a free one).
    pub port: u16,
    /// The access token; generated when `host` is not a loopback address.
    pub token: Option<String>,
    /// The solidflow home (run history, logs of re-executions).
    pub home: PathBuf,
}

/// Why the page could not be served.
#[derive(Debug, thiserror::Error)]
pub enum UiError {
    /// The address is taken or not ours.
    #[error(
        "cannot listen on {addr}: {source}. Pick another port with --port (e.g. --port {next}) or stop what uses it"
    )]
    Bind {
        /// The address.
        addr: String,
        /// The suggested port.
        next: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `--host` is not an address.
    #[error("--host {host} is not an IP address to listen on (e.g. 127.0.0.1 or 0.0.0.0)")]
    BadHost {
        /// What was given.
        host: String,
    },
    /// Run history is unusable.
    #[error(
        "cannot read run history {path}: {message}. If the file is damaged, move it aside; solidflow creates a new one"
    )]
    History {
        /// The database file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The server stopped with an error.
    #[error("the web server failed: {0}")]
    Serve(std::io::Error),
}

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub repository: Arc<Repository>,
    pub history: RunHistory,
    pub home: PathBuf,
    pub token: Option<Arc<str>>,
    /// Whether the server listens on loopback only (then the Host header must say so).
    pub loopback: bool,
    /// Starts re-executions at normal priority.
    pub spawner: actions::Spawner,
}

/// Serves the page until interrupted. Prints the URL (with the token, if any) first.
///
/// The server's threads run at a lower CPU priority (nice 10) than the runs it shows,
/// so on a busy machine a watched run is not slowed by its page.
pub fn serve(repository: Repository, options: UiOptions) -> Result<(), UiError> {
    let spawner = actions::Spawner::start().map_err(UiError::Serve)?;
    actions::lower_thread_priority();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(actions::lower_thread_priority)
        .enable_all()
        .build()
        .map_err(UiError::Serve)?;
    runtime.block_on(serve_async(repository, options, spawner))
}

async fn serve_async(
    repository: Repository,
    options: UiOptions,
    spawner: actions::Spawner,
) -> Result<(), UiError> {
    let ip: std::net::IpAddr = options.host.parse().map_err(|_| UiError::BadHost {
        host: options.host.clone(),
    })?;
    let loopback = ip.is_loopback();
    let token = match (&options.token, loopback) {
        (Some(t), _) => Some(t.clone()),
        (None, true) => None,
        (None, false) => Some(uuid::Uuid::new_v4().simple().to_string()),
    };
    let db = options.home.join("history.db");
    let existed = db.exists();
    let history = open_history(&db)?;
    if !existed {
        eprintln!(
            "note: no run history at {} yet; runs appear here as they are executed",
            db.display()
        );
    }
    let addr = SocketAddr::new(ip, options.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| UiError::Bind {
            addr: addr.to_string(),
            next: u32::from(options.port) + 1,
            source,
        })?;
    let local = listener.local_addr().map_err(UiError::Serve)?;
    let state = AppState {
        repository: Arc::new(repository),
        history,
        home: options.home.clone(),
        token: token.map(Arc::from),
        loopback,
        spawner,
    };
    let shown_host = if ip.is_unspecified() {
        crate::execution::sink::hostname()
    } else {
        local.ip().to_string()
    };
    match &state.token {
        Some(t) => println!(
            "solidflow ui: http://{shown_host}:{}/?token={t}",
            local.port()
        ),
        None => println!("solidflow ui: http://{shown_host}:{}/", local.port()),
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(UiError::Serve)
}

/// Opens run history and checks it can be read, so a damaged file is reported at start.
fn open_history(db: &std::path::Path) -> Result<RunHistory, UiError> {
    let fail = |message: String| UiError::History {
        path: db.display().to_string(),
        message,
    };
    let history = RunHistory::open(db).map_err(|e| fail(error_chain(&e)))?;
    history.runs(1).map_err(|e| fail(error_chain(&e)))?;
    Ok(history)
}

/// An error and its causes on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(pages::runs::page))
        .route("/runs/stream", get(live::runs_stream))
        .route("/runs/{run_id}", get(pages::run::page))
        .route("/runs/{run_id}/events", get(live::run_events))
        .route("/runs/{run_id}/steps/{step_key}", get(pages::step::page))
        .route("/runs/{run_id}/reexecute", post(actions::reexecute))
        .route("/runs/{run_id}/terminate", post(actions::terminate))
        .route("/pipelines", get(pages::pipelines::list))
        .route("/pipelines/{name}", get(pages::pipelines::page))
        .route("/assets/ui.js", get(pages::assets::script))
        .route("/assets/ui.css", get(pages::assets::style))
        .fallback(pages::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::check,
        ))
        .with_state(state)
}
