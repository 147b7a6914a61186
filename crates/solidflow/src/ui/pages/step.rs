//! Step detail: attempts, errors with their cause chain, inputs and outputs, where it
//! ran, and materializations. `?fragment=1` returns just the panel the run page shows.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{TimeZone, Utc};
use maud::{Markup, html};

use super::{duration, layout, message_page, respond, run_link};
use crate::ui::AppState;
use crate::ui::history;
use crate::ui::run_state::{RunState, StepView};

/// Query of the step page.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct StepQuery {
    #[serde(default)]
    fragment: Option<u8>,
}

/// `GET /runs/<id>/steps/<key>`.
pub(crate) async fn page(
    State(state): State<AppState>,
    Path((run_id, step_key)): Path<(String, String)>,
    Query(query): Query<StepQuery>,
) -> Response {
    let id = run_id.clone();
    let found = match history::blocking(&state, move |h| history::run_with_events(h, &id)).await {
        Ok(v) => v,
        Err(page) => return page,
    };
    let Some((run, events)) = found else {
        return message_page(
            StatusCode::NOT_FOUND,
            "Run not found",
            &format!("There is no run `{run_id}` in run history."),
        );
    };
    let view = RunState::from_events(&events);
    let in_plan = super::run::plan_of(&state, &run).is_some_and(|p| p.step(&step_key).is_some());
    let step = view.steps.get(&step_key).cloned();
    if step.is_none() && !in_plan {
        return message_page(
            StatusCode::NOT_FOUND,
            "Step not found",
            &format!("Run {} has no step `{step_key}`.", run.run_id),
        );
    }
    let panel = panel(&view, &step_key, &step.unwrap_or_default());
    if query.fragment.is_some() {
        return respond(StatusCode::OK, panel);
    }
    let body = html! {
        p { "Run " (run_link(&run.run_id)) " of " (run.pipeline) }
        (panel)
    };
    respond(StatusCode::OK, layout(&step_key, body))
}

fn at(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.format("%H:%M:%S%.3f").to_string())
        .unwrap_or_default()
}

fn panel(view: &RunState, key: &str, step: &StepView) -> Markup {
    html! {
        div class="step-panel" data-step=(key) {
            h2 { (key) " " span class={"badge " (step.state.as_str())} { (step.state.as_str().replace('_', " ")) } }
            h3 { "Attempts" }
            @if step.attempts.is_empty() { p class="explain" { "Not started." } }
            @else {
                table class="attempts" {
                    thead { tr { th { "#" } th { "Start" } th { "Duration" } th { "Outcome" } th { "Host" } th { "Worker" } th { "Pid" } } }
                    tbody {
                        @for &i in &step.attempts {
                            @let a = &view.attempts[i];
                            tr {
                                td { (a.attempt) } td { (at(a.start_ms)) }
                                td { @if let Some(e) = a.end_ms { (duration(e - a.start_ms)) } @else { "running" } }
                                td { (a.outcome.as_str().replace('_', " ")) } td { (a.host) }
                                td { (a.worker.as_deref().unwrap_or("-")) } td { (a.pid) }
                            }
                        }
                    }
                }
            }
            @if !step.skipped_because.is_empty() {
                p { "Skipped because upstream failed: " @for u in &step.skipped_because { code { (u) } " " } }
            }
            @for (attempt, e) in &step.errors {
                div class="error" {
                    strong { "Attempt " (attempt) " failed (" (e.kind) "): " } span class="error-message" { (e.message) }
                    @for c in &e.causes { div class="cause" { "caused by: " (c) } }
                    @if let Some(l) = &e.location { div class="location" { "at " code { (l) } } }
                }
            }
            @for (title, values) in [("Inputs", &step.inputs), ("Outputs", &step.outputs)] {
                h3 { (title) }
                @if values.is_empty() { p class="explain" { "None recorded." } }
                @else {
                    table class="values" {
                        thead { tr { th { "Name" } th { "Type" } th { @if title == "Inputs" { "From" } @else { "Stored at" } } th { "Size" } } }
                        tbody { @for v in values { tr {
                            td { (v.name) } td { code { (v.type_name) } }
                            td { code { (v.location.as_deref().unwrap_or("in memory")) } }
                            td { @if let Some(b) = v.bytes { (b) " B" } @else { "-" } }
                        } } }
                    }
                }
            }
            @if !step.materializations.is_empty() {
                h3 { "Materializations" }
                @for m in &step.materializations {
                    div class="materialization" {
                        strong { (m.name) } @if !m.description.is_empty() { " — " (m.description) }
                        @if !m.metadata.is_null() { pre { (serde_json::to_string_pretty(&m.metadata).unwrap_or_default()) } }
                    }
                }
            }
        }
    }
}
