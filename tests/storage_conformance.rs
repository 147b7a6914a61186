//! Storage conformance suite: one set of tests every intermediate storage must pass.
//!
//! The cases are the kit in `solidflow::conformance::storage` (the `conformance` feature),
//! which a third-party storage runs the same way; the `conformance!` macro instantiates
//! every case once per backend (`in_memory`, `filesystem`, `s3`), so a new storage gets the
//! whole suite by adding one constructor and one name to the macro call. The `s3` backend
//! runs against a real S3 server (s3s-fs, see `tests/support/s3.rs`); install it with
//! `scripts/s3-server.sh`. Tests that only make sense for S3 (credentials, retries,
//! preflight against a server) are in the `s3_only` module at the end.
//!
//! Run: `cargo test --test storage_conformance`.

#[path = "support/s3.rs"]
mod s3_support;

use std::any::Any;
use std::sync::Arc;

use solidflow::conformance::storage as kit;
use solidflow::storage::{FilesystemStorage, InMemoryStorage, IntermediateStorage};

/// A storage under test plus whatever must live as long as it (temp dir, server).
pub struct Backend {
    storage: Arc<dyn IntermediateStorage>,
    _guard: Box<dyn Any>,
}

fn in_memory() -> Backend {
    Backend {
        storage: Arc::new(InMemoryStorage::new()),
        _guard: Box::new(()),
    }
}

fn filesystem() -> Backend {
    let dir = tempfile::tempdir().expect("temp dir");
    let storage = FilesystemStorage::new(dir.path().join("storage"));
    storage.preflight().expect("filesystem preflight");
    Backend {
        storage: Arc::new(storage),
        _guard: Box::new(dir),
    }
}

fn s3() -> Backend {
    let server = s3_support::S3Server::start();
    let storage = server.storage("conformance");
    storage
        .preflight()
        .unwrap_or_else(|e| panic!("S3 preflight failed: {e}\nserver log:\n{}", server.log()));
    Backend {
        storage: Arc::new(storage),
        _guard: Box::new(server),
    }
}

macro_rules! conformance {
    ($($backend:ident),* $(,)?) => {$(
        mod $backend {
            fn backend() -> super::Backend {
                super::$backend()
            }
            #[test]
            fn round_trips_payloads() {
                super::kit::round_trips_payloads(&backend().storage);
            }
            #[test]
            fn overwrite_replaces_the_value() {
                super::kit::overwrite_replaces_the_value(&backend().storage);
            }
            #[test]
            fn failed_write_leaves_no_object() {
                super::kit::failed_write_leaves_no_object(&backend().storage);
            }
            #[test]
            fn failed_overwrite_keeps_the_old_value() {
                super::kit::failed_overwrite_keeps_the_old_value(&backend().storage);
            }
            #[test]
            fn reader_never_sees_a_value_being_written() {
                super::kit::reader_never_sees_a_value_being_written(&backend().storage);
            }
            #[test]
            fn readers_racing_overwrites_see_whole_values() {
                super::kit::readers_racing_overwrites_see_whole_values(&backend().storage);
            }
            #[test]
            fn concurrent_runs_never_collide() {
                super::kit::concurrent_runs_never_collide(&backend().storage);
            }
            #[test]
            fn list_run_lists_exactly_the_run() {
                super::kit::list_run_lists_exactly_the_run(&backend().storage);
            }
            #[test]
            fn missing_key_is_not_found() {
                super::kit::missing_key_is_not_found(&backend().storage);
            }
        }
    )*};
}

conformance!(in_memory, filesystem, s3);

/// A case added to the kit must be added to `conformance!` above, too.
#[test]
fn every_case_of_the_kit_is_instantiated() {
    let listed = include_str!("storage_conformance.rs");
    for (name, _) in kit::CASES {
        assert!(
            listed.contains(&format!("super::kit::{name}(")),
            "add `{name}` to the conformance! macro"
        );
    }
}

/// The kit's one-call entry point, as a third-party storage would use it.
#[test]
fn run_all_passes_on_the_filesystem() {
    kit::run_all(&filesystem().storage);
}

// ---------------------------------------------------------------------------------------
// Helpers

mod s3_only {
    use std::time::{Duration, Instant};

    use solidflow::storage::registry::{StorageContext, default_storages};
    use solidflow::storage::{
        IntermediateKey, IntermediateStorage, S3Credentials, S3Storage, StorageError,
    };

