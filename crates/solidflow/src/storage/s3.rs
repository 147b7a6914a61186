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

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, MultipartUpload, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, RetryConfig,
};
use serde_json::Value;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use super::registry::{StorageContext, StorageDefinition};
use super::{IntermediateKey, IntermediateStorage, Reach, StorageError, WriteFn};
use crate::config::schema::{ConfigType, Field};

const MIB: usize = 1024 * 1024;
/// S3 rejects multipart parts smaller than this (except the last one).
const MIN_PART_SIZE: usize = 5 * MIB;
/// S3 rejects parts larger than this.
const MAX_PART_SIZE: usize = 5 * 1024 * MIB;
/// Placeholder written wherever a credential would have appeared.
const REDACTED: &str = "<redacted>";

/// Static AWS credentials given programmatically (tests, embedding applications).
///
/// Run config never carries credentials; from config they always come from the AWS chain.
/// `Debug` shows only that credentials are present.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Credentials {
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: String,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: String,
    /// `AWS_SESSION_TOKEN`, for temporary credentials.
    pub session_token: Option<String>,
}

impl S3Credentials {
    /// Static credentials without a session token.
    pub fn new(access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Self {
        Self {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token: None,
        }
    }

    fn secrets(&self) -> impl Iterator<Item = &str> {
        [
            Some(self.access_key_id.as_str()),
            Some(self.secret_access_key.as_str()),
            self.session_token.as_deref(),
        ]
        .into_iter()
        .flatten()
    }
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("S3Credentials(<redacted>)")
    }
}

/// Settings of an [`S3Storage`]; the `storage: {s3: {config: ...}}` block maps onto it.
#[derive(Clone, Debug)]
pub struct S3Config {
    /// The bucket (`s3_bucket`). It must exist; preflight checks it.
    pub bucket: String,
    /// Key prefix under which runs are stored (`s3_prefix`, default `solidflow`).
    pub prefix: String,
    /// AWS region (`region`); defaults to `AWS_REGION`/`AWS_DEFAULT_REGION`, the profile's
    /// region, then `us-east-1`.
    pub region: Option<String>,
    /// Endpoint of an S3-compatible server, e.g. `http://127.0.0.1:9000` (`endpoint_url`).
    /// Requests are path-style (`<endpoint>/<bucket>/<key>`).
    pub endpoint_url: Option<String>,
    /// Allow plain `http://` endpoints (`allow_http`).
    pub allow_http: bool,
    /// Explicit credentials; `None` uses the AWS chain (env vars, profile, container, instance).
    pub credentials: Option<S3Credentials>,
    /// Retries of one request on throttling, 5xx and connection errors (`max_retries`).
    pub max_retries: usize,
    /// Give up retrying a request after this long (`retry_timeout_secs`).
    pub retry_timeout: Duration,
    /// Size of one multipart part and of one ranged read (`part_size_mb`, 5 MiB to 5 GiB).
    pub part_size: usize,
    /// Parts uploaded, or ranges downloaded, concurrently per value (`concurrency`).
    pub concurrency: usize,
}

impl S3Config {
    /// Defaults for `bucket`: prefix `solidflow`, credentials and region from the environment,
    /// 10 retries within 3 minutes, 16 MiB parts, 4 in flight.
    pub fn new(bucket: impl Into<String>) -> Self {
        Self {
            bucket: bucket.into(),
            prefix: "solidflow".into(),
            region: None,
            endpoint_url: None,
            allow_http: false,
            credentials: None,
            max_retries: 10,
            retry_timeout: Duration::from_secs(180),
            part_size: 16 * MIB,
            concurrency: 4,
        }
    }

    /// Reads a validated `config:` block (see `definition()`).
    pub fn from_run_config(config: &Value) -> Result<Self, StorageError> {
        let bad = |message: String| StorageError::Unusable {
            kind: "s3",
            message,
        };
        let string = |name: &str| config.get(name).and_then(Value::as_str).map(str::to_owned);
        let int = |name: &str| config.get(name).and_then(Value::as_u64);
        let bucket = string("s3_bucket")
            .filter(|b| !b.is_empty())
            .ok_or_else(|| {
                bad(
                    "storage.s3.config.s3_bucket is required: the bucket to store intermediates in"
                        .into(),
                )
            })?;
        let mut out = Self::new(bucket);
        if let Some(prefix) = string("s3_prefix") {
            out.prefix = prefix;
        }
        out.region = string("region").filter(|r| !r.is_empty());
        out.endpoint_url = string("endpoint_url").filter(|e| !e.is_empty());
        out.allow_http = config
            .get("allow_http")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if let Some(n) = int("max_retries") {
            out.max_retries = n as usize;
        }
        if let Some(secs) = int("retry_timeout_secs") {
            out.retry_timeout = Duration::from_secs(secs);
        }
        if let Some(mb) = int("part_size_mb") {
            out.part_size = usize::try_from(mb)
                .unwrap_or(usize::MAX)
                .saturating_mul(MIB);
        }
        if let Some(n) = int("concurrency") {
            out.concurrency = n as usize;
        }
        Ok(out)
    }

