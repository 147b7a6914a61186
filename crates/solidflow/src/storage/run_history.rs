//! Run history: runs and their events in SQLite (`$SOLIDFLOW_HOME/history.db`).
//!
//! Only the parent process writes it. Events are written by a background thread in
//! batched transactions, so a busy run does not wait on the disk for every event.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use chrono::{DateTime, Utc};
use crossbeam_channel::{Receiver, Sender, unbounded};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::execution::event::{Event, EventKind};
use crate::execution::sink::EventListener;

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunStatus {
    /// Running (or the process died without saying otherwise).
    Started,
    /// Every step succeeded.
    Success,
    /// A step or the engine failed.
    Failure,
    /// Interrupted.
    Canceled,
}

impl RunStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Started => "STARTED",
            Self::Success => "SUCCESS",
            Self::Failure => "FAILURE",
            Self::Canceled => "CANCELED",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "SUCCESS" => Self::Success,
            "FAILURE" => Self::Failure,
            "CANCELED" => Self::Canceled,
            _ => Self::Started,
        }
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One run as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// The run id.
    pub run_id: String,
    /// The pipeline.
    pub pipeline: String,
    /// The mode.
    pub mode: String,
    /// The status.
    pub status: RunStatus,
    /// The validated run config.
    pub config: serde_json::Value,
    /// The run this one re-executes, if any.
    pub parent_run_id: Option<String>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub ended_at: Option<DateTime<Utc>>,
}

/// Run history could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("run history {path}: {source}")]
pub struct HistoryError {
    path: String,
    #[source]
    source: rusqlite::Error,
}

enum Message {
    Event(Box<Event>),
    Flush(Sender<()>),
}

/// Handle to the run history database.
#[derive(Clone)]
pub struct RunHistory {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
    writer: Sender<Message>,
    _thread: Arc<WriterThread>,
}

struct WriterThread(Option<JoinHandle<()>>, Sender<Message>);

