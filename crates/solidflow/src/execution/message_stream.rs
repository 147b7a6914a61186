//! A step process's stream of step protocol messages (its stdout), written in batches.
//!
//! Every write wakes the reader on the other end (the parent's reader thread, the Dask
//! task's reader), which hands each line on to the run loop and run history; a short
//! step that wrote each of its events at once paid that chain of wake-ups five or six
//! times. So the events are kept and written together:
//!
//! - right before user code (a solid's compute) starts, and every event at once while
//!   it runs ([`EventListener::user_code`]): a step that crashes in user code loses
//!   none of its events, and what a solid logs is live;
//! - with the final `result` line (a short step: two writes in all);
//! - when [`FLUSH_AFTER`] passed since the first one kept (a background thread, so a
//!   long read of inputs or write of outputs still shows its `STEP_START` at once), or
//!   when [`FLUSH_BYTES`] are kept.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::event::Event;
use super::protocol::StepMessage;
use super::sink::EventListener;

/// At most this long between an event and its write.
pub(crate) const FLUSH_AFTER: Duration = Duration::from_millis(20);

/// Kept messages are written once they hold this many bytes.
const FLUSH_BYTES: usize = 32 * 1024;

/// The message stream of one step process. See the module docs.
pub(crate) struct MessageStream {
    shared: Arc<Shared>,
    /// The background flush, once started; joined by [`MessageStream::finish`].
    flusher: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the background flush when the stream is finished.
    finished: Condvar,
}

struct State {
    out: Box<dyn Write + Send>,
    kept: Vec<u8>,
    /// When the oldest kept message was kept.
    since: Option<Instant>,
    /// User code runs: write every message at once.
    live: bool,
    /// The background flush has been started.
    flushing: bool,
    /// The `result` is out: nothing more comes.
    closed: bool,
}

impl MessageStream {
    /// A stream writing to `out`.
    pub(crate) fn new(out: Box<dyn Write + Send>) -> Self {
        let state = State {
            out,
            kept: Vec::new(),
            since: None,
            live: false,
            flushing: false,
            closed: false,
        };
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                finished: Condvar::new(),
            }),
            flusher: Mutex::new(None),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state()
    }

    /// Sends one message: kept for a batch, or written now while user code runs.
    pub(crate) fn send(&self, msg: &StepMessage) {
        let mut state = self.state();
        if serde_json::to_writer(&mut state.kept, msg).is_err() {
            return;
        }
        state.kept.push(b'\n');
        if state.live || state.kept.len() >= FLUSH_BYTES {
            state.write();
            return;
        }
        if state.since.is_none() {
            state.since = Some(Instant::now());
        }
        if !state.flushing {
            state.flushing = true;
            drop(state);
            self.start_flusher();
        }
    }

    /// Sends the final `result` line together with everything kept; nothing comes
    /// after. Returns once the background flush has ended, so the process is back to
    /// the threads it had (a warm step server that runs steps itself checks that).
    pub(crate) fn finish(&self, msg: &StepMessage) {
        {
            let mut state = self.state();
            if serde_json::to_writer(&mut state.kept, msg).is_ok() {
                state.kept.push(b'\n');
            }
            state.write();
            state.closed = true;
        }
        self.shared.finished.notify_all();
        let flusher = self
            .flusher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(thread) = flusher {
            let _ = thread.join();
        }
    }

    /// Writes what was kept for longer than [`FLUSH_AFTER`], until the stream is
    /// finished. A thread that cannot start leaves the batches to the other triggers.
    fn start_flusher(&self) {
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name("solidflow-messages".into())
            .spawn(move || {
                let mut state = shared.state();
                while !state.closed {
                    let wait = match state.since {
                        Some(t) if t.elapsed() >= FLUSH_AFTER => {
                            state.write();
                            FLUSH_AFTER
                        }
                        Some(t) => FLUSH_AFTER.saturating_sub(t.elapsed()),
                        None => FLUSH_AFTER,
                    };
                    state = shared
                        .finished
                        .wait_timeout(state, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            });
        *self.flusher.lock().unwrap_or_else(|p| p.into_inner()) = thread.ok();
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    /// Writes everything kept, in one write.
    fn write(&mut self) {
        if !self.kept.is_empty() {
            let _ = self.out.write_all(&self.kept);
            let _ = self.out.flush();
            self.kept.clear();
        }
        self.since = None;
    }
}

impl EventListener for MessageStream {
    fn on_event(&self, event: &Event) {
        self.send(&StepMessage::Event {
            event: Box::new(event.clone()),
        });
    }

    fn user_code(&self, running: bool) {
        let mut state = self.state();
        if running {
            state.write();
        }
        state.live = running;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that records each write separately.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<String>>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(buf).into_owned());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn result() -> StepMessage {
        StepMessage::result(crate::execution::scheduler::StepOutcome::Succeeded)
    }

    fn event(message: &str) -> StepMessage {
        let event = Event {
            run_id: "r".into(),
            pipeline: "p".into(),
            step_key: Some("a.compute".into()),
            timestamp: chrono::Utc::now(),
            level: crate::execution::event::Level::Info,
            message: message.into(),
            host: "h".into(),
            pid: 1,
            worker: None,
            kind: crate::execution::event::EventKind::LogMessage,
        };
        StepMessage::Event {
            event: Box::new(event),
        }
    }

    #[test]
    fn a_short_step_is_one_write_before_user_code_and_one_with_the_result() {
        let writes = Writes::default();
        let stream = MessageStream::new(Box::new(writes.clone()));
        stream.send(&event("start"));
        stream.send(&event("input"));
        assert!(writes.0.lock().unwrap().is_empty());
        stream.user_code(true);
        stream.send(&event("logged by the solid"));
        stream.user_code(false);
        stream.send(&event("output"));
        stream.send(&event("success"));
        stream.finish(&result());
        let writes = writes.0.lock().unwrap();
        assert_eq!(writes.len(), 3, "{writes:?}");
        assert_eq!(writes[0].lines().count(), 2);
        assert!(writes[1].contains("logged by the solid"));
        assert_eq!(writes[2].lines().count(), 3);
        assert!(writes[2].lines().last().unwrap().contains("\"result\""));
    }

    #[test]
    fn kept_messages_go_out_after_a_while_without_more() {
        let writes = Writes::default();
        let stream = MessageStream::new(Box::new(writes.clone()));
        stream.send(&event("start"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while writes.0.lock().unwrap().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(writes.0.lock().unwrap().len(), 1);
        stream.finish(&result());
        assert_eq!(writes.0.lock().unwrap().len(), 2);
    }
}
