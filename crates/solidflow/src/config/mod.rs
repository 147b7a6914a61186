//! Run config: schemas, loading and merging YAML/JSON documents, and validation that
//! reports every error at once with its path, file and line.

pub mod error;
pub mod json_schema;
pub mod run_config;
pub mod schema;
pub(crate) mod schema_text;
pub mod source;
pub mod validate;

pub use error::{ConfigError, ConfigErrors, SourceLocation};
pub use run_config::{RunConfig, Selected, SolidRunConfig, run_config_schema};
pub use schema::{ConfigType, Field};
pub use source::ConfigSources;
