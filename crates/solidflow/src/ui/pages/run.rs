//! The run page: header and config, the DAG coloured by step state, the timeline, the
//! log and the actions. The live parts start from what the page was rendered with
//! and follow `/runs/<id>/events` from there.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::Utc;
use maud::{Markup, html};

use super::{duration, json_script, layout, message_page, respond, run_link, status_badge, time};
use crate::config::RunConfig;
use crate::plan::ExecutionPlan;
use crate::storage::run_history::{RunRecord, RunStatus};
use crate::ui::AppState;
use crate::ui::dag;
use crate::ui::history::{self, selected, tags_of};
use crate::ui::run_state::RunState;

/// Query of the run page.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct RunQuery {
    /// Which page of a large DAG.
    #[serde(default)]
    dag_page: usize,
    /// A message to show once (after an action).
    #[serde(default)]
    notice: Option<String>,
}

/// The plan of a recorded run, if this binary has its pipeline.
pub(crate) fn plan_of(state: &AppState, run: &RunRecord) -> Option<ExecutionPlan> {
    let pipeline = state.repository.pipeline(&run.pipeline)?;
    let config = RunConfig::from_validated(pipeline, &run.mode, run.config.clone()).ok()?;
    Some(ExecutionPlan::compile(pipeline, &config))
}

/// Why an action cannot run on this run, or `None` when it can.
pub(crate) fn refusal(
    state: &AppState,
    run: &RunRecord,
    view: &RunState,
    action: &str,
) -> Option<String> {
    match action {
        "terminate" => {
            if run.status != RunStatus::Started {
                return Some(format!(
                    "run {} is not running (it is {})",
                    run.run_id, run.status
                ));
            }
            let here = crate::execution::sink::hostname();
            let recorded = run.host.clone().zip(run.pid);
            match recorded.as_ref().or(view.runner.as_ref()) {
                None => Some(
                    "the run has not recorded which process runs it yet; try again in a moment"
                        .into(),
                ),
                Some((host, pid)) if *host != here => Some(format!(
                    "run {} runs on host {host} (pid {pid}), not on this host ({here}); stop it there (Ctrl-C in its terminal)",
                    run.run_id
                )),
                Some(_) => None,
            }
        }
        _ => {
            if state.repository.pipeline(&run.pipeline).is_none() {
                return Some(format!(
                    "pipeline `{}` is not in this binary ({}); start `ui` from the binary that has it",
                    run.pipeline,
                    state.repository.name()
                ));
            }
            if run.status == RunStatus::Started {
                return Some(format!(
                    "run {} is still running; wait for it to end or terminate it",
                    run.run_id
                ));
            }
            if action != "all" && selected(run, "storage") == "in_memory" {
                return Some(format!(
                    "run {} used in_memory storage, so its step outputs are gone with its process; only \"Re-execute all\" can run it again (use filesystem or s3 storage to re-execute from a failure)",
                    run.run_id
                ));
            }
            if action == "from_failure" && run.status == RunStatus::Success {
                return Some(format!(
                    "run {} succeeded: nothing failed to re-execute from",
                    run.run_id
                ));
            }
            None
        }
    }
}

/// `GET /runs/<id>`.
pub(crate) async fn page(
    State(state): State<AppState>,
    Path(run_id): Path<String>,
    Query(query): Query<RunQuery>,
) -> Response {
    let id = run_id.clone();
    let found = history::blocking(&state, move |h| {
        let Some((run, events)) = history::run_with_events(h, &id)? else {
            return Ok(None);
        };
        let children = history::children(h, &run.run_id)?;
        Ok(Some((run, events, children)))
    })
    .await;
    let (run, events, children) = match found {
        Ok(Some(v)) => v,
        Ok(None) => {
            return message_page(
                StatusCode::NOT_FOUND,
                "Run not found",
                &format!("There is no run `{run_id}` in run history."),
            );
        }
        Err(page) => return page,
    };
    let view = RunState::from_events(&events);
    let plan = plan_of(&state, &run);
    let body = render(&state, &run, &view, plan.as_ref(), &children, &query);
    respond(
        StatusCode::OK,
        layout(&format!("Run {}", &run.run_id), body),
    )
}

