//! Repositories: the pipelines one binary serves. The hand-over to the command line,
//! `Repository::main`, belongs to [`crate::cli`], which implements it.

use std::sync::{Arc, OnceLock};

use super::pipeline::{DefinitionError, Pipeline};

type BuildPipeline = Arc<dyn Fn() -> Pipeline + Send + Sync>;

/// One pipeline of a repository, built now or on first use.
#[derive(Clone)]
struct Entry {
    name: String,
    build: Option<BuildPipeline>,
    built: OnceLock<Pipeline>,
}

impl Entry {
    fn get(&self) -> &Pipeline {
        self.built.get_or_init(|| {
            let build = self
                .build
                .as_ref()
                .expect("eager entries are built at insertion");
            let pipeline = build();
            assert_eq!(
                pipeline.name(),
                self.name,
                "the lazy pipeline registered as `{}` built a pipeline named `{}`",
                self.name,
                pipeline.name()
            );
            pipeline
        })
    }
}

/// The pipelines served by one binary. A pipeline binary's `main` builds one and hands
/// it to the CLI with `.main()` (defined in [`crate::cli`]).
///
/// ```no_run
/// # use solidflow::prelude::*;
/// # fn pipeline() -> Pipeline { unimplemented!() }
/// # fn big_pipeline() -> Pipeline { unimplemented!() }
/// fn main() {
///     Repository::new("examples")
///         .with_pipeline(pipeline())
///         // Built only when used: a step process of another pipeline never builds it.
///         .with_lazy_pipeline("big", big_pipeline)
///         .main();
/// }
/// ```
#[derive(Clone)]
pub struct Repository {
    name: String,
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("name", &self.name)
            .field("pipelines", &self.pipeline_names())
            .finish()
    }
}

impl Repository {
    /// An empty repository.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            entries: Vec::new(),
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
    pub fn try_with_pipeline(self, pipeline: Pipeline) -> Result<Self, DefinitionError> {
        let built = OnceLock::new();
        let name = pipeline.name().to_string();
        let _ = built.set(pipeline);
        self.push(Entry {
            name,
            build: None,
            built,
        })
    }

    /// Adds a pipeline that is built the first time it is used. Step processes
    /// (multiprocess, Dask) then build only the pipeline they run, which keeps their
    /// start-up short in binaries with many or large pipelines. `build` must return a
    /// pipeline called `name`. Panics on a duplicate name.
    pub fn with_lazy_pipeline(
        self,
        name: impl Into<String>,
        build: impl Fn() -> Pipeline + Send + Sync + 'static,
    ) -> Self {
        let entry = Entry {
            name: name.into(),
            build: Some(Arc::new(build)),
            built: OnceLock::new(),
        };
        self.push(entry).unwrap_or_else(|e| panic!("{e}"))
    }

    #[allow(clippy::result_large_err)]
    fn push(mut self, entry: Entry) -> Result<Self, DefinitionError> {
        if self.entries.iter().any(|e| e.name == entry.name) {
            return Err(DefinitionError::Duplicate(format!(
                "repository `{}` already has a pipeline named `{}`",
                self.name, entry.name
            )));
        }
        self.entries.push(entry);
        Ok(self)
    }

    /// The repository's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pipeline names, in the order added (builds nothing).
    pub fn pipeline_names(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.name.as_str()).collect()
    }

    /// Every pipeline, in the order added (builds lazy ones).
    pub fn pipelines(&self) -> Vec<&Pipeline> {
        self.entries.iter().map(Entry::get).collect()
    }

    /// Looks up a pipeline by name, building it if it is lazy.
    pub fn pipeline(&self, name: &str) -> Option<&Pipeline> {
        self.entries.iter().find(|e| e.name == name).map(Entry::get)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::solid::{Outputs, SolidDefinition};
    use std::sync::atomic::{AtomicUsize, Ordering};

    static BUILDS: AtomicUsize = AtomicUsize::new(0);

    fn counted() -> Pipeline {
        BUILDS.fetch_add(1, Ordering::SeqCst);
        Pipeline::build("lazy", |p| {
            p.add(
                "a",
                SolidDefinition::new("a", |_, _| Ok(Outputs::new())),
                vec![],
            )
        })
        .unwrap()
    }

    #[test]
    fn lazy_pipelines_are_built_once_on_first_use() {
        let repo = Repository::new("r").with_lazy_pipeline("lazy", counted);
        assert_eq!(repo.pipeline_names(), ["lazy"]);
        assert_eq!(BUILDS.load(Ordering::SeqCst), 0);
        assert_eq!(repo.pipeline("lazy").unwrap().name(), "lazy");
        assert_eq!(repo.pipelines().len(), 1);
        assert_eq!(BUILDS.load(Ordering::SeqCst), 1);
        assert!(repo.pipeline("other").is_none());
        let dup = Repository::new("r")
            .with_pipeline(counted())
            .try_with_pipeline(counted());
        assert!(
            dup.unwrap_err()
                .to_string()
                .contains("already has a pipeline named `lazy`")
        );
    }
}
