//! Run history: runs, their tags and their events in SQLite (`$SOLIDFLOW_HOME/history.db`).
//!
//! Only the parent process writes events: workers send them back over the executor's
//! channel. Events are written by a background thread in batched transactions
//! (`writer.rs`). The schema is versioned and migrated in place when opened (`schema.rs`).
//!
//! Every read ([`RunHistory::list`], [`RunHistory::run`], [`RunHistory::events`]) first
//! marks `STARTED` runs whose process is gone as `FAILURE`, with an `ENGINE_EVENT`
//! saying what happened and when the run was last seen alive (`liveness.rs`); so no
//! view of history shows a dead run as running.

mod liveness;
mod record;
mod schema;
mod writer;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use crossbeam_channel::{Sender, unbounded};
use rusqlite::{Connection, OptionalExtension, params, params_from_iter};

pub use liveness::{
    DEFAULT_HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_ENV, ProcessStart, heartbeat_timeout_from_env,
};
pub use record::{RunFilter, RunRecord, RunStatus};
pub use schema::SCHEMA_VERSION;
pub use writer::Heartbeat;

use crate::execution::event::{ErrorInfo, Event, EventKind, Level};
use crate::execution::sink::{EventListener, hostname};
use writer::{Message, WriterThread, write_loop};

/// Run history could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// SQLite failed.
    #[error("run history {path}: {source}")]
    Sqlite {
        /// The database file.
        path: String,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// A new run was given the id of a recorded one.
    #[error(
        "run id `{run_id}` is already used by a {status} run of pipeline `{pipeline}` started at {started_at}; pass another --run-id, or none for a fresh one"
    )]
    RunExists {
        /// The id.
        run_id: String,
        /// The recorded run's pipeline.
        pipeline: String,
        /// Its status.
        status: RunStatus,
        /// When it started.
        started_at: DateTime<Utc>,
    },
    /// The database was written by a newer solidflow.
    #[error(
        "run history {path} has schema version {found}, but this build knows versions up to {SCHEMA_VERSION}; use a newer solidflow build (or another SOLIDFLOW_HOME)"
    )]
    TooNew {
        /// The database file.
        path: String,
        /// Its version.
        found: u32,
    },
}

/// Handle to the run history database. Cheap to clone; clones share one writer.
#[derive(Clone)]
pub struct RunHistory {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
    writer: Sender<Message>,
    /// The first error of the background writer: events after it may be missing.
    write_error: Arc<Mutex<Option<String>>>,
    heartbeat_timeout: Duration,
    host: String,
    _thread: Arc<WriterThread>,
}

/// The columns [`row_to_record`] reads, in order.
const RUN_COLUMNS: &str = "run_id, pipeline, mode, status, config, parent_run_id, started_at, ended_at, root_run_id, host, pid, process_start, heartbeat_at";

