//! The runs list: newest first, filtered by status, pipeline and tag, paged, and kept
//! live by `/runs/stream`, which sends the re-rendered rows when they change.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::Utc;
use maud::{Markup, html};

use super::{duration, layout, respond, run_link, status_badge, time};
use crate::storage::run_history::{RunRecord, RunStatus};
use crate::ui::AppState;
use crate::ui::history::{self, RunFilter, STATUSES, selected, tags_of};

/// `GET /`.
pub(crate) async fn page(
    State(state): State<AppState>,
    Query(filter): Query<RunFilter>,
) -> Response {
    let f = filter.clone();
    let (runs, more) = match history::blocking(&state, move |h| history::list(h, &f)).await {
        Ok(v) => v,
        Err(page) => return page,
    };
    let mut pipelines: Vec<String> = state
        .repository
        .pipeline_names()
        .into_iter()
        .map(str::to_string)
        .collect();
    if let Some(p) = filter
        .pipeline
        .as_ref()
        .filter(|p| !p.is_empty() && !pipelines.contains(p))
    {
        pipelines.push(p.clone());
    }
    let chosen = |v: &Option<String>, x: &str| v.as_deref() == Some(x);
    let body = html! {
        h1 { "Runs" }
        form class="filters" method="get" action="/" {
            label { "Status "
                select name="status" {
                    option value="" { "any" }
                    @for s in STATUSES {
                        @let s = s.to_string();
                        option value=(s) selected[chosen(&filter.status, &s)] { (s) }
                    }
                }
            }
            label { "Pipeline "
                select name="pipeline" {
                    option value="" { "any" }
                    @for p in &pipelines {
                        option value=(p) selected[chosen(&filter.pipeline, p)] { (p) }
                    }
                }
            }
            label { "Tag " input type="text" name="tag" placeholder="key=value" value=[filter.tag.as_deref()]; }
            button type="submit" { "Filter" }
            @if !filter.query(0).is_empty() { a href="/" { "clear" } }
        }
        table class="runs" {
            thead { tr {
                th { "Status" } th { "Pipeline" } th { "Run" } th { "Tags" } th { "Started (UTC)" }
                th { "Duration" } th { "Executor / storage" } th { "Parent" }
            } }
            tbody id="runs-rows" data-stream={"/runs/stream?" (filter.query(filter.page))} {
                (rows(&runs))
            }
        }
        nav class="pager" {
            @if filter.page > 0 { a rel="prev" href={"/?" (filter.query(filter.page - 1))} { "← Newer" } }
            span { "page " (filter.page + 1) }
            @if more { a rel="next" href={"/?" (filter.query(filter.page + 1))} { "Older →" } }
        }
    };
    respond(StatusCode::OK, layout("Runs", body))
}

/// The table rows; also what the live stream sends.
pub(crate) fn rows(runs: &[RunRecord]) -> Markup {
    let now = Utc::now();
    html! {
        @if runs.is_empty() {
            tr { td colspan="8" class="empty" { "No runs yet. Execute a pipeline (" code { "<binary> execute <pipeline>" } ") and it appears here." } }
        }
        @for run in runs {
            @let end = run.ended_at.unwrap_or(now);
            tr class={"run " (run.status.to_string().to_ascii_lowercase())} data-run-id=(run.run_id) {
                td { (status_badge(run.status)) }
                td { a href={"/pipelines/" (run.pipeline)} { (run.pipeline) } }
                td { (run_link(&run.run_id)) }
                td { @for (k, v) in tags_of(run) { span class="tag" { (k) "=" (v) } " " } }
                td { (time(run.started_at)) }
                td { (duration((end - run.started_at).num_milliseconds())) @if run.status == RunStatus::Started { " …" } }
                td { (selected(run, "execution")) " / " (selected(run, "storage")) }
                td { @if let Some(p) = &run.parent_run_id { (run_link(p)) } }
            }
        }
    }
}
