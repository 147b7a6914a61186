//! The event sink: stamps events with run, host and pid, and fans them out to listeners
//! (console, run history, the result collector, live subscribers, a child's stdout).

use std::sync::{Arc, Mutex};

use chrono::Utc;

use super::event::{Event, EventKind, Level};

/// Receives every event of a run. Implementations must be cheap or hand off to a thread.
pub trait EventListener: Send + Sync {
    /// Called once per event, in order, from the thread that emitted it.
    fn on_event(&self, event: &Event);

    /// User code (a solid's compute) starts (`true`) or has returned (`false`) on the
    /// emitting thread. A listener that batches events (a step process's message
    /// stream) writes what it holds before user code runs, and every event at once
    /// while it runs, so a step that crashes loses none of them. Default: nothing.
    fn user_code(&self, _running: bool) {}
}

impl<F: Fn(&Event) + Send + Sync> EventListener for F {
    fn on_event(&self, event: &Event) {
        self(event)
    }
}

/// Emits events for one run to a set of listeners. Cloning is cheap.
#[derive(Clone)]
pub struct EventSink {
    run_id: Arc<str>,
    pipeline: Arc<str>,
    host: Arc<str>,
    pid: u32,
    listeners: Arc<Vec<Arc<dyn EventListener>>>,
    // Serializes fan-out so every listener sees events in one order.
    order: Arc<Mutex<()>>,
}

impl EventSink {
    /// A sink for `run_id` of `pipeline` that forwards to `listeners`.
    pub fn new(run_id: &str, pipeline: &str, listeners: Vec<Arc<dyn EventListener>>) -> Self {
        Self {
            run_id: run_id.into(),
            pipeline: pipeline.into(),
            host: hostname().into(),
            pid: std::process::id(),
            listeners: Arc::new(listeners),
            order: Arc::new(Mutex::new(())),
        }
    }

    /// The run id.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Builds and emits an event.
    pub fn emit(
        &self,
        step_key: Option<&str>,
        level: Level,
        message: impl Into<String>,
        kind: EventKind,
    ) {
        self.emit_from(None, step_key, level, message, kind);
    }

    /// Builds and emits an event about a step attempt that runs elsewhere (a remote
    /// worker): stamped with that worker, its host and the step process, like the
    /// events the step process sends itself. Without an origin, like [`Self::emit`].
    pub fn emit_from(
        &self,
        origin: Option<&Origin>,
        step_key: Option<&str>,
        level: Level,
        message: impl Into<String>,
        kind: EventKind,
    ) {
        self.forward(Event {
            run_id: self.run_id.to_string(),
            pipeline: self.pipeline.to_string(),
            step_key: step_key.map(str::to_string),
            timestamp: Utc::now(),
            level,
            message: message.into(),
            host: origin.map_or_else(|| self.host.to_string(), |o| o.host.clone()),
            pid: origin.map_or(self.pid, |o| o.pid),
            worker: origin.map(|o| o.worker.clone()),
            kind,
        });
    }

    /// Runs `f`, user code, telling the listeners before and after (see
    /// [`EventListener::user_code`]).
    pub(crate) fn user_code<T>(&self, f: impl FnOnce() -> T) -> T {
        self.tell_user_code(true);
        let out = f();
        self.tell_user_code(false);
        out
    }

    fn tell_user_code(&self, running: bool) {
        let _guard = self.order.lock().unwrap_or_else(|p| p.into_inner());
        for l in self.listeners.iter() {
            l.user_code(running);
        }
    }

    /// Passes on an event built elsewhere (e.g. read from a step process).
    pub fn forward(&self, event: Event) {
        let _guard = self.order.lock().unwrap_or_else(|p| p.into_inner());
        for l in self.listeners.iter() {
            l.on_event(&event);
        }
    }
}

/// Where a step attempt ran when that is not this process's machine: what events
/// about it are stamped with (see [`EventSink::emit_from`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The worker's address (`tcp://10.0.0.5:41545`).
    pub worker: String,
    /// The worker's host.
    pub host: String,
    /// The step process's pid there.
    pub pid: u32,
}

/// This machine's host name, for event records; read once per process (a step forked
/// by a warm step server inherits it).
pub fn hostname() -> String {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "localhost".into())
    })
    .clone()
}

/// Collects events in memory (for [`ExecutionResult`](super::run::ExecutionResult)).
#[derive(Default, Clone)]
pub struct EventCollector {
    events: Arc<Mutex<Vec<Event>>>,
}

impl EventCollector {
    /// Everything collected so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("collector lock").clone()
    }

    /// Everything collected so far, moved out: the collector is empty afterwards. At the
    /// end of a run this hands the events over without a second copy of all of them.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().expect("collector lock"))
    }
}

impl EventListener for EventCollector {
    fn on_event(&self, event: &Event) {
        self.events
            .lock()
            .expect("collector lock")
            .push(event.clone());
    }
}
