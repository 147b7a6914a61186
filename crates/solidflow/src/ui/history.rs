//! Reading run history for the page, off the async threads. Reads use the history's
//! reader connection; nothing here writes.

use axum::http::StatusCode;
use axum::response::Response;

use super::AppState;
use super::pages::message_page;
use crate::execution::event::Event;
use crate::storage::run_history::{RunHistory, RunRecord, RunStatus};

/// Runs per page of the runs list.
pub(crate) const PAGE_SIZE: usize = 25;

/// The runs list's filters, from the query string.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub(crate) struct RunFilter {
    /// `STARTED`, `SUCCESS`, `FAILURE` or `CANCELED`.
    #[serde(default)]
    pub status: Option<String>,
    /// A pipeline name.
    #[serde(default)]
    pub pipeline: Option<String>,
    /// `key=value` or `key`.
    #[serde(default)]
    pub tag: Option<String>,
    /// 0-based page.
    #[serde(default)]
    pub page: usize,
}

impl RunFilter {
    fn non_empty(v: &Option<String>) -> Option<&str> {
        v.as_deref().map(str::trim).filter(|s| !s.is_empty())
    }

    /// Whether `run` passes the filters.
    pub(crate) fn matches(&self, run: &RunRecord) -> bool {
        let status_ok = Self::non_empty(&self.status)
            .is_none_or(|s| run.status.to_string().eq_ignore_ascii_case(s));
        let pipeline_ok = Self::non_empty(&self.pipeline).is_none_or(|p| run.pipeline == p);
        let tag_ok = Self::non_empty(&self.tag).is_none_or(|t| {
            let (k, v) = t.split_once('=').map_or((t, None), |(k, v)| (k, Some(v)));
            tags_of(run)
                .iter()
                .any(|(tk, tv)| tk == k && v.is_none_or(|v| v == tv))
        });
        status_ok && pipeline_ok && tag_ok
    }

    /// The query string for `page` with the same filters.
    pub(crate) fn query(&self, page: usize) -> String {
        let mut parts = Vec::new();
        for (k, v) in [
            ("status", &self.status),
            ("pipeline", &self.pipeline),
            ("tag", &self.tag),
        ] {
            if let Some(v) = Self::non_empty(v) {
                parts.push(format!("{k}={}", encode(v)));
            }
        }
        if page > 0 {
            parts.push(format!("page={page}"));
        }
        parts.join("&")
    }
}

/// Percent-encodes a query value.
pub(crate) fn encode(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A run's tags.
pub(crate) fn tags_of(run: &RunRecord) -> Vec<(String, String)> {
    run.tags
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The selector key of `block` (`execution` or `storage`) in a recorded config.
pub(crate) fn selected(run: &RunRecord, block: &str) -> String {
    run.config
        .get(block)
        .and_then(|b| b.as_object())
        .and_then(|m| m.keys().next().cloned())
        .unwrap_or_else(|| "-".into())
}

/// One page of runs, newest first, and whether there is a next page. Status, pipeline
/// and `key=value` tags are filtered by run history; a bare tag key here.
pub(crate) fn list(
    history: &RunHistory,
    filter: &RunFilter,
) -> Result<(Vec<RunRecord>, bool), String> {
    let mut query = crate::storage::run_history::RunFilter::default();
    if let Some(s) = RunFilter::non_empty(&filter.status) {
        match STATUSES
            .iter()
            .find(|st| st.to_string().eq_ignore_ascii_case(s))
        {
            Some(st) => query.statuses = vec![*st],
            None => return Ok((Vec::new(), false)),
        }
    }
    query.pipeline = RunFilter::non_empty(&filter.pipeline).map(str::to_string);
    let tag = RunFilter::non_empty(&filter.tag);
    if let Some((k, v)) = tag.and_then(|t| t.split_once('=')) {
        query.tags.insert(k.to_string(), v.to_string());
    } else if tag.is_none() {
        query.limit = Some((filter.page + 1) * PAGE_SIZE + 1);
    }
    let all = history.list(&query).map_err(|e| super::error_chain(&e))?;
    let mut matching = all.into_iter().filter(|r| filter.matches(r));
    let skip = filter.page * PAGE_SIZE;
    let page: Vec<_> = matching.by_ref().skip(skip).take(PAGE_SIZE).collect();
    let more = matching.next().is_some();
    Ok((page, more))
}

/// Runs blocking history work on the blocking pool; a history error becomes a 500 page.
pub(crate) async fn blocking<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&RunHistory) -> Result<T, String> + Send + 'static,
) -> Result<T, Response> {
    let history = state.history.clone();
    match tokio::task::spawn_blocking(move || f(&history)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(message)) => Err(message_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Run history cannot be read",
            &message,
        )),
        Err(e) => Err(message_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal error",
            &e.to_string(),
        )),
    }
}

/// A run with its events (history id, event).
pub(crate) type RunAndEvents = (RunRecord, Vec<(i64, Event)>);

/// A run by exact id (or unique prefix) with all its events.
pub(crate) fn run_with_events(
    history: &RunHistory,
    run_id: &str,
) -> Result<Option<RunAndEvents>, String> {
    let Some(run) = history.run(run_id).map_err(|e| super::error_chain(&e))? else {
        return Ok(None);
    };
    let events = history
        .events(&run.run_id, 0)
        .map_err(|e| super::error_chain(&e))?;
    Ok(Some((run, events)))
}

/// Runs whose parent is `run_id` (its re-executions).
pub(crate) fn children(history: &RunHistory, run_id: &str) -> Result<Vec<RunRecord>, String> {
    Ok(history
        .runs(1_000_000)
        .map_err(|e| super::error_chain(&e))?
        .into_iter()
        .filter(|r| r.parent_run_id.as_deref() == Some(run_id))
        .collect())
}

/// The status words the filter offers.
pub(crate) const STATUSES: [RunStatus; 4] = [
    RunStatus::Started,
    RunStatus::Success,
    RunStatus::Failure,
    RunStatus::Canceled,
];
