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
//!
//! The background thread is one per process, started with the first stream that keeps
//! a message and kept for the next ones: a warm step server that runs steps itself
//! (`isolation: in_server`) would otherwise start and join a thread per step. It blocks
//! every signal, so signals still reach the thread that runs the step, and
//! [`background_threads`] tells the server it is not a thread a step left behind.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
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
}

struct Shared {
    state: Mutex<State>,
}

struct State {
    out: Box<dyn Write + Send>,
    kept: Vec<u8>,
    /// When the oldest kept message was kept.
    since: Option<Instant>,
    /// User code runs: write every message at once.
    live: bool,
    /// The background flush looks after this stream.
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
            }),
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
            Flusher::watch(&self.shared);
        }
    }

    /// Sends the final `result` line together with everything kept; nothing comes
    /// after. The stream's writer is dropped here (its descriptor closed), and the
    /// background flush lets go of the stream.
    pub(crate) fn finish(&self, msg: &StepMessage) {
        let out = {
            let mut state = self.state();
            if serde_json::to_writer(&mut state.kept, msg).is_ok() {
                state.kept.push(b'\n');
            }
            state.write();
            state.closed = true;
            std::mem::replace(&mut state.out, Box::new(std::io::sink()))
        };
        drop(out);
        Flusher::release(&self.shared);
    }
}

/// How many background threads of this module this process has (0 or 1): threads a
/// step did not leave behind.
pub(crate) fn background_threads() -> usize {
    usize::from(flusher().is_some_and(|f| f.pid == std::process::id()))
}

/// The process's background flush: one thread writing what the open streams (one,
/// in a step process) kept for longer than [`FLUSH_AFTER`].
struct Flusher {
    /// The process that started the thread (a forked child has no such thread).
    pid: u32,
    /// The streams it looks after (a stream dropped without finishing is let go), and
    /// a count of changes to them.
    streams: Mutex<(Vec<Weak<Shared>>, u64)>,
    /// Wakes the thread when `streams` changes.
    changed: Condvar,
}

static FLUSHER: Mutex<Option<Arc<Flusher>>> = Mutex::new(None);

fn flusher() -> Option<Arc<Flusher>> {
    FLUSHER.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

impl Flusher {
    /// Has the background flush look after `shared`, starting its thread if this
    /// process has none. A thread that cannot start leaves the batches to the other
    /// triggers.
    fn watch(shared: &Arc<Shared>) {
        let flusher = {
            let mut slot = FLUSHER.lock().unwrap_or_else(|p| p.into_inner());
            match slot.as_ref() {
                Some(f) if f.pid == std::process::id() => f.clone(),
                _ => {
                    let f = Arc::new(Flusher {
                        pid: std::process::id(),
                        streams: Mutex::new((Vec::new(), 0)),
                        changed: Condvar::new(),
                    });
                    let thread = f.clone();
                    let started = std::thread::Builder::new()
                        .name("solidflow-messages".into())
                        .spawn(move || thread.run());
                    if started.is_err() {
                        return;
                    }
                    *slot = Some(f.clone());
                    f
                }
            }
        };
        let mut streams = flusher.lock();
        streams.0.push(Arc::downgrade(shared));
        streams.1 += 1;
        drop(streams);
        flusher.changed.notify_all();
    }

    /// Lets go of `shared` (finished).
    fn release(shared: &Arc<Shared>) {
        let Some(flusher) = flusher() else { return };
        let mut streams = flusher.lock();
        let before = streams.0.len();
        let shared = Arc::downgrade(shared);
        streams
            .0
            .retain(|s| !s.ptr_eq(&shared) && s.strong_count() > 0);
        if streams.0.len() != before {
            streams.1 += 1;
            drop(streams);
            flusher.changed.notify_all();
        }
    }

    fn lock(&self) -> MutexGuard<'_, (Vec<Weak<Shared>>, u64)> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The thread: writes each stream's kept messages once they are due; sleeps until
    /// the next is due, or until a stream comes or goes.
    fn run(&self) {
        block_signals();
        loop {
            let (streams, seen) = {
                let mut guard = self.lock();
                while guard.0.is_empty() {
                    guard = self.changed.wait(guard).unwrap_or_else(|p| p.into_inner());
                }
                guard.0.retain(|s| s.strong_count() > 0);
                let streams: Vec<Arc<Shared>> = guard.0.iter().filter_map(Weak::upgrade).collect();
                (streams, guard.1)
            };
            let mut wait = FLUSH_AFTER;
            for stream in &streams {
                let mut state = stream.state();
                let due = match state.since {
                    _ if state.closed => FLUSH_AFTER,
                    Some(t) if t.elapsed() >= FLUSH_AFTER => {
                        state.write();
                        FLUSH_AFTER
                    }
                    Some(t) => FLUSH_AFTER.saturating_sub(t.elapsed()),
                    None => FLUSH_AFTER,
                };
                wait = wait.min(due);
            }
            drop(streams);
            let guard = self.lock();
            if guard.1 == seen {
                let _ = self.changed.wait_timeout(guard, wait);
            }
        }
    }
}

/// Blocks every signal in the calling thread, so they go to the process's other threads.
fn block_signals() {
    // SAFETY: sigfillset initializes the set; pthread_sigmask changes only this
    // thread's mask.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
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

    /// A writer that says when it is dropped.
    struct Dropped(Arc<std::sync::atomic::AtomicBool>);

    impl Write for Dropped {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn wait_for_writes(writes: &Writes, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while writes.0.lock().unwrap().len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn one_background_thread_serves_streams_at_once_and_one_after_another() {
        let (a, b) = (Writes::default(), Writes::default());
        let (first, second) = (
            MessageStream::new(Box::new(a.clone())),
            MessageStream::new(Box::new(b.clone())),
        );
        first.send(&event("a"));
        second.send(&event("b"));
        wait_for_writes(&a, 1);
        wait_for_writes(&b, 1);
        assert_eq!(
            (a.0.lock().unwrap().len(), b.0.lock().unwrap().len()),
            (1, 1)
        );
        assert_eq!(background_threads(), 1);
        first.finish(&result());
        second.finish(&result());
        // Kept for the next stream, as in a step server that runs steps itself.
        assert_eq!(background_threads(), 1);
        let c = Writes::default();
        let third = MessageStream::new(Box::new(c.clone()));
        third.send(&event("c"));
        wait_for_writes(&c, 1);
        assert_eq!(c.0.lock().unwrap().len(), 1);
        third.finish(&result());
        assert_eq!(background_threads(), 1);
    }

    #[test]
    fn finishing_drops_the_writer_at_once() {
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stream = MessageStream::new(Box::new(Dropped(dropped.clone())));
        stream.send(&event("kept"));
        stream.finish(&result());
        // The step's stdout closes when it finishes, not when the flush lets go.
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
    }
}