    use super::s3_support::{ACCESS_KEY, Fault, FaultProxy, S3Server, SECRET_KEY};
    use solidflow::conformance::storage::{payload, read_all, write_all};

    fn assert_no_secrets(what: &str, text: &str) {
        for secret in [
            SECRET_KEY,
            ACCESS_KEY,
            "wrong-secret-do-not-print",
            "wrong-access-key",
        ] {
            assert!(
                !text.contains(secret),
                "{what} leaks a credential ({secret}): {text}"
            );
        }
    }

    #[test]
    fn wrong_secret_is_rejected_and_not_printed() {
        let server = S3Server::start();
        server.create_bucket("bkt");
        let mut config = server.config("bkt");
        config.credentials = Some(S3Credentials::new(ACCESS_KEY, "wrong-secret-do-not-print"));
        let storage = S3Storage::new(config).unwrap();
        let err = storage
            .preflight()
            .expect_err("the server must reject a wrong secret");
        let text = err.to_string();
        assert!(matches!(err, StorageError::Unusable { .. }), "{text}");
        assert!(
            text.contains("credentials"),
            "the message should point at the credentials: {text}"
        );
        assert_no_secrets("preflight error", &text);
        assert_no_secrets("preflight error (debug)", &format!("{err:?}"));

        let key = IntermediateKey::new("r", "a.compute", "result");
        let err = storage
            .write(&key, &mut |w| w.write_all(b"x"))
            .expect_err("write with a wrong secret");
        assert_no_secrets("write error", &format!("{err} {err:?}"));
        let err = storage.read(&key).err().expect("read with a wrong secret");
        assert_no_secrets("read error", &format!("{err} {err:?}"));

        let mut config = server.config("bkt");
        config.credentials = Some(S3Credentials::new("wrong-access-key", SECRET_KEY));
        let err = S3Storage::new(config)
            .unwrap()
            .preflight()
            .expect_err("unknown access key");
        assert_no_secrets("preflight error", &format!("{err} {err:?}"));
    }

    #[test]
    fn credentials_never_appear_in_debug_location_or_errors() {
        let server = S3Server::start();
        let storage = server.storage("bkt");
        let key = IntermediateKey::new("r", "a.compute", "result");
        assert_no_secrets("Debug", &format!("{storage:?}"));
        assert_no_secrets("location", &storage.location(&key));
        let err = storage.read(&key).err().unwrap();
        assert_no_secrets("NotFound", &format!("{err} {err:?}"));
        write_all(&storage, &key, b"v");
        let err = storage
            .write(&key, &mut |_| Err(std::io::Error::other("boom")))
            .unwrap_err();
        assert_no_secrets("failed write", &format!("{err} {err:?}"));
    }

    #[test]
    fn missing_bucket_fails_preflight() {
        let server = S3Server::start();
        let storage = S3Storage::new(server.config("no-such-bucket")).unwrap();
        let err = storage.preflight().expect_err("missing bucket");
        let text = err.to_string();
        assert!(
            text.contains("no-such-bucket") && text.contains("does not exist"),
            "{text}"
        );
    }