    fn validate(&self) -> Result<(), StorageError> {
        let bad = |message: String| {
            Err(StorageError::Unusable {
                kind: "s3",
                message,
            })
        };
        if self.bucket.is_empty() || self.bucket.contains('/') {
            return bad(format!(
                "s3_bucket {:?} is not a bucket name (no slashes, not empty)",
                self.bucket
            ));
        }
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&self.part_size) {
            return bad(format!(
                "part_size_mb must be between 5 and 5120 (S3's limits for multipart parts), got {} MiB",
                self.part_size / MIB
            ));
        }
        if self.concurrency == 0 {
            return bad("concurrency must be at least 1".into());
        }
        if let Some(endpoint) = &self.endpoint_url {
            if endpoint.starts_with("http://") && !self.allow_http {
                return bad(format!(
                    "endpoint_url {endpoint} is plain http: set allow_http: true to permit it"
                ));
            }
            if !endpoint.starts_with("http://") && !endpoint.starts_with("https://") {
                return bad(format!(
                    "endpoint_url {endpoint} must start with http:// or https://"
                ));
            }
        }
        Ok(())
    }
}

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

    /// Like [`new`](Self::new), with the environment given as a lookup function.
    fn with_env(
        config: S3Config,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, StorageError> {
        config.validate()?;
        let unusable = |message: String| StorageError::Unusable {
            kind: "s3",
            message,
        };

        let mut redactor = Redactor::default();
        // AWS_* variables: credentials, region, web identity, container credentials...
        let mut builder = AmazonS3Builder::from_env();
        for name in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
        ] {
            if let Some(value) = env(name) {
                redactor.add(&value);
            }
        }
        let env_has_credentials =
            env("AWS_ACCESS_KEY_ID").is_some() || env("AWS_WEB_IDENTITY_TOKEN_FILE").is_some();
        let profile = profile::load(env);
        let credentials = match (&config.credentials, &profile) {
            (Some(explicit), _) => Some(explicit.clone()),
            (None, Some(p)) if !env_has_credentials => p.credentials.clone(),
            _ => None,
        };
        if let Some(c) = &credentials {
            c.secrets().for_each(|s| redactor.add(s));
            builder = builder
                .with_access_key_id(&c.access_key_id)
                .with_secret_access_key(&c.secret_access_key);
            if let Some(token) = &c.session_token {
                builder = builder.with_token(token);
            }
        }
        let region = config
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or_else(|| profile.as_ref().and_then(|p| p.region.clone()))
            .unwrap_or_else(|| "us-east-1".into());
        builder = builder
            .with_bucket_name(&config.bucket)
            .with_region(&region);
        let endpoint = match &config.endpoint_url {
            Some(url) => {
                // Path-style requests (`<endpoint>/<bucket>/<key>`) work with every S3-compatible server.
                builder = builder
                    .with_endpoint(url.trim_end_matches('/'))
                    .with_virtual_hosted_style_request(false);
                url.trim_end_matches('/').to_owned()
            }
            None => format!("https://s3.{region}.amazonaws.com"),
        };
        builder = builder
            .with_allow_http(config.allow_http)
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(config.allow_http)
                    .with_timeout(Duration::from_secs(120)),
            );

        let retry = |max_retries: usize, retry_timeout: Duration| RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(15),
                base: 2.0,
            },
            max_retries,
            retry_timeout,
        };
        let build = |builder: AmazonS3Builder| {
            builder.build().map_err(|e| {
                unusable(format!(
                    "invalid S3 settings for bucket {}: {}",
                    config.bucket,
                    redactor.scrub(&e.to_string())
                ))
            })
        };
        let preflight_store = build(
            builder
                .clone()
                .with_retry(retry(config.max_retries.min(2), Duration::from_secs(20))),
        )?;
        let store = build(builder.with_retry(retry(config.max_retries, config.retry_timeout)))?;

        Ok(Self {
            store: Arc::new(store),
            preflight_store: Arc::new(preflight_store),
            engine: Arc::new(
                Engine::new()
                    .map_err(|e| unusable(format!("cannot start the S3 I/O runtime: {e}")))?,
            ),
            bucket: config.bucket,
            prefix: config.prefix.trim_matches('/').to_owned(),
            region,
            endpoint,
            part_size: config.part_size,
            concurrency: config.concurrency,
            redactor: Arc::new(redactor),
        })
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

    fn error(
        &self,
        operation: &'static str,
        key: &IntermediateKey,
        error: object_store::Error,
    ) -> StorageError {
        let location = self.location(key);
        match error {
            object_store::Error::NotFound { .. } => StorageError::NotFound { location },
            other => StorageError::Backend {
                operation,
                location,
                message: self.describe(&other),
            },
        }
    }

    /// The cause of `error` with a hint, scrubbed of credentials.
    fn describe(&self, error: &object_store::Error) -> String {
        let text = self.redactor.scrub(&error.to_string());
        let hint = match error {
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => {
                " (the credentials were rejected: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the role's permissions on the bucket)"
            }
            _ if text.contains("NoSuchBucket") => {
                " (the bucket does not exist: create it or fix s3_bucket)"
            }
            _ if text.contains("InvalidAccessKeyId") || text.contains("SignatureDoesNotMatch") => {
                " (the credentials were rejected: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
            }
            // No credentials anywhere else, so object_store asked the EC2 / ECS metadata
            // endpoints, and they are absent or refused.
            _ if text.contains("169.254.169.254") || text.contains("169.254.170.2") => {
                " (found no AWS credentials in this process's environment or profile, and the instance metadata service \
                 gave none: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or attach an instance role; \
                 on a Dask cluster every worker needs them in its own environment)"
            }
            _ if text.contains("error sending request") || text.contains("timed out") => {
                " (the endpoint did not answer: check endpoint_url / region and that the server is reachable)"
            }
            _ => "",
        };
        format!("{text}{hint}")
    }
}

