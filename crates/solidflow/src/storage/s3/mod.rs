//! `s3` storage: intermediates as objects in an S3 bucket (AWS or any S3-compatible server).
//!
//! Each value is one object at `<s3_prefix>/<run_id>/intermediates/<step_key>/<output>`.
//! This is the storage for distributed runs: every worker that has credentials sees the
//! same objects, which is why the `dask` executor accepts it (see `docs/storage.md`).
//!
//! How the pieces fit:
//!
//! - The [`IntermediateStorage`] trait is synchronous (user code is a plain `fn`), while
//!   `object_store` is async. The storage owns a small tokio runtime of its own ([`Engine`])
//!   and drives every request on it. A caller that is itself inside some runtime is never
//!   `block_on`ed: the work is spawned on our runtime and awaited over a plain channel.
//! - Writes stream. Bytes from the codec fill a buffer of `part_size`; a value that fits in
//!   one buffer is sent with one `PUT`, a larger one becomes a multipart upload whose parts
//!   are uploaded `concurrency` at a time while the codec keeps encoding. S3 makes an object
//!   visible only when the `PUT` or the multipart `complete` succeeds, so a reader never sees
//!   half a value; a failed write aborts its multipart upload. Memory use is bounded by about
//!   `(concurrency + 1) * part_size`, whatever the size of the value.
//! - Reads stream too: ranged `GET`s of `part_size` bytes, `concurrency` of them in flight
//!   ahead of the reader, all pinned to the object's ETag so a value replaced mid-read fails
//!   loudly instead of mixing two versions.
//! - Transient failures (throttling, 5xx, dropped connections, interrupted bodies) are
//!   retried with exponential backoff by `object_store` ([`RetryConfig`]); an error that
//!   survives the retries names the bucket, the key and the cause.
//! - Credentials come from the standard AWS chain and never leave the credential provider:
//!   `Debug`, [`location`](IntermediateStorage::location) and every error message are free
//!   of them (error text from the server is scrubbed of the key id, secret and token).
//!
//! Files: `config` is the `config:` block and [`S3Config`], `client` builds the S3 clients
//! (credentials, region, endpoint, retries), `engine` is the storage's runtime, `upload`
//! the streaming multipart writer, `reader` the ranged reader, `errors` turns S3 errors
//! into messages with a hint, `redact` keeps credentials out of them, and `profile`
//! reads the shared AWS config files.

mod client;
mod config;
mod engine;
mod errors;
mod profile;
mod reader;
mod redact;
mod upload;

pub use self::config::{S3Config, S3Credentials};

use std::collections::VecDeque;
use std::fmt;
use std::io::Read;
use std::sync::Arc;

use object_store::aws::AmazonS3;
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore};
use serde_json::Value;

use self::config::S3Block;
use self::engine::Engine;
use self::reader::{Chunk, RangeReader, is_invalid_range};
use self::redact::Redactor;
use self::upload::Upload;
use super::{IntermediateKey, IntermediateStorage, Reach, StorageError, WriteFn};
use crate::config::json_schema::config_type_of;
use crate::definition::storage::{StorageContext, StorageDefinition};

/// Intermediates stored as S3 objects: `s3://<bucket>/<prefix>/<run_id>/intermediates/<step_key>/<output>`.
///
/// Build one from run config through the registry, or directly:
///
/// ```no_run
/// use solidflow::storage::{S3Config, S3Storage, IntermediateStorage, IntermediateKey};
///
/// let mut config = S3Config::new("my-bucket");
/// config.endpoint_url = Some("http://127.0.0.1:8014".into());
/// config.allow_http = true;
/// let storage = S3Storage::new(config)?;
/// storage.preflight()?;
/// let key = IntermediateKey::new("run-1", "hello_world.compute", "result");
/// storage.write(&key, &mut |w| w.write_all(b"Hello, World!"))?;
/// # Ok::<(), solidflow::storage::StorageError>(())
/// ```
pub struct S3Storage {
    store: Arc<AmazonS3>,
    /// The same bucket with few retries, so preflight reports an unreachable endpoint quickly.
    preflight_store: Arc<AmazonS3>,
    engine: Arc<Engine>,
    bucket: String,
    /// Prefix without leading or trailing slashes; may be empty.
    prefix: String,
    region: String,
    endpoint: String,
    part_size: usize,
    concurrency: usize,
    redactor: Arc<Redactor>,
}

