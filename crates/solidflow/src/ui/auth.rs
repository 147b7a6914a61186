//! Who may use the page: the token check (when a token is set) and the loopback Host
//! check that keeps a DNS-rebinding page from reaching a server bound to 127.0.0.1.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::pages::message_page;

const COOKIE: &str = "solidflow_token";

/// Lets a request through when it carries the token (query `token=`, the cookie set by
/// the first visit, or `Authorization: token T`), and, on loopback, names a loopback
/// host.
pub(crate) async fn check(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.loopback && !loopback_host(request.headers()) {
        return message_page(
            StatusCode::FORBIDDEN,
            "Wrong host",
            "This solidflow page listens on 127.0.0.1 only; open it as http://127.0.0.1:PORT/ or http://localhost:PORT/.",
        );
    }
    let Some(token) = state.token.clone() else {
        return next.run(request).await;
    };
    let from_query = request
        .uri()
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|kv| kv.strip_prefix("token="))
        .any(|t| same(t, &token));
    let headers = request.headers();
    let from_cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .any(|t| same(t, &token));
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("token "))
        .is_some_and(|t| same(t, &token));
    if !(from_query || from_cookie || from_header) {
        return message_page(
            StatusCode::FORBIDDEN,
            "Token required",
            "This solidflow page needs its access token: open the URL that `ui` printed when it started (it ends in ?token=...).",
        );
    }
    let mut response = next.run(request).await;
    if from_query && !from_cookie {
        let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict");
        if let Ok(v) = cookie.parse() {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    response.into_response()
}

/// Compares without stopping at the first different byte.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return true;
    };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether a state-changing request comes from this server's own pages: its `Origin`
/// (or, without one, `Sec-Fetch-Site`) must match the `Host` it was sent to.
pub(crate) fn same_origin(headers: &HeaderMap) -> Result<(), &'static str> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .ok_or("the request has no Host header")?;
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .unwrap_or_default();
        return if origin_host.eq_ignore_ascii_case(host) {
            Ok(())
        } else {
            Err("the request came from another site (its Origin is not this page)")
        };
    }
    match headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        Some("same-origin") => Ok(()),
        _ => Err("the request has no Origin header; actions must be sent from this page's buttons"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn same_origin_accepts_the_page_and_refuses_other_sites() {
        assert!(
            same_origin(&headers(&[
                ("host", "127.0.0.1:3000"),
                ("origin", "http://127.0.0.1:3000")
            ]))
            .is_ok()
        );
        assert!(
            same_origin(&headers(&[
                ("host", "127.0.0.1:3000"),
                ("origin", "http://evil.example")
            ]))
            .is_err()
        );
        assert!(same_origin(&headers(&[("host", "127.0.0.1:3000")])).is_err());
        assert!(
            same_origin(&headers(&[
                ("host", "127.0.0.1:3000"),
                ("sec-fetch-site", "same-origin")
            ]))
            .is_ok()
        );
    }

    #[test]
    fn loopback_hosts() {
        assert!(loopback_host(&headers(&[("host", "127.0.0.1:3000")])));
        assert!(loopback_host(&headers(&[("host", "localhost:3000")])));
        assert!(loopback_host(&headers(&[("host", "[::1]:3000")])));
        assert!(!loopback_host(&headers(&[("host", "evil.example:3000")])));
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