impl RunHistory {
    /// Opens (creating or upgrading if needed) the database at `path`. The heartbeat
    /// timeout for runs of other hosts comes from [`HEARTBEAT_TIMEOUT_ENV`].
    pub fn open(path: &Path) -> Result<Self, HistoryError> {
        let err = |source| HistoryError::Sqlite {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let mut conn = open_conn(path).map_err(err)?;
        schema::migrate(&mut conn).map_err(|e| match e {
            schema::MigrateError::Sqlite(source) => err(source),
            schema::MigrateError::TooNew(found) => HistoryError::TooNew {
                path: path.display().to_string(),
                found,
            },
        })?;
        let writer_conn = open_conn(path).map_err(err)?;
        let (tx, rx) = unbounded();
        let write_error = Arc::new(Mutex::new(None));
        let errors = write_error.clone();
        let thread = std::thread::Builder::new()
            .name("solidflow-history".into())
            .spawn(move || write_loop(writer_conn, rx, &errors))
            .expect("spawn history writer");
        Ok(Self {
            path: path.to_path_buf(),
            conn: Arc::new(Mutex::new(conn)),
            writer: tx.clone(),
            write_error,
            heartbeat_timeout: heartbeat_timeout_from_env(),
            host: hostname(),
            _thread: Arc::new(WriterThread(Some(thread), tx)),
        })
    }

    /// Sets how long a run of another host may go without a heartbeat before readers
    /// take it as dead (default [`DEFAULT_HEARTBEAT_TIMEOUT`]).
    pub fn with_heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.heartbeat_timeout = timeout;
        self
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> HistoryError + '_ {
        |source| HistoryError::Sqlite {
            path: self.path.display().to_string(),
            source,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new run (with its tags). A run id already in history is refused with
    /// [`HistoryError::RunExists`].
    pub fn create_run(&self, record: &RunRecord) -> Result<(), HistoryError> {
        self.create_run_reusing(record, &BTreeMap::new())
    }

    /// Records a new run that re-executes another and reads the outputs of the steps in
    /// `reused` (step key → run whose intermediates hold them) instead of running them.
    pub fn create_run_reusing(
        &self,
        record: &RunRecord,
        reused: &BTreeMap<String, String>,
    ) -> Result<(), HistoryError> {
        if let Some(existing) = self.run_exact(&record.run_id)? {
            return Err(HistoryError::RunExists {
                run_id: existing.run_id,
                pipeline: existing.pipeline,
                status: existing.status,
                started_at: existing.started_at,
            });
        }
        let mut conn = self.lock();
        let result = (|| {
            let tx = conn.transaction()?;
            tx.execute(
                &format!("INSERT INTO runs ({RUN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"),
                params![
                    record.run_id,
                    record.pipeline,
                    record.mode,
                    record.status.as_str(),
                    record.config.to_string(),
                    record.parent_run_id,
                    record.started_at.to_rfc3339(),
                    record.ended_at.map(|t| t.to_rfc3339()),
                    record.root_run_id,
                    record.host,
                    record.pid,
                    record
                        .process_start
                        .as_ref()
                        .map(|p| serde_json::to_string(p).unwrap_or_default()),
                    record.heartbeat_at.map(|t| t.to_rfc3339()),
                ],
            )?;
            {
                let mut tag =
                    tx.prepare("INSERT INTO run_tags (run_id, key, value) VALUES (?1, ?2, ?3)")?;
                for (k, v) in &record.tags {
                    tag.execute(params![record.run_id, k, v])?;
                }
                let mut reuse = tx.prepare(
                    "INSERT INTO reused_steps (run_id, step_key, source_run_id) VALUES (?1, ?2, ?3)",
                )?;
                for (step, source) in reused {
                    reuse.execute(params![record.run_id, step, source])?;
                }
            }
            tx.commit()
        })();
        result.map_err(self.err())
    }

    /// Writes `run_id`'s heartbeat now and then every few seconds, until the returned
    /// guard is dropped. The process running a run keeps one alive for the run's length.
    pub fn start_heartbeat(&self, run_id: &str) -> Heartbeat {
        Heartbeat::start(
            self.writer.clone(),
            run_id.to_string(),
            liveness::heartbeat_interval(self.heartbeat_timeout),
        )
    }

    /// The first failure to write events (a full disk, a removed file), if any: the
    /// record of the runs written since is incomplete. Check it after [`flush`](Self::flush).
    pub fn write_error(&self) -> Option<String> {
        let error = self.write_error.lock().unwrap_or_else(|e| e.into_inner());
        error
            .as_ref()
            .map(|e| format!("run history {}: {e}", self.path.display()))
    }

    /// Waits until every event handed to the writer is on disk.
    pub fn flush(&self) {
        let (tx, rx) = unbounded();
        if self.writer.send(Message::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// The most recent runs, newest first.
    pub fn runs(&self, limit: usize) -> Result<Vec<RunRecord>, HistoryError> {
        self.list(&RunFilter {
            limit: Some(limit),
            ..RunFilter::default()
        })
    }

    /// The runs that pass `filter`, newest first.
    pub fn list(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, HistoryError> {
        self.mark_dead_runs()?;
        let mut sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE 1 = 1");
        let mut args: Vec<String> = Vec::new();
        let mut arg = |sql: &mut String, clause: &str, value: String| {
            args.push(value);
            sql.push_str(&clause.replace('?', &format!("?{}", args.len())));
        };
        if !filter.statuses.is_empty() {
            let names: Vec<String> = filter
                .statuses
                .iter()
                .map(|s| format!("'{}'", s.as_str()))
                .collect();
            sql.push_str(&format!(" AND status IN ({})", names.join(", ")));
        }
        if let Some(p) = &filter.pipeline {
            arg(&mut sql, " AND pipeline = ?", p.clone());
        }
        if let Some(since) = filter.since {
            arg(&mut sql, " AND started_at >= ?", since.to_rfc3339());
        }
        if let Some(root) = &filter.lineage {
            arg(&mut sql, " AND (run_id = ? OR ", root.clone());
            arg(&mut sql, "root_run_id = ?)", root.clone());
        }
        for (k, v) in &filter.tags {
            arg(
                &mut sql,
                " AND EXISTS (SELECT 1 FROM run_tags t WHERE t.run_id = runs.run_id AND t.key = ?",
                k.clone(),
            );
            arg(&mut sql, " AND t.value = ?)", v.clone());
        }
        sql.push_str(" ORDER BY started_at DESC, rowid DESC");
        if let Some(limit) = filter.limit {
            sql.push_str(&format!(" LIMIT {limit}"));
        }
        let conn = self.lock();
        runs_with_tags(&conn, &sql, params_from_iter(args.iter())).map_err(self.err())
    }

    /// One run by id, or by a prefix of its id (the newest run with that prefix).
    pub fn run(&self, run_id: &str) -> Result<Option<RunRecord>, HistoryError> {
        self.mark_dead_runs()?;
        if let Some(run) = self.run_exact(run_id)? {
            return Ok(Some(run));
        }
        let conn = self.lock();
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE substr(run_id, 1, length(?1)) = ?1 ORDER BY started_at DESC LIMIT 1"
        );
        let runs = runs_with_tags(&conn, &sql, [run_id]).map_err(self.err())?;
        Ok(runs.into_iter().next())
    }

    /// The runs whose id starts with `prefix` (taken literally), newest first, at most
    /// `limit`. A run whose id is exactly `prefix` comes first, whatever its age, so a
    /// whole id is never ambiguous.
    pub fn runs_with_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<RunRecord>, HistoryError> {
        self.mark_dead_runs()?;
        let conn = self.lock();
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE substr(run_id, 1, length(?1)) = ?1 ORDER BY run_id = ?1 DESC, started_at DESC LIMIT ?2"
        );
        runs_with_tags(&conn, &sql, params![prefix, limit as i64]).map_err(self.err())
    }

    /// The run with exactly this id, without checking whether it is still alive.
    pub fn run_exact(&self, run_id: &str) -> Result<Option<RunRecord>, HistoryError> {
        let conn = self.lock();
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?1");
        let runs = runs_with_tags(&conn, &sql, [run_id]).map_err(self.err())?;
        Ok(runs.into_iter().next())
    }

    /// Events of a run with ids greater than `after`, oldest first, with their ids.
    pub fn events(&self, run_id: &str, after: i64) -> Result<Vec<(i64, Event)>, HistoryError> {
        self.mark_dead_runs()?;
        self.events_between(run_id, after, i64::MAX, usize::MAX)
    }

    /// At most `limit` events of a run with ids in `after + 1 ..= up_to`, oldest first,
    /// with their ids, and without the liveness check the other reads do first: for a
    /// reader that polls often (the web page's live stream) and calls
    /// [`mark_dead_runs`](Self::mark_dead_runs) on its own, slower schedule.
    pub fn events_between(
        &self,
        run_id: &str,
        after: i64,
        up_to: i64,
        limit: usize,
    ) -> Result<Vec<(i64, Event)>, HistoryError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, body FROM events WHERE run_id = ?1 AND id > ?2 AND id <= ?3 ORDER BY id LIMIT ?4",
            )
            .map_err(self.err())?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(params![run_id, after, up_to, limit], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(self.err())?;
        let mut out = Vec::new();
        for row in rows {
            let (id, body) = row.map_err(self.err())?;
            if let Ok(event) = serde_json::from_str(&body) {
                out.push((id, event));
            }
        }
        Ok(out)
    }

    /// Where the outputs of every step that has them live, as far as run `run_id` knows:
    /// its own succeeded steps (→ `run_id`) and the steps it reused from its parent
    /// (→ the run that produced them). Re-execution reads outputs from there.
    pub fn step_outputs(&self, run_id: &str) -> Result<BTreeMap<String, String>, HistoryError> {
        let conn = self.lock();
        let query = |sql: &str| -> rusqlite::Result<Vec<(String, String)>> {
            let mut stmt = conn.prepare(sql)?;
            let rows = stmt.query_map([run_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        };
        let mut out: BTreeMap<String, String> =
            query("SELECT step_key, source_run_id FROM reused_steps WHERE run_id = ?1")
                .map_err(self.err())?
                .into_iter()
                .collect();
        for (step, _) in query(
            "SELECT DISTINCT step_key, run_id FROM events WHERE run_id = ?1 AND event_type = 'STEP_SUCCESS' AND step_key IS NOT NULL",
        )
        .map_err(self.err())?
        {
            out.insert(step, run_id.to_string());
        }
        Ok(out)
    }

    /// Marks every `STARTED` run whose process is gone as `FAILURE`, writing an
    /// `ENGINE_EVENT` (what happened, when last seen alive) and a `PIPELINE_FAILURE`.
    /// Returns the ids of the runs it marked. The read methods call it first.
    pub fn mark_dead_runs(&self) -> Result<Vec<String>, HistoryError> {
        let mut conn = self.lock();
        let started: Vec<RunRecord> = {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {RUN_COLUMNS} FROM runs WHERE status = 'STARTED'"
                ))
                .map_err(self.err())?;
            let rows = stmt.query_map([], row_to_record).map_err(self.err())?;
            rows.collect::<Result<_, _>>().map_err(self.err())?
        };
        let mut marked = Vec::new();
        for run in started {
            let last_event = last_event_time(&conn, &run.run_id).map_err(self.err())?;
            let last_seen = [Some(run.started_at), run.heartbeat_at, last_event]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(run.started_at);
            let now = Utc::now();
            let Some(why) =
                liveness::why_dead(&run, last_seen, now, self.heartbeat_timeout, &self.host)
            else {
                continue;
            };
            if mark_dead(&mut conn, &run, &why, last_seen, now, &self.host).map_err(self.err())? {
                marked.push(run.run_id);
            }
        }
        Ok(marked)
    }
}

impl EventListener for RunHistory {
    fn on_event(&self, event: &Event) {
        let _ = self.writer.send(Message::Event(Box::new(event.clone())));
    }
}

/// How long a connection waits for another process's lock on the history.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

fn open_conn(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    set_wal(&conn)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

/// Puts the history in WAL mode (once per file; it persists). Switching a new file
/// needs its exclusive lock, and SQLite answers "database is locked" at once, without
/// waiting for the busy timeout, when another process opens the same new file at that
/// moment (a run starting while `logs --follow` or the web page opens the history): so
/// this waits and tries again, up to the busy timeout.
fn set_wal(conn: &Connection) -> rusqlite::Result<()> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .ok()
}

fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
    let time = |i: usize| -> rusqlite::Result<Option<DateTime<Utc>>> {
        Ok(r.get::<_, Option<String>>(i)?
            .as_deref()
            .and_then(parse_time))
    };
    Ok(RunRecord {
        run_id: r.get(0)?,
        pipeline: r.get(1)?,
        mode: r.get(2)?,
        status: RunStatus::parse(&r.get::<_, String>(3)?).unwrap_or(RunStatus::Started),
        config: serde_json::from_str(&r.get::<_, String>(4)?).unwrap_or_default(),
        parent_run_id: r.get(5)?,
        started_at: time(6)?.unwrap_or_default(),
        ended_at: time(7)?,
        root_run_id: r.get(8)?,
        tags: BTreeMap::new(),
        host: r.get(9)?,
        pid: r.get(10)?,
        process_start: r
            .get::<_, Option<String>>(11)?
            .and_then(|s| serde_json::from_str(&s).ok()),
        heartbeat_at: time(12)?,
    })
}

/// The runs `sql` (selecting [`RUN_COLUMNS`]) returns, each with its tags.
fn runs_with_tags(
    conn: &Connection,
    sql: &str,
    args: impl rusqlite::Params,
) -> rusqlite::Result<Vec<RunRecord>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut runs: Vec<RunRecord> = stmt
        .query_map(args, row_to_record)?
        .collect::<Result<_, _>>()?;
    drop(stmt);
    for run in &mut runs {
        run.tags = tags_of(conn, &run.run_id)?;
    }
    Ok(runs)
}

