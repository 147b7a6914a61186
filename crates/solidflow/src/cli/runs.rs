//! `runs` (filtered listing with lineage and tags) and the argument parsers shared by
//! `execute`, `reexecute` and `runs` (`--tag k=v`, `--since`).

use chrono::{DateTime, NaiveDate, Utc};

use crate::storage::run_history::{RunFilter, RunHistory, RunRecord, RunStatus};

/// Parses `--tag KEY=VALUE`.
pub(super) fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE (e.g. --tag team=ml)")),
    }
}

/// Parses `--status` in any case.
pub(super) fn parse_status(s: &str) -> Result<RunStatus, String> {
    RunStatus::parse(s).ok_or_else(|| {
        let all: Vec<&str> = RunStatus::ALL.iter().map(|s| s.as_str()).collect();
        format!("unknown status `{s}`; one of {}", all.join(", "))
    })
}

/// Parses `--since`: an RFC 3339 time, a date (`2026-12-01`), or an age (`30m`, `2h`, `7d`).
pub(super) fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => 0,
    };
    match num.parse::<i64>() {
        Ok(n) if seconds > 0 && n >= 0 => Ok(Utc::now() - chrono::Duration::seconds(n * seconds)),
        _ => Err(format!(
            "`{s}` is not a time: use RFC 3339 (2026-12-01T10:00:00Z), a date (2026-12-01) or an age (30m, 2h, 7d)"
        )),
    }
}

/// One line of `runs`: id, pipeline, status, start, end, lineage, tags.
pub(super) fn run_line(run: &RunRecord) -> String {
    let ended = run
        .ended_at
        .map(|t| t.to_rfc3339())
        .unwrap_or_else(|| "-".into());
    let mut line = format!(
        "{}\t{}\t{}\t{}\t{}",
        run.run_id,
        run.pipeline,
        run.status,
        run.started_at.to_rfc3339(),
        ended
    );
    if let Some(parent) = &run.parent_run_id {
        line.push_str(&format!("\tparent={parent}"));
        if let Some(root) = run.root_run_id.as_ref().filter(|r| *r != parent) {
            line.push_str(&format!(" root={root}"));
        }
    }
    if !run.tags.is_empty() {
        let tags: Vec<String> = run.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        line.push_str(&format!("\ttags: {}", tags.join(" ")));
    }
    line
}

/// The runs that `filter` selects.
pub(super) fn list(history: &RunHistory, filter: &RunFilter) -> Result<Vec<RunRecord>, String> {
    history.list(filter).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_statuses_and_times_parse_or_say_what_is_expected() {
        assert_eq!(parse_tag("team=ml").unwrap(), ("team".into(), "ml".into()));
        assert_eq!(parse_tag("k=a=b").unwrap(), ("k".into(), "a=b".into()));
        assert!(parse_tag("teamml").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_tag("=x").is_err());
        assert_eq!(parse_status("failure").unwrap(), RunStatus::Failure);
        assert!(
            parse_status("done")
                .unwrap_err()
                .contains("STARTED, SUCCESS")
        );
        assert_eq!(
            parse_since("2026-12-01").unwrap().to_rfc3339(),
            "2026-12-01T00:00:00+00:00"
        );
        assert!(parse_since("2h").unwrap() < Utc::now() - chrono::Duration::minutes(119));
        assert!(parse_since("yesterday").unwrap_err().contains("RFC 3339"));
    }
}
