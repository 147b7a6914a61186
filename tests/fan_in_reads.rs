//! Fan-in reads: a step with many stored inputs reads several of them at once (up to the
//! storage's `read_concurrency`), and every value still arrives under its own input, in
//! order, on filesystem storage and on S3 (a real s3s-fs server, see `support/s3.rs`).
//!
//! Run: `cargo test --test fan_in_reads`.

#[path = "support/s3.rs"]
mod s3_support;

use std::sync::Arc;

use serde_json::{Value, json};
use solidflow::config::ConfigSources;
use solidflow::config::schema::ConfigType;
use solidflow::definition::mode::Mode;
use solidflow::definition::pipeline::{InputSource, OutputRef, Pipeline, RawHandle};
use solidflow::definition::solid::{Outputs, SolidDefinition};
use solidflow::definition::storage::{StorageContext, StorageDefinition};
use solidflow::definition::types::TypeInfo;
use solidflow::execution::event::EventKind;
use solidflow::execution::run::{RunOptions, execute_pipeline_with};
use solidflow::storage::registry::default_storages;
use solidflow::storage::{IntermediateStorage, S3Config, S3Credentials, S3Storage, StorageError};

/// Leaves wired into the gathering step: more than any storage's default read concurrency.
const N: usize = 100;

fn leaf_value(i: usize) -> i64 {
    i as i64 * 1_000 + 7
}

/// `N` leaves, each producing its own value, and `gather`, which returns its inputs
/// `x0..x{N-1}` as a list in input order.
fn pipeline() -> Pipeline {
    let mut gather = SolidDefinition::new("gather", |_, mut inputs| {
        let values = (0..N)
            .map(|i| inputs.take::<i64>(&format!("x{i}")))
            .collect::<Result<Vec<i64>, _>>()?;
        Ok(Outputs::result(values))
    })
    .output("result", TypeInfo::of::<Vec<i64>>());
    for i in 0..N {
        gather = gather.input(format!("x{i}"), TypeInfo::of::<i64>());
    }
    let mut storages = default_storages();
    storages.push(test_s3());
    Pipeline::build("fan_in", |p| {
        let mut wires = Vec::new();
        for i in 0..N {
            let leaf = SolidDefinition::new("leaf", move |_, _| Ok(Outputs::result(leaf_value(i))))
                .output("result", TypeInfo::of::<i64>());
            p.add(&format!("leaf{i}"), leaf, vec![]);
            wires.push((format!("x{i}"), p.result(&format!("leaf{i}"))));
        }
        p.add("gather", gather, wires);
    })
    .expect("valid fan-in")
    .with_modes([Mode::new("default").storages(storages)])
}

/// S3 storage on the test server: `{endpoint, bucket}` from its config block, the test
/// server's credentials (so nothing has to be put in this process's environment).
fn test_s3() -> StorageDefinition {
    fn build(
        config: &Value,
        _: &StorageContext,
    ) -> Result<Arc<dyn IntermediateStorage>, StorageError> {
        let field = |name: &str| config[name].as_str().unwrap_or_default().to_string();
        let mut s3 = S3Config::new(field("bucket"));
        s3.endpoint_url = Some(field("endpoint"));
        s3.allow_http = true;
        s3.credentials = Some(S3Credentials::new(
            s3_support::ACCESS_KEY,
            s3_support::SECRET_KEY,
        ));
        Ok(Arc::new(S3Storage::new(s3)?))
    }
    StorageDefinition {
        name: "test_s3",
        description: "S3 on the test's s3s-fs server",
        config: || ConfigType::Any,
        build,
    }
}

fn run_and_check(storage: Value) {
    let home = tempfile::tempdir().expect("temp dir");
    let config = json!({"storage": storage, "execution": {"in_process": {}}});
    let result = execute_pipeline_with(
        &pipeline(),
        &ConfigSources::from_value(config),
        RunOptions {
            home: Some(home.path().to_path_buf()),
            ..Default::default()
        },
    )
    .expect("run starts");
    assert!(result.success(), "run failed: {:#?}", result.events());
    let expected: Vec<i64> = (0..N).map(leaf_value).collect();
    assert_eq!(
        result.result::<Vec<i64>>("gather").expect("gather"),
        expected
    );
    let inputs: Vec<(String, String)> = result
        .step_events("gather.compute")
        .filter_map(|e| match &e.kind {
            EventKind::StepInput { input, source, .. } => Some((input.clone(), source.clone())),
            _ => None,
        })
        .collect();
    let wanted: Vec<(String, String)> = (0..N)
        .map(|i| (format!("x{i}"), format!("leaf{i}.compute.result")))
        .collect();
    assert_eq!(inputs, wanted, "one STEP_INPUT per input, in input order");
}

#[test]
fn fan_in_reads_every_value_in_order_on_filesystem() {
    run_and_check(json!({"filesystem": {}}));
}

#[test]
fn fan_in_reads_every_value_in_order_on_s3() {
    let server = s3_support::S3Server::start();
    server.create_bucket("fanin");
    run_and_check(json!({"test_s3": {"config": {
        "endpoint": server.endpoint(),
        "bucket": "fanin",
    }}}));
}