impl Drop for WriterThread {
    fn drop(&mut self) {
        let (tx, rx) = unbounded();
        if self.1.send(Message::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
        drop(self.0.take());
    }
}

impl RunHistory {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, HistoryError> {
        let err = |source| HistoryError {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = open_conn(path).map_err(err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS runs (
                run_id TEXT PRIMARY KEY, pipeline TEXT NOT NULL, mode TEXT NOT NULL,
                status TEXT NOT NULL, config TEXT NOT NULL, parent_run_id TEXT,
                started_at TEXT NOT NULL, ended_at TEXT);
             CREATE TABLE IF NOT EXISTS events (
                id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, step_key TEXT,
                event_type TEXT NOT NULL, timestamp TEXT NOT NULL, body TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS events_by_run ON events (run_id, id);",
        )
        .map_err(err)?;
        let writer_conn = open_conn(path).map_err(err)?;
        let (tx, rx) = unbounded();
        let thread = std::thread::Builder::new()
            .name("solidflow-history".into())
            .spawn(move || write_loop(writer_conn, rx))
            .expect("spawn history writer");
        Ok(Self {
            path: path.to_path_buf(),
            conn: Arc::new(Mutex::new(conn)),
            writer: tx.clone(),
            _thread: Arc::new(WriterThread(Some(thread), tx)),
        })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> HistoryError + '_ {
        |source| HistoryError {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Records a new run as `STARTED`.
    pub fn create_run(&self, record: &RunRecord) -> Result<(), HistoryError> {
        self.conn
            .lock()
            .expect("history lock")
            .execute(
                "INSERT INTO runs (run_id, pipeline, mode, status, config, parent_run_id, started_at, ended_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    record.run_id,
                    record.pipeline,
                    record.mode,
                    record.status.as_str(),
                    record.config.to_string(),
                    record.parent_run_id,
                    record.started_at.to_rfc3339(),
                    record.ended_at.map(|t| t.to_rfc3339()),
                ],
            )
            .map(drop)
            .map_err(self.err())
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
        let conn = self.conn.lock().expect("history lock");
        let mut stmt = conn
            .prepare("SELECT run_id, pipeline, mode, status, config, parent_run_id, started_at, ended_at FROM runs ORDER BY started_at DESC LIMIT ?1")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([limit as i64], row_to_record)
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// One run by id (a unique prefix is enough).
    pub fn run(&self, run_id: &str) -> Result<Option<RunRecord>, HistoryError> {
        let conn = self.conn.lock().expect("history lock");
        conn.query_row(
            "SELECT run_id, pipeline, mode, status, config, parent_run_id, started_at, ended_at FROM runs WHERE run_id LIKE ?1 || '%' ORDER BY started_at DESC LIMIT 1",
            [run_id],
            row_to_record,
        )
        .optional()
        .map_err(self.err())
    }

    /// The runs whose id starts with `prefix` (taken literally), newest first, at most
    /// `limit`. A run whose id is exactly `prefix` comes first, whatever its age, so a
    /// whole id is never ambiguous.
    pub fn runs_with_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<RunRecord>, HistoryError> {
        let conn = self.conn.lock().expect("history lock");
        let mut stmt = conn
            .prepare("SELECT run_id, pipeline, mode, status, config, parent_run_id, started_at, ended_at FROM runs WHERE substr(run_id, 1, length(?1)) = ?1 ORDER BY run_id = ?1 DESC, started_at DESC LIMIT ?2")
            .map_err(self.err())?;
        let rows = stmt
            .query_map(rusqlite::params![prefix, limit as i64], row_to_record)
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// Events of a run with ids greater than `after`, oldest first, with their ids.
    pub fn events(&self, run_id: &str, after: i64) -> Result<Vec<(i64, Event)>, HistoryError> {
        let conn = self.conn.lock().expect("history lock");
        let mut stmt = conn
            .prepare("SELECT id, body FROM events WHERE run_id = ?1 AND id > ?2 ORDER BY id")
            .map_err(self.err())?;
        let rows = stmt
            .query_map(params![run_id, after], |r| {
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
}

impl EventListener for RunHistory {
    fn on_event(&self, event: &Event) {
        let _ = self.writer.send(Message::Event(Box::new(event.clone())));
    }
}

fn open_conn(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
    let time = |s: String| {
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .ok()
    };
    Ok(RunRecord {
        run_id: r.get(0)?,
        pipeline: r.get(1)?,
        mode: r.get(2)?,
        status: RunStatus::parse(&r.get::<_, String>(3)?),
        config: serde_json::from_str(&r.get::<_, String>(4)?).unwrap_or_default(),
        parent_run_id: r.get(5)?,
        started_at: time(r.get(6)?).unwrap_or_default(),
        ended_at: r.get::<_, Option<String>>(7)?.and_then(time),
    })
}

fn write_loop(mut conn: Connection, rx: Receiver<Message>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
            if batch.len() >= 1000 {
                break;
            }
        }
        let mut flushes = Vec::new();
        let result = (|| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO events (run_id, step_key, event_type, timestamp, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                let mut status = tx.prepare_cached(
                    "UPDATE runs SET status = ?2, ended_at = ?3 WHERE run_id = ?1",
                )?;
                for msg in batch {
                    match msg {
                        Message::Event(e) => {
                            let body = serde_json::to_string(&e).unwrap_or_default();
                            insert.execute(params![
                                e.run_id,
                                e.step_key,
                                e.event_type(),
                                e.timestamp.to_rfc3339(),
                                body
                            ])?;
                            let end = match e.kind {
                                EventKind::PipelineSuccess { .. } => Some(RunStatus::Success),
                                EventKind::PipelineFailure { .. } => Some(RunStatus::Failure),
                                EventKind::PipelineCanceled { .. } => Some(RunStatus::Canceled),
                                _ => None,
                            };
                            if let Some(s) = end {
                                status.execute(params![
                                    e.run_id,
                                    s.as_str(),
                                    e.timestamp.to_rfc3339()
                                ])?;
                            }
                        }
                        Message::Flush(done) => flushes.push(done),
                    }
                }
            }
            tx.commit()
        })();
        if let Err(e) = result {
            tracing::error!("writing run history failed: {e}");
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::execution::event::Level;

    #[test]
    fn records_runs_events_and_final_status() {
        let dir = tempfile::tempdir().unwrap();
        let history = RunHistory::open(&dir.path().join("h.db")).unwrap();
        let record = RunRecord {
            run_id: "run-1".into(),
            pipeline: "p".into(),
            mode: "default".into(),
            status: RunStatus::Started,
            config: serde_json::json!({}),
            parent_run_id: None,
            started_at: Utc::now(),
            ended_at: None,
        };
        history.create_run(&record).unwrap();
        let event = |kind| Event {
            run_id: "run-1".into(),
            pipeline: "p".into(),
            step_key: None,
            timestamp: Utc::now(),
            level: Level::Info,
            message: String::new(),
            host: "h".into(),
            pid: 1,
            worker: None,
            kind,
        };
        history.on_event(&event(EventKind::LogMessage));
        history.on_event(&event(EventKind::PipelineSuccess { duration_ms: 1 }));
        history.flush();
        let run = history.run("run").unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Success);
        assert!(run.ended_at.is_some());
        let events = history.events("run-1", 0).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(history.events("run-1", events[0].0).unwrap().len(), 1);
    }
}