    #[test]
    fn unreachable_endpoint_fails_preflight_quickly() {
        let server = S3Server::start();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let storage = S3Storage::new(server.config_via("bkt", &endpoint)).unwrap();
        let started = Instant::now();
        let err = storage.preflight().expect_err("nothing listens there");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "preflight took {:?}",
            started.elapsed()
        );
        assert!(err.to_string().contains(&endpoint), "{err}");
    }

    #[test]
    fn throttling_is_retried() {
        let server = S3Server::start();
        server.create_bucket("bkt");
        let proxy = FaultProxy::start(server.addr(), Fault::SlowDown, 3);
        let storage = S3Storage::new(server.config_via("bkt", &proxy.endpoint())).unwrap();
        let key = IntermediateKey::new("r", "a.compute", "result");
        let value = payload(1, 300_000);
        write_all(&storage, &key, &value);
        assert!(read_all(&storage, &key).unwrap() == value);
        assert_eq!(
            proxy.faults_served(),
            3,
            "every injected 503 should have been retried"
        );
    }

    #[test]
    fn dropped_connections_are_retried() {
        let server = S3Server::start();
        server.create_bucket("bkt");
        let proxy = FaultProxy::start(server.addr(), Fault::Reset, 2);
        let storage = S3Storage::new(server.config_via("bkt", &proxy.endpoint())).unwrap();
        let key = IntermediateKey::new("r", "a.compute", "result");
        let value = payload(2, 6 * 1024 * 1024 + 5);
        write_all(&storage, &key, &value);
        assert!(read_all(&storage, &key).unwrap() == value);
        assert_eq!(proxy.faults_served(), 2);
    }

    #[test]
    fn persistent_failure_names_bucket_key_and_cause() {
        let server = S3Server::start();
        server.create_bucket("the-bucket");
        let proxy = FaultProxy::start(server.addr(), Fault::SlowDown, usize::MAX);
        let mut config = server.config_via("the-bucket", &proxy.endpoint());
        config.max_retries = 1;
        let storage = S3Storage::new(config).unwrap();
        let key = IntermediateKey::new("run-9", "a.compute", "result");
        let err = storage.write(&key, &mut |w| w.write_all(b"x")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("s3://the-bucket/solidflow/run-9/intermediates/a.compute/result"),
            "{text}"
        );
        assert!(
            text.contains("503"),
            "the cause should be in the message: {text}"
        );
        let err = storage.read(&key).err().unwrap().to_string();
        assert!(
            err.contains("s3://the-bucket/") && err.contains("503"),
            "{err}"
        );
        assert!(proxy.faults_served() >= 4);
    }

    #[test]
    fn objects_live_under_prefix_run_and_step() {
        let server = S3Server::start();
        server.create_bucket("bkt");
        let mut config = server.config("bkt");
        config.prefix = "team/nightly".into();
        let storage = S3Storage::new(config).unwrap();
        let key = IntermediateKey::new("run-1", "hello_world.compute", "result");
        write_all(&storage, &key, b"Hello, World!");
        let file = server
            .data_dir()
            .join("bkt/team/nightly/run-1/intermediates/hello_world.compute/result");
        assert_eq!(
            std::fs::read(&file).unwrap(),
            b"Hello, World!",
            "object at {}",
            file.display()
        );
        assert_eq!(
            storage.location(&key),
            "s3://bkt/team/nightly/run-1/intermediates/hello_world.compute/result"
        );
    }

    #[test]
    fn works_when_called_from_inside_a_tokio_runtime() {
        let server = S3Server::start();
        let storage = server.storage("bkt");
        let key = IntermediateKey::new("r", "a.compute", "result");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // An executor calling storage from async code must not hit "cannot block_on inside a runtime".
        let back = runtime.block_on(async {
            write_all(&storage, &key, &payload(4, 6 * 1024 * 1024));
            read_all(&storage, &key).unwrap()
        });
        assert!(back == payload(4, 6 * 1024 * 1024));
        drop(runtime);
    }

    /// The conformance pipeline binary, run through its CLI.
    fn pipeline_binary() -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_conformance"));
        command.env("AWS_EC2_METADATA_DISABLED", "true");
        // Only what the test sets: no credentials, profile or region from the machine.
        for var in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
        ] {
            command.env_remove(var);
        }
        command.env("NO_COLOR", "1");
        command
    }

    fn text_of(output: &std::process::Output) -> String {
        format!(
            "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            output.status.code(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    /// A whole pipeline on `storage: s3` from run config: the conformance binary's
    /// `success` pipeline (numbers → sum_evens, sum_odds → total) run through its CLI, with
    /// credentials only in the child's standard AWS env vars. Also checks that `plan`,
    /// `config-schema`, `runs` and `logs` never show them, and that a wrong secret stops
    /// the run before its first step without being printed.
    #[test]
    fn pipeline_binary_runs_on_s3_with_env_credentials() {
        let server = S3Server::start();
        server.create_bucket("pipeline-bkt");
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        let config = tmp.path().join("s3.yaml");
        std::fs::write(
            &config,
            format!(
                "storage: {{s3: {{config: {{s3_bucket: pipeline-bkt, s3_prefix: e2e, endpoint_url: '{}', allow_http: true}}}}}}\n\
                 execution: {{in_process: {{}}}}\n",
                server.endpoint()
            ),
        )
        .unwrap();
        let cli = |args: &[&str], secret: &str| {
            pipeline_binary()
                .args(args)
                .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
                .env("AWS_SECRET_ACCESS_KEY", secret)
                .env("SOLIDFLOW_HOME", &home)
                .output()
                .expect("start the conformance binary")
        };
        let config_arg = config.to_str().unwrap();

        let output = cli(
            &["execute", "success", "-c", config_arg, "--json"],
            SECRET_KEY,
        );
        let text = text_of(&output);
        assert!(output.status.success(), "the run failed:\n{text}");
        assert_no_secrets("execute output", &text);
        let events: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let run_id = events[0]["run_id"].as_str().expect("run id").to_string();
        assert_eq!(events[0]["data"]["storage"], "s3", "{text}");
        // Every output went to the bucket, under the prefix and the run.
        let locations: Vec<&str> = events
            .iter()
            .filter(|e| e["event_type"] == "STEP_OUTPUT")
            .map(|e| e["data"]["location"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(locations.len(), 4, "{text}");
        for step in ["numbers", "sum_evens", "sum_odds", "total"] {
            let expected =
                format!("s3://pipeline-bkt/e2e/{run_id}/intermediates/{step}.compute/result");
            assert!(
                locations.contains(&expected.as_str()),
                "{expected} not among {locations:?}"
            );
        }
        // `total` read both sums back from S3.
        assert!(
            events
                .iter()
                .any(|e| e["step_key"] == "total.compute" && e["message"] == "total=55"),
            "{text}"
        );
        // The intermediates are in the bucket: listed through the S3 API and on the server's disk.
        let mut settings = server.config("pipeline-bkt");
        settings.prefix = "e2e".into();
        let keys = S3Storage::new(settings).unwrap().list_run(&run_id).unwrap();
        let steps: Vec<&str> = keys.iter().map(|k| k.step_key.as_str()).collect();
        assert_eq!(
            steps,
            [
                "numbers.compute",
                "sum_evens.compute",
                "sum_odds.compute",
                "total.compute"
            ]
        );
        assert!(
            server
                .data_dir()
                .join(format!(
                    "pipeline-bkt/e2e/{run_id}/intermediates/total.compute/result"
                ))
                .is_file()
        );

        // Inspection commands, with the credentials in the environment, never show them.
        for args in [
            vec!["plan", "success", "-c", config_arg],
            vec!["plan", "success", "-c", config_arg, "--json"],
            vec!["config-schema", "success"],
            vec!["config-schema", "success", "--json"],
            vec!["runs", "--json"],
            vec!["logs", run_id.as_str()],
        ] {
            let output = cli(&args, SECRET_KEY);
            let text = text_of(&output);
            assert!(output.status.success(), "{args:?}:\n{text}");
            assert_no_secrets(&format!("`{}`", args.join(" ")), &text);
        }

        // A wrong secret: rejected by the preflight before any step, and not printed.
        let output = cli(
            &["execute", "success", "-c", config_arg, "--json"],
            "wrong-secret-do-not-print",
        );
        let text = text_of(&output);
        assert!(
            !output.status.success(),
            "a wrong secret was accepted:\n{text}"
        );
        assert!(!text.contains("STEP_START"), "a step ran:\n{text}");
        assert!(
            text.contains("credentials"),
            "the error should point at the credentials:\n{text}"
        );
        assert_no_secrets("output of a run with a wrong secret", &text);
        let runs = std::fs::read_dir(server.data_dir().join("pipeline-bkt/e2e"))
            .unwrap()
            .count();
        assert_eq!(runs, 1, "only the first run wrote under the prefix");
    }

    #[test]
    fn registry_builds_s3_from_run_config() {
        let server = S3Server::start();
        let def = default_storages()
            .into_iter()
            .find(|d| d.name == "s3")
            .expect("s3 is a default storage");
        let config = serde_json::json!({
            "s3_bucket": "bkt", "s3_prefix": "p", "endpoint_url": server.endpoint(), "allow_http": true
        });
        let ctx = StorageContext {
            home: std::env::temp_dir(),
        };
        let storage = (def.build)(&config, &ctx).expect("build s3 storage");
        assert_eq!(storage.kind(), "s3");
        let key = IntermediateKey::new("r", "a.compute", "result");
        assert_eq!(
            storage.location(&key),
            "s3://bkt/p/r/intermediates/a.compute/result"
        );
    }
}