fn tags_of(conn: &Connection, run_id: &str) -> rusqlite::Result<BTreeMap<String, String>> {
    let mut stmt = conn.prepare_cached("SELECT key, value FROM run_tags WHERE run_id = ?1")?;
    let rows = stmt.query_map([run_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

fn last_event_time(conn: &Connection, run_id: &str) -> rusqlite::Result<Option<DateTime<Utc>>> {
    let ts: Option<String> = conn
        .query_row(
            "SELECT timestamp FROM events WHERE run_id = ?1 ORDER BY id DESC LIMIT 1",
            [run_id],
            |r| r.get(0),
        )
        .optional()?;
    Ok(ts.as_deref().and_then(parse_time))
}

/// Steps of `run_id` that started and never ended (cut off when the process died).
fn unfinished_steps(conn: &Connection, run_id: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT step_key, event_type FROM events WHERE run_id = ?1 AND step_key IS NOT NULL
         AND event_type IN ('STEP_START', 'STEP_SUCCESS', 'STEP_FAILURE', 'STEP_SKIPPED') ORDER BY id",
    )?;
    let rows = stmt.query_map([run_id], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    let mut running = BTreeSet::new();
    for row in rows {
        let (step, kind) = row?;
        if kind == "STEP_START" {
            running.insert(step);
        } else {
            running.remove(&step);
        }
    }
    Ok(running.into_iter().collect())
}

/// Marks one dead run, unless another reader (or the run itself) got there first.
fn mark_dead(
    conn: &mut Connection,
    run: &RunRecord,
    why: &str,
    last_seen: DateTime<Utc>,
    now: DateTime<Utc>,
    host: &str,
) -> rusqlite::Result<bool> {
    let tx = conn.transaction()?;
    let changed = tx.execute(
        "UPDATE runs SET status = 'FAILURE', ended_at = ?2 WHERE run_id = ?1 AND status = 'STARTED'",
        params![run.run_id, now.to_rfc3339()],
    )?;
    if changed == 0 {
        return Ok(false);
    }
    let cut_off = unfinished_steps(&tx, &run.run_id)?;
    let event = |level, message: String, kind| Event {
        run_id: run.run_id.clone(),
        pipeline: run.pipeline.clone(),
        step_key: None,
        timestamp: now,
        level,
        message,
        host: host.to_string(),
        pid: std::process::id(),
        worker: None,
        kind,
    };
    let engine = event(
        Level::Error,
        format!(
            "run process died: {why}; last seen alive at {}; marked FAILURE (resume with `reexecute {} --from-failure`)",
            last_seen.to_rfc3339(),
            run.run_id
        ),
        EventKind::EngineEvent {
            details: serde_json::json!({
                "reason": "run_process_died",
                "detail": why,
                "host": run.host,
                "pid": run.pid,
                "last_seen_at": last_seen.to_rfc3339(),
                "steps_cut_off": cut_off,
            }),
        },
    );
    let failure = event(
        Level::Error,
        format!(
            "run failed: its process died ({} step(s) were cut off)",
            cut_off.len()
        ),
        EventKind::PipelineFailure {
            duration_ms: last_seen
                .signed_duration_since(run.started_at)
                .num_milliseconds()
                .max(0) as u64,
            failed_steps: cut_off,
            error: Some(ErrorInfo {
                message: format!("run process died: {why}"),
                causes: vec![],
                kind: "crash".into(),
                location: None,
            }),
        },
    );
    for e in [engine, failure] {
        tx.execute(
            "INSERT INTO events (run_id, step_key, event_type, timestamp, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                e.run_id,
                e.step_key,
                e.event_type(),
                e.timestamp.to_rfc3339(),
                serde_json::to_string(&e).unwrap_or_default()
            ],
        )?;
    }
    tx.commit()?;
    Ok(true)
}

#[cfg(test)]
mod tests;