fn render(
    state: &AppState,
    run: &RunRecord,
    view: &RunState,
    plan: Option<&ExecutionPlan>,
    children: &[RunRecord],
    query: &RunQuery,
) -> Markup {
    let end = run.ended_at.unwrap_or_else(Utc::now);
    let yaml = serde_saphyr::to_string(&run.config)
        .unwrap_or_else(|e| format!("# cannot show the config: {e}"));
    let total = plan.map_or(view.steps.len(), |p| p.steps.len());
    let states: serde_json::Map<String, serde_json::Value> = view
        .steps
        .iter()
        .map(|(k, s)| (k.clone(), s.state.as_str().into()))
        .collect();
    let timeline = serde_json::json!({
        "start": view.started_ms.unwrap_or(run.started_at.timestamp_millis()),
        "end": view.ended_ms,
        "attempts": view.attempts,
    });
    html! {
        div id="run" data-run-id=(run.run_id) data-status=(run.status) data-last-event=(view.last_event_id)
            data-total=(total) data-started=(run.started_at.timestamp_millis()) {
        @if let Some(n) = &query.notice { p class="notice" { (n) } }
        section class="run-header" {
            h1 { "Run " code { (run.run_id) } " " span id="run-status" { (status_badge(run.status)) } }
            dl {
                dt { "Pipeline" } dd { a href={"/pipelines/" (run.pipeline)} { (run.pipeline) } " (mode " (run.mode) ")" }
                dt { "Started (UTC)" } dd { (time(run.started_at)) }
                dt { "Duration" } dd id="run-duration" { (duration((end - run.started_at).num_milliseconds())) }
                dt { "Executor / storage" } dd { (selected(run, "execution")) " / " (selected(run, "storage")) }
                @if let Some((host, pid)) = &view.runner { dt { "Runs on" } dd { (host) " (pid " (pid) ")" } }
                dt { "Tags" } dd { @let tags = tags_of(run); @if tags.is_empty() { "none" } @for (k, v) in tags { span class="tag" { (k) "=" (v) } " " } }
                @if let Some(p) = &run.parent_run_id { dt { "Re-executes" } dd { (run_link(p)) } }
                @if let Some(r) = run.root_run_id.as_ref().filter(|r| Some(*r) != run.parent_run_id.as_ref()) { dt { "Root run" } dd { (run_link(r)) } }
                @if !children.is_empty() { dt { "Re-executed as" } dd { @for c in children { (run_link(&c.run_id)) " " (status_badge(c.status)) " " } } }
            }
            @if let Some(e) = &view.engine_error {
                div class="error" { strong { "Engine error: " } (e.message) @for c in &e.causes { div class="cause" { "caused by: " (c) } } }
            }
            details class="config" {
                summary { "Run config (YAML)" }
                pre { code { (yaml) } }
            }
        }
        (actions(state, run, view))
        section class="dag-section" {
            h2 { "Steps" }
            p id="dag-counts" class="counts" {
                @for (s, n) in view.counts(total) {
                    span class={"count " (s.as_str())} data-state=(s.as_str()) { span class="n" { (n) } " " (s.as_str().replace('_', " ")) } " "
                }
            }
            @if let Some(plan) = plan {
                @let pages = dag::pages(plan.steps.len());
                @let page = query.dag_page.min(pages - 1);
                @let range = dag::window(plan.steps.len(), page);
                @if pages > 1 {
                    nav class="pager dag-pager" {
                        "Large plan: steps " (range.start + 1) "–" (range.end) " of " (plan.steps.len()) " (in plan order). "
                        @if page > 0 { a href={"?dag_page=" (page - 1)} { "← previous" } " " }
                        @if page + 1 < pages { a href={"?dag_page=" (page + 1)} { "next →" } }
                    }
                }
                div class="dag-scroll" { (dag::render(plan, Some(view), range)) }
            } @else {
                p class="explain" { "Pipeline " code { (run.pipeline) } " is not in this binary, so its plan cannot be drawn; the log below has every event." }
            }
        }
        section class="timeline-section" {
            h2 { "Timeline" }
            div id="gantt" class="gantt" { noscript { "The timeline needs JavaScript." } }
        }
        div class="log-and-detail" {
            section class="log-section" {
                h2 { "Log" }
                form id="log-filters" class="filters" {
                    label { "Step " input type="text" id="log-step" list="step-keys" placeholder="any step"; }
                    @if total <= 2000 {
                        datalist id="step-keys" { @if let Some(p) = plan { @for s in &p.steps { option value=(s.key) {} } } }
                    }
                    label { "Level "
                        select id="log-level" {
                            option value="DEBUG" { "debug+" } option value="INFO" { "info+" }
                            option value="WARNING" { "warning+" } option value="ERROR" { "error" }
                        }
                    }
                    label { "Text " input type="search" id="log-text" placeholder="contains…"; }
                    button type="button" id="log-clear" { "clear" }
                }
                p id="log-info" class="explain" {}
                table class="log log-head" { (log_columns()) thead { tr { th { "Time" } th { "Level" } th { "Step" } th { "Event" } th { "Message" } } } }
                div id="log-scroll" class="log-scroll" {
                    div id="log-canvas" class="log-canvas" {
                        table class="log" { (log_columns()) tbody id="log-rows" {} }
                    }
                }
            }
            aside id="step-detail" class="step-detail" { p class="explain" { "Click a step in the DAG, the timeline or the log to see its attempts, errors, inputs and outputs." } }
        }
        (json_script("step-states", &states))
        (json_script("timeline-data", &timeline))
        }
    }
}

fn actions(state: &AppState, run: &RunRecord, view: &RunState) -> Markup {
    let button = |action: &str, label: &str| {
        let refused = refusal(state, run, view, action);
        html! {
            button type="submit" name="strategy" value=(action) disabled[refused.is_some()]
                title=[refused.as_deref()] { (label) }
        }
    };
    let terminate = refusal(state, run, view, "terminate");
    let reasons: Vec<String> = ["all", "from_failure", "selected"]
        .iter()
        .filter_map(|a| refusal(state, run, view, a))
        .collect();
    html! {
        section class="actions" {
            h2 { "Actions" }
            form method="post" action={"/runs/" (run.run_id) "/reexecute"} class="inline" {
                (button("from_failure", "Re-execute from failure"))
                (button("all", "Re-execute all"))
                input type="text" name="selection" placeholder="*step, step+, a,b" aria-label="step selection";
                (button("selected", "Re-execute selected"))
            }
            @if run.status == RunStatus::Started {
                form method="post" action={"/runs/" (run.run_id) "/terminate"} class="inline" {
                    button type="submit" class="danger" disabled[terminate.is_some()] title=[terminate.as_deref()] { "Terminate" }
                }
            }
            @if let Some(r) = reasons.first() { p class="explain" { (r) } }
            @if let (true, Some(r)) = (run.status == RunStatus::Started, &terminate) { p class="explain" { (r) } }
        }
    }
}

/// The log's column widths, shared by its header and its (separately scrolled) rows.
fn log_columns() -> Markup {
    html! { colgroup { col class="c-time"; col class="c-level"; col class="c-step"; col class="c-event"; col; } }
}
