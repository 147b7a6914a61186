//! The streaming writer of a value: buffers one part, sends a value that fits with one
//! `PUT` and a larger one as a multipart upload, `concurrency` parts at a time; aborts
//! on failure so nothing half-written becomes visible.

use std::collections::VecDeque;
use std::io::{self, Write};

use object_store::path::Path as ObjectPath;
use object_store::{MultipartUpload, ObjectStore, PutMultipartOptions, PutOptions, PutPayload};
use tokio::task::JoinHandle;

use super::S3Storage;

/// The writer handed to a value's codec: buffers one part, uploads full parts concurrently.
pub(super) struct Upload<'a> {
    storage: &'a S3Storage,
    path: ObjectPath,
    buf: Vec<u8>,
    multipart: Option<Box<dyn MultipartUpload>>,
    in_flight: VecDeque<JoinHandle<object_store::Result<()>>>,
    /// The storage error behind an `io::Error` returned to the codec, reported instead of it.
    pub(super) failure: Option<object_store::Error>,
    written: u64,
}

impl<'a> Upload<'a> {
    pub(super) fn new(storage: &'a S3Storage, path: ObjectPath) -> Self {
        Self {
            storage,
            path,
            buf: Vec::new(),
            multipart: None,
            in_flight: VecDeque::new(),
            failure: None,
            written: 0,
        }
    }

    /// Starts the multipart upload if needed and sends the full buffer as the next part.
    fn send_part(&mut self) -> object_store::Result<()> {
        let engine = &self.storage.engine;
        if self.multipart.is_none() {
            let store = self.storage.store.clone();
            let path = self.path.clone();
            let upload = engine.run(async move {
                store
                    .put_multipart_opts(&path, PutMultipartOptions::default())
                    .await
            })?;
            self.multipart = Some(upload);
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.storage.part_size));
        let part = self
            .multipart
            .as_mut()
            .expect("started above")
            .put_part(PutPayload::from(full));
        self.in_flight.push_back(engine.spawn(part));
        // Back-pressure: at most `concurrency` parts in flight while the codec fills the next one.
        while self.in_flight.len() >= self.storage.concurrency {
            self.wait_oldest()?;
        }
        Ok(())
    }

    fn wait_oldest(&mut self) -> object_store::Result<()> {
        match self.in_flight.pop_front() {
            Some(handle) => self.storage.engine.run(handle)?,
            None => Ok(()),
        }
    }

    pub(super) fn finish(mut self) -> object_store::Result<u64> {
        let engine = self.storage.engine.clone();
        let store = self.storage.store.clone();
        match self.multipart.is_some() {
            false => {
                // Fits in one part: a single PUT, atomic by itself.
                let (path, payload) = (
                    self.path.clone(),
                    PutPayload::from(std::mem::take(&mut self.buf)),
                );
                engine.run(async move {
                    store.put_opts(&path, payload, PutOptions::default()).await
                })?;
            }
            true => {
                if !self.buf.is_empty() {
                    let last = std::mem::take(&mut self.buf);
                    let part = self
                        .multipart
                        .as_mut()
                        .expect("multipart")
                        .put_part(PutPayload::from(last));
                    self.in_flight.push_back(engine.spawn(part));
                }
                while !self.in_flight.is_empty() {
                    if let Err(e) = self.wait_oldest() {
                        self.abort();
                        return Err(e);
                    }
                }
                let mut upload = self.multipart.take().expect("multipart");
                // The object becomes visible only now, whole.
                let result = engine.run(async move {
                    let result = upload.complete().await;
                    if result.is_err() {
                        let _ = upload.abort().await;
                    }
                    result
                });
                result?;
            }
        }
        Ok(self.written)
    }

    /// Cancels the upload: nothing becomes visible, uploaded parts are discarded.
    pub(super) fn abort(&mut self) {
        for handle in self.in_flight.drain(..) {
            handle.abort();
        }
        if let Some(mut upload) = self.multipart.take() {
            let _ = self.storage.engine.run(async move { upload.abort().await });
        }
        self.buf = Vec::new();
    }
}

impl Write for Upload<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(e) = &self.failure {
            return Err(io::Error::other(
                self.storage.redactor.scrub(&e.to_string()),
            ));
        }
        let room = self.storage.part_size - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        self.written += n as u64;
        if self.buf.len() == self.storage.part_size
            && let Err(e) = self.send_part()
        {
            let err = io::Error::other(self.storage.redactor.scrub(&e.to_string()));
            self.failure = Some(e);
            return Err(err);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Upload<'_> {
    fn drop(&mut self) {
        // Reached with an upload still open only if the codec panicked: leave nothing behind.
        if self.multipart.is_some() || !self.in_flight.is_empty() {
            self.abort();
        }
    }
}
