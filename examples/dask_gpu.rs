//! Dask resources: a solid that needs a GPU runs only on Dask workers that offer one.
//!
//! ```sh
//! scripts/python-env.sh && export SOLIDFLOW_PYTHON=$PWD/.venv/bin/python
//!
//! # a local cluster whose workers each offer GPU=1:
//! cargo run --example dask_gpu -- execute gpu_pipeline -c examples/config/dask_gpu.yaml
//!
//! # or a real cluster: one worker with GPUs, one without
//! dask scheduler --host 127.0.0.1 --port 8786 &
//! dask worker tcp://127.0.0.1:8786 --nthreads 1 --resources "GPU=2" &
//! dask worker tcp://127.0.0.1:8786 --nthreads 1 &
//! cargo run --example dask_gpu -- execute gpu_pipeline -c examples/config/dask_gpu.yaml \
//!     -c examples/config/dask_gpu_cluster.yaml
//! ```
//!
//! `#[solid(resources(GPU = 1))]` is the Rust spelling of the seed's
//! `step_metadata_fn=lambda _: {'dagster-dask/resource_requirements': {'GPU': 1}}`. On Dask
//! it becomes `client.submit(..., resources={"GPU": 1})`; the `in_process` and
//! `multiprocess` executors honour it too, against their own `resources:` config.

use solidflow::prelude::*;

/// Loads the training data (any worker).
#[solid]
fn load_data(ctx: &SolidContext) -> Vec<f64> {
    ctx.log().info("loading data");
    (0..1000).map(|i| i as f64 / 1000.0).collect()
}

/// "Trains" on a GPU: runs only on a worker started with `--resources "GPU=..."`.
#[solid(resources(GPU = 1))]
fn train(ctx: &SolidContext, data: Vec<f64>) -> f64 {
    ctx.log().info(format!("training on {} points", data.len()));
    data.iter().sum::<f64>() / data.len() as f64
}

/// Reports the model (any worker).
#[solid]
fn report(ctx: &SolidContext, model: f64) -> String {
    let text = format!("model weight {model:.3}");
    ctx.log().info(&text);
    text
}

fn gpu_pipeline() -> Pipeline {
    Pipeline::build("gpu_pipeline", |p| {
        let data = p.invoke(load_data, ());
        let model = p.invoke(train, (data,));
        p.invoke(report, (model,));
    })
    .expect("valid pipeline")
    .with_executors(default_executors().with(dask_executor()))
}

fn main() {
    Repository::new("dask_gpu")
        .with_pipeline(gpu_pipeline())
        .main();
}
