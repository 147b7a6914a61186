//! Storage errors that name the location and the cause.

/// A storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Nothing is stored under the key.
    #[error(
        "no intermediate at {location}: the upstream step did not write it (was it skipped, or is this another run's storage?)"
    )]
    NotFound {
        /// Where the value was looked for.
        location: String,
    },
    /// An I/O error at a location.
    #[error("{operation} {location} failed: {source}")]
    Io {
        /// What was being done (`write`, `read`, `list`).
        operation: &'static str,
        /// Where.
        location: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file system is full (ENOSPC) or the quota is spent (EDQUOT): the cause and the
    /// path come first, whatever was being written.
    #[error(
        "{source} (ENOSPC) at {location}: free space on that file system, or point base_dir at a larger one"
    )]
    Full {
        /// The file being written.
        location: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The storage is unusable as configured (preflight failed).
    #[error("storage {kind} is not usable: {message}")]
    Unusable {
        /// The storage kind.
        kind: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// Any other backend failure.
    #[error("{operation} {location} failed: {message}")]
    Backend {
        /// What was being done.
        operation: &'static str,
        /// Where.
        location: String,
        /// The backend's message.
        message: String,
    },
}
