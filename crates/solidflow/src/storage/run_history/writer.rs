//! The background thread that writes events (and heartbeats) in batched transactions,
//! so a busy run does not wait on the disk for every event.

use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, Utc};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded, unbounded};
use rusqlite::{Connection, params};

use super::record::RunStatus;
use crate::execution::event::{Event, EventKind};

pub(super) enum Message {
    Event(Box<Event>),
    Heartbeat { run_id: String, at: DateTime<Utc> },
    Flush(Sender<()>),
}

/// Owns the writer thread; flushes what is queued when the last handle goes away.
pub(super) struct WriterThread(pub Option<JoinHandle<()>>, pub Sender<Message>);

impl Drop for WriterThread {
    fn drop(&mut self) {
        let (tx, rx) = unbounded();
        if self.1.send(Message::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
        drop(self.0.take());
    }
}

pub(super) fn write_loop(
    mut conn: Connection,
    rx: Receiver<Message>,
    errors: &Mutex<Option<String>>,
) {
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
                // A run already marked dead by a reader keeps that verdict.
                let mut status = tx.prepare_cached(
                    "UPDATE runs SET status = ?2, ended_at = ?3 WHERE run_id = ?1 AND status = 'STARTED'",
                )?;
                let mut heartbeat =
                    tx.prepare_cached("UPDATE runs SET heartbeat_at = ?2 WHERE run_id = ?1")?;
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
                        Message::Heartbeat { run_id, at } => {
                            heartbeat.execute(params![run_id, at.to_rfc3339()])?;
                        }
                        Message::Flush(done) => flushes.push(done),
                    }
                }
            }
            tx.commit()
        })();
        if let Err(e) = result {
            tracing::error!("writing run history failed: {e}");
            errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(|| e.to_string());
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
}

/// Writes a run's heartbeat every `interval` until dropped.
pub struct Heartbeat {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    pub(super) fn start(writer: Sender<Message>, run_id: String, interval: Duration) -> Self {
        let (stop, stopped) = bounded::<()>(0);
        let beat = move || {
            writer
                .send(Message::Heartbeat {
                    run_id: run_id.clone(),
                    at: Utc::now(),
                })
                .is_ok()
        };
        beat();
        let thread = std::thread::Builder::new()
            .name("solidflow-heartbeat".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    if !beat() {
                        return;
                    }
                }
            })
            .ok();
        Self {
            stop: Some(stop),
            thread,
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
