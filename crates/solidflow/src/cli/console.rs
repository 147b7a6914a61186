//! The console view of the event stream: a readable, coloured log with a progress line,
//! or one JSON event per line with `--json`.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use owo_colors::{OwoColorize, Stream};

use crate::execution::event::{Event, EventKind, Level};
use crate::execution::sink::EventListener;

/// Prints events to the terminal.
pub struct Console {
    json: bool,
    min_level: Level,
    progress: Option<ProgressBar>,
    /// Where the human log goes: stderr for `execute` (stdout stays free for results),
    /// stdout for `logs` (so `logs RUN | grep` works).
    human: Stream,
    out: Mutex<()>,
}

impl Console {
    /// A console printer. `json` prints one event per line on stdout; otherwise a
    /// human log goes to stderr, with a progress line when stderr is a terminal.
    pub fn new(json: bool, min_level: Level, steps: usize) -> Self {
        let progress = (!json && std::io::stderr().is_terminal() && steps > 1).then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps {msg}",
                )
                .expect("valid template"),
            );
            bar
        });
        Self {
            json,
            min_level,
            progress,
            human: Stream::Stderr,
            out: Mutex::new(()),
        }
    }

    /// A console printer whose human log goes to stdout, without a progress line (`logs`).
    pub fn on_stdout(json: bool, min_level: Level) -> Self {
        Self {
            human: Stream::Stdout,
            ..Self::new(json, min_level, 0)
        }
    }

    /// Removes the progress line (call when the run ends).
    pub fn finish(&self) {
        if let Some(bar) = &self.progress {
            bar.finish_and_clear();
        }
    }

    fn render(&self, e: &Event) -> String {
        let time = e
            .timestamp
            .with_timezone(&chrono::Local)
            .format("%H:%M:%S%.3f")
            .to_string();
        let level = match e.level {
            Level::Debug => format!("{}", "DEBUG".if_supports_color(self.human, |t| t.dimmed())),
            Level::Info => format!("{}", "INFO ".if_supports_color(self.human, |t| t.blue())),
            Level::Warning => format!("{}", "WARN ".if_supports_color(self.human, |t| t.yellow())),
            Level::Error => format!("{}", "ERROR".if_supports_color(self.human, |t| t.red())),
        };
        let kind = e.event_type();
        let kind = match &e.kind {
            EventKind::StepSuccess { .. } | EventKind::PipelineSuccess { .. } => {
                format!("{}", kind.if_supports_color(self.human, |t| t.green()))
            }
            EventKind::StepFailure { .. }
            | EventKind::PipelineFailure { .. }
            | EventKind::PipelineCanceled { .. } => {
                format!("{}", kind.if_supports_color(self.human, |t| t.red()))
            }
            EventKind::StepSkipped { .. } | EventKind::StepUpForRetry { .. } => {
                format!("{}", kind.if_supports_color(self.human, |t| t.yellow()))
            }
            _ => format!("{}", kind.if_supports_color(self.human, |t| t.bold())),
        };
        let step = e
            .step_key
            .as_deref()
            .map(|s| format!(" {}", s.if_supports_color(self.human, |t| t.cyan())))
            .unwrap_or_default();
        let worker = e
            .worker
            .as_deref()
            .map(|w| format!(" [{w}]"))
            .unwrap_or_default();
        let mut line = format!("{time} {level} {kind}{step}{worker} - {}", e.message);
        let error = match &e.kind {
            EventKind::StepFailure { error, .. } | EventKind::StepUpForRetry { error, .. } => {
                Some(error)
            }
            EventKind::PipelineFailure {
                error: Some(error), ..
            } => Some(error),
            _ => None,
        };
        if let Some(error) = error {
            for cause in &error.causes {
                line.push_str(&format!("\n    caused by: {cause}"));
            }
            if let Some(loc) = &error.location {
                line.push_str(&format!("\n    at {loc}"));
            }
        }
        line
    }
}

impl EventListener for Console {
    fn on_event(&self, e: &Event) {
        let _guard = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if self.json {
            let mut out = std::io::stdout().lock();
            let _ = serde_json::to_writer(&mut out, e);
            let _ = out.write_all(b"\n");
            let _ = out.flush();
            return;
        }
        if let Some(bar) = &self.progress
            && matches!(
                e.kind,
                EventKind::StepSuccess { .. }
                    | EventKind::StepFailure { .. }
                    | EventKind::StepSkipped { .. }
            )
        {
            bar.inc(1);
        }
        if e.level < self.min_level {
            return;
        }
        let line = self.render(e);
        match &self.progress {
            Some(bar) => bar.println(line),
            None if matches!(self.human, Stream::Stdout) => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
            }
            None => eprintln!("{line}"),
        }
    }
}
