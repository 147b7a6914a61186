//! Server-rendered pages. maud escapes every interpolated string, so log lines, step
//! names and config values always show as text.

pub(crate) mod assets;
pub(crate) mod pipelines;
pub(crate) mod run;
pub(crate) mod runs;
pub(crate) mod step;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use crate::storage::run_history::RunStatus;

/// Scripts only from this server, no inline script: a `<script>` that slipped through
/// could not run.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// A whole page around `body`.
pub(crate) fn layout(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · solidflow" }
                link rel="icon" href="data:,";
                link rel="stylesheet" href="/assets/ui.css";
                script src="/assets/ui.js" defer {}
            }
            body {
                header class="top" {
                    a class="brand" href="/" { "solidflow" }
                    nav { a href="/" { "Runs" } a href="/pipelines" { "Pipelines" } }
                }
                main { (body) }
            }
        }
    }
}

/// `markup` as an HTML response with the security headers.
pub(crate) fn respond(status: StatusCode, markup: Markup) -> Response {
    let mut response = (status, markup).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A page that says one thing, with a link back to the runs list.
pub(crate) fn message_page(status: StatusCode, title: &str, message: &str) -> Response {
    respond(
        status,
        layout(
            title,
            html! {
                section class="message" {
                    h1 { (title) }
                    p class="explain" { (message) }
                    p { a href="/" { "← Back to the runs list" } }
                }
            },
        ),
    )
}

/// The 404 page for unknown paths.
pub(crate) async fn not_found() -> Response {
    message_page(
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no page at this address.",
    )
}

/// JSON that is safe inside `<script type="application/json">`.
pub(crate) fn json_script(id: &str, value: &impl serde::Serialize) -> Markup {
    let text = serde_json::to_string(value)
        .unwrap_or_else(|_| "null".into())
        .replace('<', "\\u003c");
    html! { script type="application/json" id=(id) { (PreEscaped(text)) } }
}

/// `2026-12-01 21:40:12`.
pub(crate) fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// `850 ms`, `12.3 s`, `4 m 05 s`, `2 h 03 m`.
pub(crate) fn duration(ms: i64) -> String {
    let ms = ms.max(0);
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{} m {:02} s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{} h {:02} m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// The status badge.
pub(crate) fn status_badge(status: RunStatus) -> Markup {
    let s = status.to_string();
    html! { span class={"badge " (s.to_ascii_lowercase())} { (s) } }
}

/// A run id as a link; a UUID is shortened to its first 8 characters.
pub(crate) fn run_link(run_id: &str) -> Markup {
    let short: String = if uuid::Uuid::parse_str(run_id).is_ok() {
        run_id.chars().take(8).collect()
    } else {
        run_id.to_string()
    };
    html! { a class="run-id" href={"/runs/" (run_id)} title=(run_id) { code { (short) } } }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_tags_in_strings_are_escaped() {
        let page = layout("t", html! { p { ("<script>alert(1)</script>") } }).into_string();
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        let json = json_script("x", &"</script><script>").into_string();
        assert!(!json.contains("</script><script>"));
        assert_eq!(duration(1500), "1.5 s");
        assert_eq!(duration(65_000), "1 m 05 s");
    }
}
