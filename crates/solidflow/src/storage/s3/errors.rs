//! Turning `object_store` errors into [`StorageError`]s a user can act on: scrubbed of
//! credentials, with a hint at the likely cause.

use super::S3Storage;

/// What to do when no credentials were found, shared by the construction-time check and
/// the hint on a failed instance-metadata request.
pub(super) const NO_CREDENTIALS_HINT: &str = "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or attach an instance role; \
     on a Dask cluster every worker needs them in its own environment";
use crate::storage::{IntermediateKey, IntermediateStorage, StorageError};

impl S3Storage {
    pub(super) fn error(
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
    pub(super) fn describe(&self, error: &object_store::Error) -> String {
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
                return format!(
                    "{text} (found no AWS credentials in this process's environment or profile, and the instance metadata \
                     service gave none: {NO_CREDENTIALS_HINT})"
                );
            }
            _ if text.contains("error sending request") || text.contains("timed out") => {
                " (the endpoint did not answer: check endpoint_url / region and that the server is reachable)"
            }
            _ => "",
        };
        format!("{text}{hint}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::S3Config;

    #[test]
    fn missing_credentials_get_a_hint() {
        let storage = S3Storage::with_env(S3Config::new("bucket"), &|_| None).unwrap();
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
}
