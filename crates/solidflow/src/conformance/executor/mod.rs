//! The executor conformance suite: what every executor must do, checked through the real
//! CLI of a pipeline binary (`execute <pipeline> --json`), so that crash containment,
//! cancellation and process cleanup are tested as a user meets them. Each case starts
//! the binary in its own process group with a private `SOLIDFLOW_HOME` and work
//! directory, reads the event stream while the run goes on, and checks exit code,
//! events and side effects; waits are on conditions with deadlines, never fixed sleeps.
//!
//! A third-party executor needs two things, with the `conformance` feature of
//! `solidflow` enabled:
//!
//! 1. A pipeline binary serving the conformance pipelines with its executor registered
//!    (`src/bin/conformance.rs` of the executor's crate):
//!
//!    ```no_run
//!    # fn my_executor() -> solidflow::definition::executor::ExecutorDefinition { todo!() }
//!    // The whole body of `fn main`:
//!    solidflow::conformance::executor::repository_with([my_executor()]).main()
//!    ```
//!
//! 2. A test that runs the cases against a [`Target`]: the binary, the executor's config
//!    key, a base run config, and the groups of cases the executor claims:
//!
//!    ```no_run
//!    use solidflow::conformance::executor::{self as kit, Group, ResourceConfigs, Target};
//!
//!    #[test]
//!    fn conformance() {
//!        let target = Target::new(
//!            env!("CARGO_BIN_EXE_conformance"),
//!            "slurm",
//!            "execution: {slurm: {config: {partition: test}}}\nstorage: {filesystem: {}}\n",
//!        )
//!        .with_resources(ResourceConfigs::run_pool())
//!        .with_groups([Group::Isolated, Group::GraceCancel]);
//!        kit::run_all(&target);
//!    }
//!    ```
//!
//! [`run_all`] runs every case the target claims, one after the other; for one test per
//! case (in parallel, each failing on its own), call [`run_case`] by name from a test
//! per entry of [`CASES`], as the repository's `tests/executor_conformance.rs` does, and
//! check with [`case_names`] that none is missing.
//!
//! The building blocks are public too, for an executor's own tests beyond the suite:
//! [`Harness`] (one case's world), [`LiveRun`] (a run in flight), [`Outcome`] (a finished
//! run), [`assert_dies`] and [`read_pid`].

pub mod cases;
mod harness;
mod live_run;
mod outcome;
mod pipelines;
mod suite;

pub use cases::{expect_canceled, start_sleepers};
pub use harness::{Harness, ResourceConfigs, Target};
pub use live_run::{LiveRun, RUN_DEADLINE, alive, assert_dies, read_pid};
pub use outcome::Outcome;
pub use pipelines::{repository, repository_with};
pub use suite::{CASES, Case, Group, case_names, run_all, run_case};
