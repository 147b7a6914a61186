//! The page's script and stylesheet, embedded in the binary.

use axum::http::header;
use axum::response::IntoResponse;

/// `/assets/ui.js`.
pub(crate) async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../assets/ui.js"),
    )
}

/// `/assets/ui.css`.
pub(crate) async fn style() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../assets/ui.css"),
    )
}
