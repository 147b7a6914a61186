//! A property test over the whole config path: random run configs, shaped like real ones
//! but with hostile values (huge, negative, fractional, empty, wrongly typed), go through
//! loading (YAML text), validation, plan compilation and building the executor and the
//! storage, exactly as `plan` and `execute` do before a run starts. Nothing may panic;
//! every refusal must be an error that names a config path or says what is wrong.
//! Bounded to 256 cases so it runs in seconds.

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use solidflow::config::ConfigSources;
use solidflow::execution::run::{PreparedRun, RunError, RunOptions};
use solidflow::prelude::*;

#[solid]
fn hello_world(_ctx: &SolidContext) -> String {
    "Hello, World!".to_string()
}

fn pipeline() -> Pipeline {
    Pipeline::build("dask_pipeline", |p| {
        p.invoke(hello_world, ());
    })
    .expect("valid pipeline")
    .with_executors(default_executors().with(dask_executor()))
}

const KEYS: &[&str] = &[
    "base_dir",
    "shared",
    "s3_bucket",
    "s3_prefix",
    "region",
    "endpoint_url",
    "allow_http",
    "max_retries",
    "retry_timeout_secs",
    "part_size_mb",
    "concurrency",
    "read_concurrency",
    "max_concurrent",
    "resources",
    "GPU",
    "timeout",
    "address",
    "tls",
    "ca_file",
    "cert",
    "cluster",
    "local",
    "slurm",
    "existing",
    "adapt",
    "minimum",
    "maximum",
    "n_workers",
    "threads_per_worker",
    "memory_limit",
    "python",
    "executable",
    "ship_binary",
    "keep_builds",
    "critical_path_priority",
    "allowed_failures",
    "env",
    "forward_env",
    "delay",
    "backoff",
    "jitter",
    "typo",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![
            Just(1e30),
            Just(1e308),
            Just(-1.0),
            Just(-5.0),
            Just(0.0),
            Just(0.5),
            Just(18446744073709551616.0),
            any::<f64>().prop_filter("finite", |f| f.is_finite()),
        ]
        .prop_map(|f| json!(f)),
        prop_oneof![
            Just(String::new()),
            Just("x".to_string()),
            Just("../../escaped".to_string()),
            Just("tcp://127.0.0.1:1".to_string()),
            Just("http://127.0.0.1:1".to_string()),
            "[a-z]{0,8}",
        ]
        .prop_map(Value::from),
    ]
}

/// A config block: a map of likely keys to leaves, nested maps or lists.
fn block() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map(prop::sample::select(KEYS), inner, 0..6).prop_map(|m| {
                Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

fn selector(names: &'static [&'static str]) -> impl Strategy<Value = Value> {
    (prop::sample::select(names), block(), any::<bool>()).prop_map(|(name, config, wrap)| {
        if wrap {
            json!({ name: { "config": config } })
        } else {
            json!({ name: config })
        }
    })
}

fn run_config() -> impl Strategy<Value = Value> {
    (
        prop::option::of(selector(&["in_memory", "filesystem", "s3", "nfs"])),
        prop::option::of(selector(&["in_process", "multiprocess", "dask"])),
        prop::option::of(block()),
        prop::option::of(leaf()),
    )
        .prop_map(|(storage, execution, retry, log_level)| {
            let mut root = Map::new();
            if let Some(s) = storage {
                root.insert("storage".into(), s);
            }
            if let Some(e) = execution {
                root.insert("execution".into(), e);
            }
            if let Some(r) = retry {
                root.insert("solids".into(), json!({"hello_world": {"retry": r}}));
            }
            if let Some(l) = log_level {
                root.insert(
                    "loggers".into(),
                    json!({"console": {"config": {"log_level": l}}}),
                );
            }
            Value::Object(root)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_config_panics_on_the_way_to_a_run(config in run_config()) {
        let home = tempfile::tempdir().unwrap();
        let text = serde_json::to_string_pretty(&config).unwrap();
        let mut sources = ConfigSources::empty();
        sources.merge_text("fuzz.yaml", &text).expect("JSON is YAML");
        let options = RunOptions { home: Some(home.path().to_path_buf()), ..RunOptions::default() };
        let pipeline = pipeline();
        match PreparedRun::new(&pipeline, &sources, &options) {
            Ok(prepared) => prop_assert_eq!(prepared.plan().steps.len(), 1),
            Err(RunError::Config(errors)) => {
                prop_assert!(!errors.errors.is_empty());
                for e in &errors.errors {
                    prop_assert!(!e.message.is_empty(), "{}", text);
                }
            }
            Err(e) => prop_assert!(!e.to_string().is_empty(), "{}", text),
        }
        // Nothing is written before a run starts.
        prop_assert!(std::fs::read_dir(home.path()).unwrap().next().is_none());
    }
}