fn config_schema() -> ConfigType {
    ConfigType::shape([
        Field::required("s3_bucket", ConfigType::String).doc("Bucket for intermediates; it must exist."),
        Field::optional("s3_prefix", ConfigType::String)
            .default("solidflow")
            .doc("Key prefix: objects go to <s3_prefix>/<run_id>/intermediates/<step_key>/<output>."),
        Field::optional("region", ConfigType::String)
            .doc("AWS region; defaults to AWS_REGION / AWS_DEFAULT_REGION, the profile's region, then us-east-1."),
        Field::optional("endpoint_url", ConfigType::String)
            .doc("Endpoint of an S3-compatible server (MinIO, Ceph, R2...); requests are path-style."),
        Field::optional("allow_http", ConfigType::Bool).default(false).doc("Allow a plain http:// endpoint_url."),
        Field::optional("max_retries", ConfigType::Int)
            .default(10)
            .doc("Retries per request on throttling, 5xx and connection errors, with exponential backoff."),
        Field::optional("retry_timeout_secs", ConfigType::Int)
            .default(180)
            .doc("Stop retrying a request after this many seconds."),
        Field::optional("part_size_mb", ConfigType::Int)
            .default(16)
            .doc("Multipart part size and ranged-read size in MiB (5 to 5120)."),
        Field::optional("concurrency", ConfigType::Int)
            .default(4)
            .doc("Parts uploaded or ranges downloaded in parallel per value."),
    ])
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
pub fn definition() -> StorageDefinition {
    StorageDefinition {
        name: "s3",
        description: "Store intermediates as objects in an S3 (or S3-compatible) bucket; works for distributed runs.",
        config: config_schema,
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

/// Whether `error` is S3's answer to a range that starts past the end (416 InvalidRange).
fn is_invalid_range(error: &object_store::Error) -> bool {
    let text = error.to_string();
    text.contains("InvalidRange") || text.contains("416")
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

/// The storage's own tokio runtime, shared with its readers.
///
/// Dropped with `shutdown_background`, so dropping the last handle inside some other async
/// context does not panic.
struct Engine {
    runtime: Option<Runtime>,
}

impl Engine {
    fn new() -> io::Result<Self> {
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

    fn spawn<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime().spawn(future)
    }

    /// Runs `future` to completion on this runtime and returns its output.
    fn run<F>(&self, future: F) -> F::Output
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

/// The writer handed to a value's codec: buffers one part, uploads full parts concurrently.
struct Upload<'a> {
    storage: &'a S3Storage,
    path: ObjectPath,
    buf: Vec<u8>,
    multipart: Option<Box<dyn MultipartUpload>>,
    in_flight: VecDeque<JoinHandle<object_store::Result<()>>>,
    /// The storage error behind an `io::Error` returned to the codec, reported instead of it.
    failure: Option<object_store::Error>,
    written: u64,
}

impl<'a> Upload<'a> {
    fn new(storage: &'a S3Storage, path: ObjectPath) -> Self {
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

    fn finish(mut self) -> object_store::Result<u64> {
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
    fn abort(&mut self) {
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

/// Streams an object with ranged GETs, `prefetch` ranges ahead of the consumer.
struct RangeReader {
    store: Arc<AmazonS3>,
    engine: Arc<Engine>,
    path: ObjectPath,
    location: String,
    redactor: Arc<Redactor>,
    size: u64,
    e_tag: Option<String>,
    /// Offset of the next range to request.
    next: u64,
    chunk: u64,
    prefetch: usize,
    /// Requested ranges: expected length and the download.
    pending: VecDeque<(usize, JoinHandle<object_store::Result<Chunk>>)>,
    current: Chunk,
    pos: usize,
}

impl RangeReader {
    fn request_ahead(&mut self) {
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
struct Chunk(Box<dyn AsRef<[u8]> + Send + Sync>);

impl Chunk {
    fn new(bytes: impl AsRef<[u8]> + Send + Sync + 'static) -> Self {
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

/// Removes known credentials from text that may reach a user (error messages).
#[derive(Default)]
struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    fn add(&mut self, secret: &str) {
        // Very short values would redact innocent text and cannot be real keys anyway.
        if secret.len() >= 4 && !self.secrets.iter().any(|s| s == secret) {
            self.secrets.push(secret.to_owned());
            // Longest first, so a secret containing another is removed whole.
            self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        }
    }

    fn scrub(&self, text: &str) -> String {
        self.secrets.iter().fold(text.to_owned(), |text, secret| {
            text.replace(secret.as_str(), REDACTED)
        })
    }
}

/// Static credentials and region from the shared AWS config files (`AWS_PROFILE`).
mod profile {
    use super::*;

    /// What a profile provides.
    #[derive(Debug, Default, PartialEq, Eq)]
    pub(super) struct Profile {
        pub credentials: Option<S3Credentials>,
        pub region: Option<String>,
    }

    /// Loads profile `AWS_PROFILE` (or `default`) from `AWS_SHARED_CREDENTIALS_FILE`
    /// (`~/.aws/credentials`) and `AWS_CONFIG_FILE` (`~/.aws/config`). Only static keys are
    /// supported; SSO and role chaining need the AWS CLI to export env vars instead.
    pub(super) fn load(env: &dyn Fn(&str) -> Option<String>) -> Option<Profile> {
        let name = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
        let home = env("HOME").map(PathBuf::from);
        let file = |var: &str, default: &str| {
            env(var)
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(".aws").join(default)))
        };
        let credentials = file("AWS_SHARED_CREDENTIALS_FILE", "credentials")
            .and_then(|p| std::fs::read_to_string(p).ok());
        let config =
            file("AWS_CONFIG_FILE", "config").and_then(|p| std::fs::read_to_string(p).ok());
        let profile = parse(credentials.as_deref(), config.as_deref(), &name);
        (profile != Profile::default()).then_some(profile)
    }

    /// Reads profile `name`: keys from the credentials file (`[name]`) or the config file
    /// (`[profile name]`, or `[default]`), the region from the config file.
    pub(super) fn parse(credentials: Option<&str>, config: Option<&str>, name: &str) -> Profile {
        let config_section = if name == "default" {
            "default".to_owned()
        } else {
            format!("profile {name}")
        };
        let from_credentials = credentials
            .map(|text| section(text, name))
            .unwrap_or_default();
        let from_config = config
            .map(|text| section(text, &config_section))
            .unwrap_or_default();
        let get = |key: &str| {
            from_credentials
                .iter()
                .chain(from_config.iter())
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        let credentials = match (get("aws_access_key_id"), get("aws_secret_access_key")) {
            (Some(id), Some(secret)) => Some(S3Credentials {
                access_key_id: id,
                secret_access_key: secret,
                session_token: get("aws_session_token"),
            }),
            _ => None,
        };
        let region = from_config
            .iter()
            .find(|(k, _)| k == "region")
            .map(|(_, v)| v.clone());
        Profile {
            credentials,
            region,
        }
    }

    /// The `key = value` pairs of `[name]` in an INI file.
    fn section(text: &str, name: &str) -> Vec<(String, String)> {
        let mut inside = false;
        let mut out = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
                continue;
            }
            if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                inside = header.trim() == name;
                continue;
            }
            if inside && let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn profile_files_are_parsed() {
        let credentials = "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = s3cr3t\n\n[work]\naws_access_key_id=AKIDWORK\naws_secret_access_key=w0rk\naws_session_token = tok\n";
        let config = "[default]\nregion = eu-west-1\n[profile work]\nregion = ap-south-1\n";
        let p = profile::parse(Some(credentials), Some(config), "default");
        assert_eq!(
            p.credentials,
            Some(S3Credentials::new("AKIDDEFAULT", "s3cr3t"))
        );
        assert_eq!(p.region.as_deref(), Some("eu-west-1"));
        let p = profile::parse(Some(credentials), Some(config), "work");
        assert_eq!(p.credentials.unwrap().session_token.as_deref(), Some("tok"));
        assert_eq!(p.region.as_deref(), Some("ap-south-1"));
        assert_eq!(
            profile::parse(None, Some(config), "missing"),
            profile::Profile::default()
        );
    }

    #[test]
    fn profile_credentials_are_redacted_everywhere() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("creds"), "[default]\naws_access_key_id = AKIDPROFILE1\naws_secret_access_key = profile-secret-xyz\n").unwrap();
        let creds = dir.path().join("creds").display().to_string();
        let leaked: &'static str = Box::leak(creds.into_boxed_str());
        let pairs: &'static [(&str, &str)] =
            Box::leak(Box::new([("AWS_SHARED_CREDENTIALS_FILE", leaked)]));
        let storage = S3Storage::with_env(S3Config::new("bucket"), &env_of(pairs)).unwrap();
        let text = storage
            .redactor
            .scrub("body: <AWSAccessKeyId>AKIDPROFILE1</AWSAccessKeyId> profile-secret-xyz");
        assert!(
            !text.contains("AKIDPROFILE1") && !text.contains("profile-secret-xyz"),
            "{text}"
        );
        let debug = format!("{storage:?}");
        assert!(
            !debug.contains("AKIDPROFILE1") && !debug.contains("profile-secret-xyz"),
            "{debug}"
        );
        assert_eq!(storage.region, "us-east-1");
    }

    #[test]
    fn config_block_maps_and_validates() {
        let config = serde_json::json!({
            "s3_bucket": "b", "s3_prefix": "/p/q/", "endpoint_url": "http://127.0.0.1:9000", "allow_http": true,
            "part_size_mb": 8, "concurrency": 2, "max_retries": 3, "retry_timeout_secs": 5
        });
        let parsed = S3Config::from_run_config(&config).unwrap();
        assert_eq!(parsed.part_size, 8 * MIB);
        let storage = S3Storage::new(parsed).unwrap();
        let key = IntermediateKey::new("r", "a.compute", "result");
        assert_eq!(
            storage.location(&key),
            "s3://b/p/q/r/intermediates/a.compute/result"
        );
        assert_eq!(
            storage.object_path(&key).as_ref(),
            "p/q/r/intermediates/a.compute/result"
        );

        let http_without_opt_in =
            serde_json::json!({"s3_bucket": "b", "endpoint_url": "http://x:1"});
        let err =
            S3Storage::new(S3Config::from_run_config(&http_without_opt_in).unwrap()).unwrap_err();
        assert!(err.to_string().contains("allow_http"), "{err}");
        let tiny_parts = serde_json::json!({"s3_bucket": "b", "part_size_mb": 1});
        assert!(S3Storage::new(S3Config::from_run_config(&tiny_parts).unwrap()).is_err());
        assert!(S3Config::from_run_config(&serde_json::json!({})).is_err());
    }

    #[test]
    fn missing_credentials_get_a_hint() {
        let storage = S3Storage::with_env(S3Config::new("bucket"), &env_of(&[])).unwrap();
        let error = object_store::Error::Generic {
            store: "S3",
            source: "Error performing PUT http://169.254.169.254/latest/api/token in 2ms - 403 Forbidden".into(),
        };
        let text = storage.describe(&error);
        assert!(
            text.contains("found no AWS credentials") && text.contains("every worker"),
            "{text}"
        );
    }

    #[test]
    fn explicit_credentials_never_show_in_debug() {
        let mut config = S3Config::new("b");
        config.credentials = Some(S3Credentials::new("AKIDEXPLICIT", "explicit-secret"));
        let text = format!("{config:?} {:?}", S3Storage::new(config.clone()).unwrap());
        assert!(
            !text.contains("AKIDEXPLICIT") && !text.contains("explicit-secret"),
            "{text}"
        );
    }

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