impl fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Storage")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("part_size", &self.part_size)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl S3Storage {
    /// Connects lazily to the bucket described by `config` (no request is made until
    /// [`preflight`](IntermediateStorage::preflight) or the first read or write).
    pub fn new(config: S3Config) -> Result<Self, StorageError> {
        Self::with_env(config, &|name| std::env::var(name).ok())
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key prefix (no leading or trailing slash; may be empty).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The object key of `key`, without the bucket.
    pub fn object_key(&self, key: &IntermediateKey) -> String {
        if self.prefix.is_empty() {
            key.relative_path()
        } else {
            format!("{}/{}", self.prefix, key.relative_path())
        }
    }

    fn object_path(&self, key: &IntermediateKey) -> ObjectPath {
        let prefix = self.prefix.split('/').filter(|p| !p.is_empty());
        prefix
            .chain([
                key.run_id.as_str(),
                "intermediates",
                key.step_key.as_str(),
                key.output.as_str(),
            ])
            .collect()
    }

    /// The key prefix (ending in `/`) under which a run's intermediates live.
    fn run_prefix(&self, run_id: &str) -> String {
        let run: ObjectPath = self
            .prefix
            .split('/')
            .filter(|p| !p.is_empty())
            .chain([run_id, "intermediates"])
            .collect();
        format!("{}/", run.as_ref())
    }
}

fn build(
    config: &Value,
    _ctx: &StorageContext,
) -> Result<Arc<dyn IntermediateStorage>, StorageError> {
    Ok(Arc::new(S3Storage::new(S3Config::from_run_config(
        config,
    )?)?))
}

/// The `s3` storage definition.
pub(crate) fn definition() -> StorageDefinition {
    StorageDefinition {
        name: "s3",
        description: "Store intermediates as objects in an S3 (or S3-compatible) bucket; works for distributed runs.",
        config: config_type_of::<S3Block>,
        build,
    }
}

