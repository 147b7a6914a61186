//! The pipeline binary of the executor conformance suite (`tests/executor_conformance.rs`
//! and other CLI-driven tests): the kit's repository,
//! [`solidflow::conformance::executor::repository`], on the default executors plus Dask.
//! Its pipelines misbehave on purpose; see that module for what each one checks.
//!
//! ```sh
//! cargo run --bin conformance -- list
//! ```

fn main() {
    solidflow::conformance::executor::repository().main();
}
