//! The pipelines of this binary: each with its plan DAG and its run config schema.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use maud::html;

use super::{layout, message_page, respond};
use crate::config::schema_text;
use crate::config::{RunConfig, run_config_schema};
use crate::plan::ExecutionPlan;
use crate::ui::{AppState, dag};

/// `GET /pipelines`.
pub(crate) async fn list(State(state): State<AppState>) -> Response {
    let names = state.repository.pipeline_names();
    let body = html! {
        h1 { "Pipelines of " code { (state.repository.name()) } }
        ul class="pipelines" {
            @for name in names {
                li { a href={"/pipelines/" (name)} { (name) } " " a class="muted" href={"/?pipeline=" (crate::ui::history::encode(name))} { "runs" } }
            }
        }
    };
    respond(StatusCode::OK, layout("Pipelines", body))
}

/// `GET /pipelines/<name>`.
pub(crate) async fn page(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let Some(pipeline) = state.repository.pipeline(&name) else {
        return message_page(
            StatusCode::NOT_FOUND,
            "Pipeline not found",
            &format!(
                "This binary ({}) has no pipeline `{name}`. Its pipelines: {}.",
                state.repository.name(),
                state.repository.pipeline_names().join(", ")
            ),
        );
    };
    let schema = run_config_schema(pipeline, None)
        .map(|s| schema_text::render(&s))
        .unwrap_or_else(|e| e.to_string());
    // The plan's shape does not depend on run config: draw it with the mode's first
    // executor and storage.
    let plan = pipeline.mode(None).and_then(|mode| {
        let value = serde_json::json!({
            "storage": { mode.storages.first()?.name: {} },
            "execution": { mode.executors.first()?.name: {} },
        });
        RunConfig::from_validated(pipeline, &mode.name, value).ok()
    });
    let plan = plan.map(|c| ExecutionPlan::compile(pipeline, &c));
    let body = html! {
        h1 { "Pipeline " code { (name) } }
        @if !pipeline.description().is_empty() { p { (pipeline.description()) } }
        p { a href={"/?pipeline=" (crate::ui::history::encode(&name))} { "Its runs" } }
        @if let Some(plan) = &plan {
            h2 { "Plan (" (plan.steps.len()) " steps, " (plan.depth()) " levels)" }
            @let range = dag::window(plan.steps.len(), 0);
            @if range.len() < plan.steps.len() { p class="explain" { "Showing the first " (range.len()) " steps." } }
            div class="dag-scroll" { (dag::render(plan, None, range)) }
        }
        h2 { "Run config schema" }
        pre class="schema" { code { (schema) } }
    };
    respond(StatusCode::OK, layout(&name, body))
}