impl IntermediateStorage for S3Storage {
    fn kind(&self) -> &'static str {
        "s3"
    }

    fn reach(&self) -> Reach {
        Reach::Cluster
    }

    fn location(&self, key: &IntermediateKey) -> String {
        format!("s3://{}/{}", self.bucket, self.object_key(key))
    }

    fn preflight(&self) -> Result<(), StorageError> {
        // One LIST request answers both questions: a missing bucket is NoSuchBucket, bad
        // credentials are 403. It is also the permission list_run needs.
        let store = self.preflight_store.clone();
        let prefix: ObjectPath = self.prefix.split('/').filter(|p| !p.is_empty()).collect();
        let prefix = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", prefix.as_ref())
        };
        let result = self.engine.run(async move {
            let opts = PaginatedListOptions {
                max_keys: Some(1),
                delimiter: Some("/".into()),
                ..Default::default()
            };
            store.list_paginated(Some(&prefix), opts).await
        });
        let place = format!(
            "s3://{}/{} at {} (region {})",
            self.bucket, self.prefix, self.endpoint, self.region
        );
        result.map(drop).map_err(|e| StorageError::Unusable {
            kind: "s3",
            message: match &e {
                _ if e.to_string().contains("NoSuchBucket") => {
                    format!("bucket {} does not exist at {}: create it, or fix storage.s3.config.s3_bucket", self.bucket, self.endpoint)
                }
                _ => format!("cannot list {place}: {}", self.describe(&e)),
            },
        })
    }

    fn write(&self, key: &IntermediateKey, write: WriteFn<'_>) -> Result<u64, StorageError> {
        let mut upload = Upload::new(self, self.object_path(key));
        match write(&mut upload) {
            Ok(()) => upload.finish().map_err(|e| self.error("write", key, e)),
            Err(source) => {
                let cause = upload.failure.take();
                upload.abort();
                Err(match cause {
                    Some(e) => self.error("write", key, e),
                    None => StorageError::Io {
                        operation: "write",
                        location: self.location(key),
                        source,
                    },
                })
            }
        }
    }

    fn read(&self, key: &IntermediateKey) -> Result<Box<dyn Read + Send>, StorageError> {
        let path = self.object_path(key);
        let (store, first_path, chunk) = (self.store.clone(), path.clone(), self.part_size as u64);
        // The first range GET also tells the object's size and ETag, so a value that fits in
        // one range (most do) is read with a single request, which S3 serves atomically.
        let first = self
            .engine
            .run(async move {
                let ranged = GetOptions {
                    range: Some(GetRange::Bounded(0..chunk)),
                    ..Default::default()
                };
                let result = match store.get_opts(&first_path, ranged).await {
                    // An empty object has no byte 0 to start a range at (416): fetch it whole.
                    Err(e) if is_invalid_range(&e) => {
                        store.get_opts(&first_path, GetOptions::default()).await?
                    }
                    other => other?,
                };
                let (meta, range) = (result.meta.clone(), result.range.clone());
                let bytes = result.bytes().await?;
                Ok::<_, object_store::Error>((
                    meta,
                    range.start + bytes.len() as u64,
                    Chunk::new(bytes),
                ))
            })
            .map_err(|e| self.error("read", key, e))?;
        let (meta, next, current) = first;
        let mut reader = RangeReader {
            store: self.store.clone(),
            engine: self.engine.clone(),
            path,
            location: self.location(key),
            redactor: self.redactor.clone(),
            size: meta.size,
            e_tag: meta.e_tag,
            next,
            chunk,
            prefetch: self.concurrency,
            pending: VecDeque::new(),
            current,
            pos: 0,
        };
        reader.request_ahead();
        Ok(Box::new(reader))
    }

    fn exists(&self, key: &IntermediateKey) -> Result<bool, StorageError> {
        let store = self.store.clone();
        let path = self.object_path(key);
        match self.engine.run(async move {
            store
                .get_opts(
                    &path,
                    GetOptions {
                        head: true,
                        ..Default::default()
                    },
                )
                .await
        }) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.error("exists", key, e)),
        }
    }

    fn list_run(&self, run_id: &str) -> Result<Vec<IntermediateKey>, StorageError> {
        let prefix = self.run_prefix(run_id);
        let store = self.store.clone();
        let list_prefix = prefix.clone();
        let objects = self
            .engine
            .run(async move {
                let mut objects = Vec::new();
                let mut page_token = None;
                loop {
                    let opts = PaginatedListOptions {
                        page_token,
                        ..Default::default()
                    };
                    let page = store.list_paginated(Some(&list_prefix), opts).await?;
                    objects.extend(page.result.objects.into_iter().map(|o| o.location));
                    page_token = page.page_token;
                    if page_token.is_none() {
                        return Ok(objects);
                    }
                }
            })
            .map_err(|e| StorageError::Backend {
                operation: "list",
                location: format!("s3://{}/{}", self.bucket, prefix),
                message: self.describe(&e),
            })?;
        let mut keys: Vec<IntermediateKey> = objects
            .iter()
            .filter_map(|path| {
                let rest = path.as_ref().strip_prefix(&prefix)?;
                let mut parts = rest.split('/').map(percent_decode);
                let (step_key, output) = (parts.next()?, parts.next()?);
                parts
                    .next()
                    .is_none()
                    .then(|| IntermediateKey::new(run_id, step_key, output))
            })
            .collect();
        keys.sort();
        Ok(keys)
    }
}
/// Decodes the `%XX` escapes `object_store` applies to path segments.
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Eb"), "a.b");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("bad%zz%"), "bad%zz%");
        let path: ObjectPath = ["x", "we{ird}%.out"].into_iter().collect();
        let last = path.as_ref().rsplit('/').next().unwrap();
        assert_eq!(percent_decode(last), "we{ird}%.out");
    }
}
