//! The `config:` block of `storage: {s3: ...}`: its schema, [`S3Config`] and
//! [`S3Credentials`], and the checks of S3's limits.

use std::fmt;
use std::time::Duration;

use serde_json::Value;

use serde::{Deserialize, Serialize};

use crate::config::json_schema::parse_block;
use crate::storage::StorageError;

const MIB: usize = 1024 * 1024;
/// S3 rejects multipart parts smaller than this (except the last one).
const MIN_PART_SIZE: usize = 5 * MIB;
/// S3 rejects parts larger than this.
const MAX_PART_SIZE: usize = 5 * 1024 * MIB;

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

    pub(super) fn secrets(&self) -> impl Iterator<Item = &str> {
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
///
/// [`S3Storage`]: super::S3Storage
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
    /// Values one step reads at once, e.g. the inputs of a fan-in step (`read_concurrency`):
    /// this many `GET`s in flight.
    pub read_concurrency: usize,
    /// Ask the EC2 instance metadata service for credentials when no other source has
    /// them (`instance_metadata`, default true). `false`, like the AWS convention
    /// `AWS_EC2_METADATA_DISABLED=true`, fails at once instead of contacting 169.254.169.254.
    pub instance_metadata: bool,
}

impl S3Config {
    /// Defaults for `bucket`: prefix `solidflow`, credentials and region from the environment,
    /// 50 retries within 3 minutes, 16 MiB parts, 4 in flight (the defaults of the
    /// `config:` block).
    pub fn new(bucket: impl Into<String>) -> Self {
        S3Block::with_bucket(bucket.into()).into_config()
    }

    /// Reads a `config:` block of `storage: {s3: ...}`, checking it against its schema.
    pub fn from_run_config(config: &Value) -> Result<Self, StorageError> {
        let block: S3Block = parse_block(config, &["storage", "s3", "config"]).map_err(|e| {
            StorageError::Unusable {
                kind: "s3",
                message: e.to_string(),
            }
        })?;
        Ok(block.into_config())
    }

    pub(super) fn validate(&self) -> Result<(), StorageError> {
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
        if self.read_concurrency == 0 {
            return bad("read_concurrency must be at least 1".into());
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
/// `storage: {s3: {config: ...}}`: the one definition of its keys, defaults, ranges
/// and docs. Credentials are never part of it: they come from the AWS chain.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct S3Block {
    /// Bucket for intermediates; it must exist.
    #[schemars(length(min = 1))]
    s3_bucket: String,
    /// Key prefix: objects go to <s3_prefix>/<run_id>/intermediates/<step_key>/<output>.
    #[serde(default = "default_prefix")]
    s3_prefix: String,
    /// AWS region; defaults to AWS_REGION / AWS_DEFAULT_REGION, the profile's region, then us-east-1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    region: Option<String>,
    /// Endpoint of an S3-compatible server (MinIO, Ceph, R2...); requests are path-style.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    endpoint_url: Option<String>,
    /// Allow a plain http:// endpoint_url.
    #[serde(default)]
    allow_http: bool,
    /// At most this many retries per request on throttling, 5xx and connection errors, with
    /// random exponential backoff; retry_timeout_secs is the budget that usually ends them.
    #[serde(default = "default_max_retries")]
    #[schemars(range(max = 100))]
    max_retries: u32,
    /// The retry budget: no retry starts once this many seconds have passed since the request was first sent.
    #[serde(default = "default_retry_timeout_secs")]
    #[schemars(range(max = 86400))]
    retry_timeout_secs: u32,
    /// Multipart part size and ranged-read size in MiB (S3's limits: 5 to 5120).
    #[serde(default = "default_part_size_mb")]
    #[schemars(range(min = 5, max = 5120))]
    part_size_mb: u32,
    /// Parts uploaded or ranges downloaded in parallel per value.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 256))]
    concurrency: u32,
    /// Values one step reads in parallel (a fan-in step's inputs): requests in flight at once.
    #[serde(default = "default_read_concurrency")]
    #[schemars(range(min = 1, max = 1024))]
    read_concurrency: u32,
    /// Ask the EC2 instance metadata service for credentials when no other source has them;
    /// false (or AWS_EC2_METADATA_DISABLED=true) fails at once instead.
    #[serde(default = "default_instance_metadata")]
    instance_metadata: bool,
}

fn default_prefix() -> String {
    "solidflow".into()
}
fn default_max_retries() -> u32 {
    50
}
fn default_instance_metadata() -> bool {
    true
}
fn default_retry_timeout_secs() -> u32 {
    180
}
fn default_part_size_mb() -> u32 {
    16
}
fn default_concurrency() -> u32 {
    4
}
fn default_read_concurrency() -> u32 {
    32
}

impl S3Block {
    fn with_bucket(s3_bucket: String) -> Self {
        Self {
            s3_bucket,
            s3_prefix: default_prefix(),
            region: None,
            endpoint_url: None,
            allow_http: false,
            max_retries: default_max_retries(),
            retry_timeout_secs: default_retry_timeout_secs(),
            part_size_mb: default_part_size_mb(),
            concurrency: default_concurrency(),
            read_concurrency: default_read_concurrency(),
            instance_metadata: default_instance_metadata(),
        }
    }

    fn into_config(self) -> S3Config {
        S3Config {
            bucket: self.s3_bucket,
            prefix: self.s3_prefix,
            region: self.region,
            endpoint_url: self.endpoint_url,
            allow_http: self.allow_http,
            credentials: None,
            max_retries: self.max_retries as usize,
            retry_timeout: Duration::from_secs(self.retry_timeout_secs.into()),
            part_size: self.part_size_mb as usize * MIB,
            concurrency: self.concurrency as usize,
            read_concurrency: self.read_concurrency as usize,
            instance_metadata: self.instance_metadata,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{IntermediateKey, IntermediateStorage, S3Storage};

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
        let err = S3Config::from_run_config(&tiny_parts)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("storage.s3.config.part_size_mb: expected an integer from 5 to 5120"),
            "{err}"
        );
        let mut programmatic = S3Config::new("b");
        programmatic.part_size = MIB;
        assert!(S3Storage::new(programmatic).is_err());
        let err = S3Config::from_run_config(&serde_json::json!({}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("storage.s3.config.s3_bucket: missing required key"),
            "{err}"
        );
        let defaults = S3Config::from_run_config(&serde_json::json!({"s3_bucket": "b"})).unwrap();
        assert_eq!(format!("{defaults:?}"), format!("{:?}", S3Config::new("b")));
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
}
