//! The `config:` block of `storage: {s3: ...}`: its schema, [`S3Config`] and
//! [`S3Credentials`], and the checks of S3's limits.

use std::fmt;
use std::time::Duration;

use serde_json::Value;

use crate::config::schema::{ConfigType, Field};
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
    /// Ask the EC2 instance metadata service for credentials when no other source has
    /// them (`instance_metadata`, default true). `false`, like the AWS convention
    /// `AWS_EC2_METADATA_DISABLED=true`, fails at once instead of contacting 169.254.169.254.
    pub instance_metadata: bool,
}

impl S3Config {
    /// Defaults for `bucket`: prefix `solidflow`, credentials and region from the environment,
    /// 50 retries within 3 minutes, 16 MiB parts, 4 in flight.
    pub fn new(bucket: impl Into<String>) -> Self {
        Self {
            bucket: bucket.into(),
            prefix: "solidflow".into(),
            region: None,
            endpoint_url: None,
            allow_http: false,
            credentials: None,
            max_retries: 50,
            retry_timeout: Duration::from_secs(180),
            part_size: 16 * MIB,
            concurrency: 4,
            instance_metadata: true,
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
        if let Some(allowed) = config.get("instance_metadata").and_then(Value::as_bool) {
            out.instance_metadata = allowed;
        }
        Ok(out)
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
pub(super) fn config_schema() -> ConfigType {
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
            .default(50)
            .doc("Retries per request on throttling, 5xx and connection errors, with exponential backoff; retry_timeout_secs is the budget that usually ends them."),
        Field::optional("retry_timeout_secs", ConfigType::Int)
            .default(180)
            .doc("Stop retrying a request after this many seconds."),
        Field::optional("part_size_mb", ConfigType::Int)
            .default(16)
            .doc("Multipart part size and ranged-read size in MiB (5 to 5120)."),
        Field::optional("concurrency", ConfigType::Int)
            .default(4)
            .doc("Parts uploaded or ranges downloaded in parallel per value."),
        Field::optional("instance_metadata", ConfigType::Bool)
            .default(true)
            .doc("Ask the EC2 instance metadata service for credentials when no other source has them; false (or AWS_EC2_METADATA_DISABLED=true) fails at once instead."),
    ])
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
        assert!(S3Storage::new(S3Config::from_run_config(&tiny_parts).unwrap()).is_err());
        assert!(S3Config::from_run_config(&serde_json::json!({})).is_err());
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
