//! The storage's own tokio runtime: the [`IntermediateStorage`] trait is synchronous,
//! `object_store` is async, so every request is driven here.
//!
//! [`IntermediateStorage`]: crate::storage::IntermediateStorage

use std::future::Future;
use std::io;

use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

/// The storage's own tokio runtime, shared with its readers.
///
/// Dropped with `shutdown_background`, so dropping the last handle inside some other async
/// context does not panic.
pub(super) struct Engine {
    runtime: Option<Runtime>,
}

impl Engine {
    pub(super) fn new() -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("solidflow-s3")
            .enable_all()
            .build()?;
        Ok(Self {
            runtime: Some(runtime),
        })
    }

    fn runtime(&self) -> &Runtime {
        self.runtime.as_ref().expect("runtime lives until drop")
    }

    pub(super) fn spawn<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime().spawn(future)
    }

    /// Runs `future` to completion on this runtime and returns its output.
    pub(super) fn run<F>(&self, future: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        if tokio::runtime::Handle::try_current().is_err() {
            // A plain thread: drive the future here.
            return self.runtime().block_on(future);
        }
        // Inside some runtime (an executor's worker or a spawn_blocking thread): block_on would
        // panic there, so the future runs on our workers and we wait for it on a channel.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv()
            .expect("the S3 runtime dropped a task before it finished")
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
