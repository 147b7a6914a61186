//! The streaming reader of a value: ranged `GET`s of `part_size` bytes, `concurrency`
//! of them ahead of the consumer, pinned to the object's ETag.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::Arc;

use object_store::aws::AmazonS3;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore};
use tokio::task::JoinHandle;

use super::engine::Engine;
use super::redact::Redactor;

/// Whether `error` is S3's answer to a range that starts past the end (416 InvalidRange).
pub(super) fn is_invalid_range(error: &object_store::Error) -> bool {
    let text = error.to_string();
    text.contains("InvalidRange") || text.contains("416")
}
/// Streams an object with ranged GETs, `prefetch` ranges ahead of the consumer.
pub(super) struct RangeReader {
    pub(super) store: Arc<AmazonS3>,
    pub(super) engine: Arc<Engine>,
    pub(super) path: ObjectPath,
    pub(super) location: String,
    pub(super) redactor: Arc<Redactor>,
    pub(super) size: u64,
    pub(super) e_tag: Option<String>,
    /// Offset of the next range to request.
    pub(super) next: u64,
    pub(super) chunk: u64,
    pub(super) prefetch: usize,
    /// Requested ranges: expected length and the download.
    pub(super) pending: VecDeque<(usize, JoinHandle<object_store::Result<Chunk>>)>,
    pub(super) current: Chunk,
    pub(super) pos: usize,
}

impl RangeReader {
    pub(super) fn request_ahead(&mut self) {
        while self.pending.len() < self.prefetch && self.next < self.size {
            let end = (self.next + self.chunk).min(self.size);
            let options = GetOptions {
                range: Some(GetRange::Bounded(self.next..end)),
                // Pinned to the version we started reading: a replaced object fails, never mixes.
                if_match: self.e_tag.clone(),
                ..Default::default()
            };
            let (store, path) = (self.store.clone(), self.path.clone());
            let expected = (end - self.next) as usize;
            self.pending.push_back((
                expected,
                self.engine.spawn(async move {
                    let bytes = store.get_opts(&path, options).await?.bytes().await?;
                    Ok(Chunk::new(bytes))
                }),
            ));
            self.next = end;
        }
    }
}

/// One downloaded range, kept in the buffer the HTTP client filled (no copy).
pub(super) struct Chunk(Box<dyn AsRef<[u8]> + Send + Sync>);

impl Chunk {
    pub(super) fn new(bytes: impl AsRef<[u8]> + Send + Sync + 'static) -> Self {
        Self(Box::new(bytes))
    }

    fn empty() -> Self {
        Self::new(Vec::new())
    }

    fn as_slice(&self) -> &[u8] {
        (*self.0).as_ref()
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }
}

impl Read for RangeReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.current.len() {
            // Free the consumed range before asking for more: memory stays within budget.
            self.current = Chunk::empty();
            self.pos = 0;
            self.request_ahead();
            let Some((expected, handle)) = self.pending.pop_front() else {
                return Ok(0);
            };
            let chunk = self
                .engine
                .run(handle)
                .map_err(object_store::Error::from)
                .and_then(|r| r)
                .map_err(|e| {
                    let why = match e {
                        object_store::Error::Precondition { .. } => {
                            "the object was replaced while being read (its ETag changed); read it again".to_owned()
                        }
                        other => self.redactor.scrub(&other.to_string()),
                    };
                    io::Error::other(format!("read {} failed: {why}", self.location))
                })?;
            if chunk.len() != expected {
                // Servers that ignore If-Match (some S3-compatible ones) show a replaced object this way.
                return Err(io::Error::other(format!(
                    "read {} failed: the object changed while being read (expected {expected} bytes in a range, got {}); read it again",
                    self.location,
                    chunk.len()
                )));
            }
            self.current = chunk;
            self.pos = 0;
            // Keep the pipeline full while the consumer works on this chunk.
            self.request_ahead();
        }
        let current = self.current.as_slice();
        let n = out.len().min(current.len() - self.pos);
        out[..n].copy_from_slice(&current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Drop for RangeReader {
    fn drop(&mut self) {
        for (_, handle) in self.pending.drain(..) {
            handle.abort();
        }
    }
}
