//! The seed's hello world: pipeline `dask_pipeline` with one solid, `hello_world`.
//!
//! ```sh
//! cargo run --release --example hello_world                      # runs on the embedded default
//! cargo run --release --example hello_world -- execute dask_pipeline -c examples/config/filesystem.yaml
//! cargo run --release --example hello_world -- --help
//! ```
//!
//! With no arguments it executes `dask_pipeline` in process; with arguments it is the
//! full solidflow CLI (`list`, `plan`, `execute`, `config-schema`, `runs`, `logs`).

use solidflow::prelude::*;

/// Says hello.
#[solid]
fn hello_world(ctx: &SolidContext) -> String {
    ctx.log().info("saying hello");
    "Hello, World!".to_string()
}

/// The seed's pipeline, with the seed's `default_executors + [dask_executor]` mode.
fn dask_pipeline() -> Pipeline {
    Pipeline::build("dask_pipeline", |p| {
        p.invoke(hello_world, ());
    })
    .expect("valid pipeline")
    .with_executors(default_executors().with(dask_executor()))
}

fn main() {
    let repository = Repository::new("hello_world").with_pipeline(dask_pipeline());
    if std::env::args_os().len() > 1 {
        repository.main();
    }
    // No arguments: behave like the seed's script and just run the pipeline.
    let code = solidflow::cli::run(
        &repository,
        ["hello_world", "execute", "dask_pipeline"].map(Into::into),
    );
    std::process::exit(code);
}