/// Filesystem storage that counts the reads in flight (each read is held for a few
/// milliseconds, so reads that run at once overlap) and reads at most `LIMIT` at once.
#[derive(Debug)]
struct CountingStorage {
    inner: solidflow::storage::FilesystemStorage,
    in_flight: std::sync::atomic::AtomicUsize,
    most: Arc<std::sync::atomic::AtomicUsize>,
}

const LIMIT: usize = 4;

impl IntermediateStorage for CountingStorage {
    fn kind(&self) -> &'static str {
        "counting"
    }
    fn reach(&self) -> solidflow::storage::Reach {
        self.inner.reach()
    }
    fn location(&self, key: &solidflow::storage::IntermediateKey) -> String {
        self.inner.location(key)
    }
    fn write(
        &self,
        key: &solidflow::storage::IntermediateKey,
        write: solidflow::storage::WriteFn<'_>,
    ) -> Result<u64, StorageError> {
        self.inner.write(key, write)
    }
    fn read(
        &self,
        key: &solidflow::storage::IntermediateKey,
    ) -> Result<Box<dyn std::io::Read + Send>, StorageError> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.in_flight.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(now, SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let reader = self.inner.read(key);
        self.in_flight.fetch_sub(1, SeqCst);
        reader
    }
    fn read_concurrency(&self) -> usize {
        LIMIT
    }
    fn exists(&self, key: &solidflow::storage::IntermediateKey) -> Result<bool, StorageError> {
        self.inner.exists(key)
    }
    fn list_run(
        &self,
        run_id: &str,
    ) -> Result<Vec<solidflow::storage::IntermediateKey>, StorageError> {
        self.inner.list_run(run_id)
    }
}

static MOST_IN_FLIGHT: std::sync::LazyLock<Arc<std::sync::atomic::AtomicUsize>> =
    std::sync::LazyLock::new(Default::default);

fn counting_storage() -> StorageDefinition {
    fn build(
        config: &Value,
        _: &StorageContext,
    ) -> Result<Arc<dyn IntermediateStorage>, StorageError> {
        let dir = config["dir"].as_str().unwrap_or_default();
        Ok(Arc::new(CountingStorage {
            inner: solidflow::storage::FilesystemStorage::new(dir),
            in_flight: Default::default(),
            most: MOST_IN_FLIGHT.clone(),
        }))
    }
    StorageDefinition {
        name: "counting",
        description: "filesystem storage that counts reads in flight",
        config: || ConfigType::Any,
        build,
    }
}

/// `N` leaves wired into `gather` as one typed fan-in (`Vec<i64>`).
fn typed_fan_in() -> Pipeline {
    let gather = SolidDefinition::new("gather", |_, mut inputs| {
        Ok(Outputs::result(inputs.take::<Vec<i64>>("values")?))
    })
    .input("values", TypeInfo::of::<Vec<i64>>())
    .output("result", TypeInfo::of::<Vec<i64>>());
    Pipeline::build("typed_fan_in", |p| {
        let mut sources = Vec::new();
        for i in 0..N {
            let leaf = SolidDefinition::new("leaf", move |_, _| Ok(Outputs::result(leaf_value(i))))
                .output("result", TypeInfo::of::<i64>());
            p.add(&format!("leaf{i}"), leaf, vec![]);
            sources.push(OutputRef {
                solid: format!("leaf{i}"),
                output: "result".into(),
            });
        }
        let fan_in = RawHandle(InputSource::FanIn { sources });
        p.add("gather", gather, vec![("values".to_string(), fan_in)]);
    })
    .expect("valid typed fan-in")
}

/// Both wirings of a fan-in (one input per upstream, and one `Vec<T>` input gathered
/// from many) read several values at once, never more than the storage's
/// `read_concurrency`, and the values arrive in order.
#[test]
fn fan_in_reads_overlap_up_to_read_concurrency() {
    use std::sync::atomic::Ordering::SeqCst;
    for (name, pipeline) in [
        ("one input per upstream", pipeline()),
        ("typed Vec<i64> fan-in", typed_fan_in()),
    ] {
        let home = tempfile::tempdir().expect("temp dir");
        let mut storages = default_storages();
        storages.push(counting_storage());
        let pipeline = pipeline.with_modes([Mode::new("default").storages(storages)]);
        let config = json!({
            "storage": {"counting": {"config": {"dir": home.path().join("values")}}},
            "execution": {"in_process": {"config": {"max_concurrent": 1}}},
        });
        MOST_IN_FLIGHT.store(0, SeqCst);
        let result = execute_pipeline_with(
            &pipeline,
            &ConfigSources::from_value(config),
            RunOptions {
                home: Some(home.path().to_path_buf()),
                ..Default::default()
            },
        )
        .expect("run starts");
        assert!(
            result.success(),
            "{name}: run failed: {:#?}",
            result.events()
        );
        let expected: Vec<i64> = (0..N).map(leaf_value).collect();
        assert_eq!(
            result.result::<Vec<i64>>("gather").expect("gather"),
            expected,
            "{name}"
        );
        let most = MOST_IN_FLIGHT.load(SeqCst);
        assert!(
            (2..=LIMIT).contains(&most),
            "{name}: {most} reads were in flight at most; expected between 2 and read_concurrency ({LIMIT})"
        );
    }
}
