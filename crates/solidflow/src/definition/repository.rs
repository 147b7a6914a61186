//! Repositories: the pipelines one binary serves, and the hand-over to the CLI.

use super::pipeline::{DefinitionError, Pipeline};

/// The pipelines served by one binary.
///
/// ```no_run
/// # use solidflow::prelude::*;
/// # fn pipeline() -> Pipeline { unimplemented!() }
/// fn main() {
///     Repository::new("examples").with_pipeline(pipeline()).main();
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Repository {
    name: String,
    pipelines: Vec<Pipeline>,
}

impl Repository {
    /// An empty repository.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            pipelines: Vec::new(),
        }
    }

    /// Adds a pipeline. Panics on a duplicate name, which is a programming error; use
    /// [`try_with_pipeline`](Self::try_with_pipeline) to handle it.
    pub fn with_pipeline(self, pipeline: Pipeline) -> Self {
        self.try_with_pipeline(pipeline)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Adds a pipeline, refusing a duplicate name.
    #[allow(clippy::result_large_err)]
    pub fn try_with_pipeline(mut self, pipeline: Pipeline) -> Result<Self, DefinitionError> {
        if self.pipeline(pipeline.name()).is_some() {
            return Err(DefinitionError::Duplicate(format!(
                "repository `{}` already has a pipeline named `{}`",
                self.name,
                pipeline.name()
            )));
        }
        self.pipelines.push(pipeline);
        Ok(self)
    }

    /// The repository's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pipelines, in the order added.
    pub fn pipelines(&self) -> &[Pipeline] {
        &self.pipelines
    }

    /// Looks up a pipeline by name.
    pub fn pipeline(&self, name: &str) -> Option<&Pipeline> {
        self.pipelines.iter().find(|p| p.name() == name)
    }

    /// Runs the solidflow CLI on the process arguments and exits with its code.
    /// This is what a pipeline binary's `main` calls; it also serves step mode for the
    /// out-of-process executors.
    pub fn main(self) -> ! {
        let code = crate::cli::run(&self, std::env::args_os());
        std::process::exit(code)
    }
}
