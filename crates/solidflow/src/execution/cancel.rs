//! Cooperative cancellation shared by the CLI's signal handler and executors.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once when the run should stop (Ctrl-C, SIGTERM, or a caller's decision).
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not canceled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests cancellation.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether cancellation was requested.
    pub fn is_canceled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
