//! Server-sent event streams: a run's events (resumable with `Last-Event-ID`, so a
//! reconnecting page neither loses nor repeats a line) and the runs list's rows.
//!
//! Streams poll the history's reader connection; the run's writer is never waited on.
//! A poll is one indexed range query (`events_between`); whether the run's process is
//! still alive is checked once a second, not on every poll.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};

use super::AppState;
use super::history::{self, RunFilter};
use super::run_state::RunState;
use crate::execution::event::Event;
use crate::storage::run_history::RunHistory;

/// How often an open stream looks for new events.
const POLL: Duration = Duration::from_millis(40);
/// At most this many events are read per poll, so opening a huge run streams it in
/// slices instead of loading all its events at once.
const BATCH: usize = 2_000;
/// How often an open stream checks that the run's process is still alive (a dead run
/// is marked failed and its stream ends).
const LIVENESS: Duration = Duration::from_secs(1);
/// How often the runs list is re-rendered.
const LIST_POLL: Duration = Duration::from_millis(700);

/// Query of the events stream.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct EventsQuery {
    /// Resume after this event id (what `Last-Event-ID` says on a reconnect).
    #[serde(default)]
    after: Option<i64>,
}

/// One event as the page's script reads it.
#[derive(serde::Serialize)]
struct Message<'a> {
    id: i64,
    t: i64,
    r#type: &'static str,
    step: Option<&'a str>,
    level: crate::execution::event::Level,
    msg: &'a str,
    host: &'a str,
    pid: u32,
    worker: Option<&'a str>,
    stream: Option<&'static str>,
    state: Option<super::run_state::StepState>,
    bar: Option<super::run_state::Attempt>,
    end: bool,
}

/// One event as the page needs it.
fn message(id: i64, e: &Event, view: &mut RunState) -> SseEvent {
    let change = view.apply(id, e);
    let stream = if e.message.starts_with("[stderr] ") {
        Some("stderr")
    } else if e.message.starts_with("[stdout] ") {
        Some("stdout")
    } else {
        None
    };
    let data = Message {
        id,
        t: e.timestamp.timestamp_millis(),
        r#type: e.event_type(),
        step: e.step_key.as_deref(),
        level: e.level,
        msg: &e.message,
        host: &e.host,
        pid: e.pid,
        worker: e.worker.as_deref(),
        stream,
        state: change.state,
        bar: change.bar,
        end: e.is_pipeline_end(),
    };
    let json = serde_json::to_string(&data).unwrap_or_default();
    SseEvent::default().id(id.to_string()).data(json)
}

struct RunStream {
    history: RunHistory,
    run_id: String,
    view: RunState,
    queue: VecDeque<SseEvent>,
    /// Poll again without waiting (the last poll was a full batch).
    more: bool,
    checked_alive: Instant,
    ended: bool,
    done: bool,
}

/// `GET /runs/<id>/events`: every event after `Last-Event-ID` (or `?after=`), then new
/// ones as they are recorded; an `end` event once the run has ended.
pub(crate) async fn run_events(
    State(state): State<AppState>,
    Path(run_id): Path<String>,
    Query(query): Query<EventsQuery>,
    headers: HeaderMap,
) -> Response {
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .or(query.after)
        .unwrap_or(0);
    let id = run_id.clone();
    let found = history::blocking(&state, move |h| {
        let Some(run) = h.run(&id).map_err(|e| super::error_chain(&e))? else {
            return Ok(None);
        };
        // Fold what the page already has, so state changes are computed from there.
        let before = if after > 0 {
            h.events_between(&run.run_id, 0, after, usize::MAX)
                .map_err(|e| super::error_chain(&e))?
        } else {
            Vec::new()
        };
        Ok(Some((run.run_id, RunState::from_events(&before))))
    })
    .await;
    let (run_id, view) = match found {
        Ok(Some(v)) => v,
        Ok(None) => return (StatusCode::NOT_FOUND, format!("no run `{run_id}`")).into_response(),
        Err(page) => return page,
    };
    let ended = view.ended_ms.is_some();
    let stream = RunStream {
        history: state.history.clone(),
        run_id,
        view: RunState {
            last_event_id: after,
            ..view
        },
        queue: VecDeque::new(),
        more: true,
        checked_alive: Instant::now(),
        ended,
        done: false,
    };
    Sse::new(run_stream(stream))
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn run_stream(s: RunStream) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    stream::unfold(s, |mut s| async move {
        loop {
            if let Some(e) = s.queue.pop_front() {
                return Some((Ok(e), s));
            }
            if s.done {
                return None;
            }
            if s.ended {
                s.done = true;
                return Some((Ok(SseEvent::default().event("end").data("{}")), s));
            }
            if !s.more {
                tokio::time::sleep(POLL).await;
            }
            let history = s.history.clone();
            let (run_id, after) = (s.run_id.clone(), s.view.last_event_id);
            let check_alive = s.checked_alive.elapsed() >= LIVENESS;
            if check_alive {
                s.checked_alive = Instant::now();
            }
            let events = tokio::task::spawn_blocking(move || {
                if check_alive {
                    history.mark_dead_runs()?;
                }
                history.events_between(&run_id, after, i64::MAX, BATCH)
            })
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
            s.more = events.len() == BATCH;
            for (id, e) in &events {
                s.ended |= e.is_pipeline_end();
                let m = message(*id, e, &mut s.view);
                s.queue.push_back(m);
            }
        }
    })
}

/// `GET /runs/stream`: the runs list's rows (same filters as the page), sent whenever
/// they change.
pub(crate) async fn runs_stream(
    State(state): State<AppState>,
    Query(filter): Query<RunFilter>,
) -> Response {
    let s = (state, filter, String::new());
    let stream = stream::unfold(s, |(state, filter, last)| async move {
        loop {
            let f = filter.clone();
            let rows = history::blocking(&state, move |h| history::list(h, &f))
                .await
                .ok()
                .map(|(runs, _)| super::pages::runs::rows(&runs).into_string());
            if let Some(rows) = rows.filter(|r| *r != last) {
                let e = SseEvent::default().event("rows").data(rows.clone());
                return Some((Ok::<_, Infallible>(e), (state, filter, rows)));
            }
            tokio::time::sleep(LIST_POLL).await;
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
