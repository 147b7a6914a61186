//! Building the `object_store` S3 clients of an [`S3Storage`] from an [`S3Config`]:
//! credentials (explicit, the AWS environment, or a profile), region, endpoint,
//! timeouts and retries.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::{BackoffConfig, ClientOptions, RetryConfig};

use super::engine::Engine;
use super::errors::NO_CREDENTIALS_HINT;
use super::profile;
use super::redact::Redactor;
use super::{S3Config, S3Storage};
use crate::storage::StorageError;

impl S3Storage {
    /// Like [`new`](Self::new), with the environment given as a lookup function.
    pub(super) fn with_env(
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
        let metadata_off = !config.instance_metadata || metadata_disabled_by_env(env);
        if metadata_off && !has_credential_source(&builder) {
            return Err(unusable(format!(
                "found no AWS credentials for bucket {} in this process's environment or profile, and asking the \
                 instance metadata service is turned off (AWS_EC2_METADATA_DISABLED=true or instance_metadata: false); {NO_CREDENTIALS_HINT}",
                config.bucket
            )));
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
                // Each pause is drawn from [100 ms, 3 × the previous one]: about 1.5×
                // longer on average. With base 2 the mean barely grows, and 10 retries
                // were spent in ~2 s; see `max_retries` in docs/storage.md.
                base: 3.0,
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
            read_concurrency: config.read_concurrency,
            redactor: Arc::new(redactor),
        })
    }
}

/// The AWS convention: `AWS_EC2_METADATA_DISABLED=true` turns off the instance metadata
/// service as a credential source.
fn metadata_disabled_by_env(env: &dyn Fn(&str) -> Option<String>) -> bool {
    env("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// Whether `builder` has a credential source other than the instance metadata service
/// (object_store's last resort): static keys, web identity, container credentials, or
/// unsigned requests.
fn has_credential_source(builder: &AmazonS3Builder) -> bool {
    let set = |key: AmazonS3ConfigKey| builder.get_config_value(&key).is_some();
    set(AmazonS3ConfigKey::AccessKeyId)
        || set(AmazonS3ConfigKey::SecretAccessKey)
        || (set(AmazonS3ConfigKey::WebIdentityTokenFile) && set(AmazonS3ConfigKey::RoleArn))
        || set(AmazonS3ConfigKey::ContainerCredentialsRelativeUri)
        || (set(AmazonS3ConfigKey::ContainerCredentialsFullUri)
            && set(AmazonS3ConfigKey::ContainerAuthorizationTokenFile))
        || builder
            .get_config_value(&AmazonS3ConfigKey::SkipSignature)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::S3Credentials;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
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
    fn disabled_instance_metadata_without_credentials_fails_at_once() {
        let off: &'static [(&str, &str)] = &[("AWS_EC2_METADATA_DISABLED", "TRUE")];
        for (config, env) in [
            (S3Config::new("b"), off),
            (
                S3Config {
                    instance_metadata: false,
                    ..S3Config::new("b")
                },
                &[] as &[(&str, &str)],
            ),
        ] {
            let Err(e) = S3Storage::with_env(config, &env_of(env)) else {
                panic!("built a storage without credentials");
            };
            let text = e.to_string();
            assert!(
                text.contains("found no AWS credentials for bucket b")
                    && text.contains("AWS_EC2_METADATA_DISABLED")
                    && text.contains("every worker"),
                "{text}"
            );
        }
        let mut explicit = S3Config::new("b");
        explicit.credentials = Some(S3Credentials::new("AKID", "secret"));
        explicit.instance_metadata = false;
        assert!(S3Storage::with_env(explicit, &env_of(off)).is_ok());
    }
}
