//! Storage conformance suite: one set of tests every intermediate storage must pass.
//!
//! The cases are plain functions over a [`Backend`]; the `conformance!` macro instantiates
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
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;

use solidflow::storage::{
    FilesystemStorage, InMemoryStorage, IntermediateKey, IntermediateStorage, StorageError,
};

const MIB: usize = 1024 * 1024;

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
                super::round_trips_payloads(&backend());
            }
            #[test]
            fn overwrite_replaces_the_value() {
                super::overwrite_replaces_the_value(&backend());
            }
            #[test]
            fn failed_write_leaves_no_object() {
                super::failed_write_leaves_no_object(&backend());
            }
            #[test]
            fn failed_overwrite_keeps_the_old_value() {
                super::failed_overwrite_keeps_the_old_value(&backend());
            }
            #[test]
            fn reader_never_sees_a_value_being_written() {
                super::reader_never_sees_a_value_being_written(&backend());
            }
            #[test]
            fn readers_racing_overwrites_see_whole_values() {
                super::readers_racing_overwrites_see_whole_values(&backend());
            }
            #[test]
            fn concurrent_runs_never_collide() {
                super::concurrent_runs_never_collide(&backend());
            }
            #[test]
            fn list_run_lists_exactly_the_run() {
                super::list_run_lists_exactly_the_run(&backend());
            }
            #[test]
            fn missing_key_is_not_found() {
                super::missing_key_is_not_found(&backend());
            }
        }
    )*};
}

conformance!(in_memory, filesystem, s3);

// ---------------------------------------------------------------------------------------
// Helpers

/// Deterministic pseudo-random bytes (xorshift), different for every seed.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A value that can check itself: 8-byte seed, 8-byte length, then `payload(seed, len)`.
fn self_checking(seed: u64, len: usize) -> Vec<u8> {
    let mut out = seed.to_le_bytes().to_vec();
    out.extend_from_slice(&(len as u64).to_le_bytes());
    out.extend_from_slice(&payload(seed, len));
    out
}

fn check_self_checking(bytes: &[u8]) -> Result<u64, String> {
    if bytes.len() < 16 {
        return Err(format!(
            "value of {} bytes is shorter than its header",
            bytes.len()
        ));
    }
    let seed = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let len = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
    if bytes.len() - 16 != len {
        return Err(format!(
            "value {seed} should have {len} bytes of payload, has {}",
            bytes.len() - 16
        ));
    }
    if bytes[16..] != payload(seed, len)[..] {
        return Err(format!(
            "value {seed} has the right length but mixed content"
        ));
    }
    Ok(seed)
}

/// Writes `bytes` in chunks of `chunk` bytes, as a streaming codec would.
fn write_chunked(
    storage: &dyn IntermediateStorage,
    key: &IntermediateKey,
    bytes: &[u8],
    chunk: usize,
) -> u64 {
    storage
        .write(key, &mut |w: &mut dyn Write| {
            for piece in bytes.chunks(chunk.max(1)) {
                w.write_all(piece)?;
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("write {key} to {}: {e}", storage.kind()))
}

fn write_all(storage: &dyn IntermediateStorage, key: &IntermediateKey, bytes: &[u8]) -> u64 {
    write_chunked(storage, key, bytes, 64 * 1024 + 1)
}

fn read_all(
    storage: &dyn IntermediateStorage,
    key: &IntermediateKey,
) -> Result<Vec<u8>, StorageError> {
    let mut reader = storage.read(key)?;
    let mut out = Vec::new();
    reader
        .read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("read {key} from {}: {e}", storage.kind()));
    Ok(out)
}

fn unique_run(tag: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

fn assert_absent(storage: &dyn IntermediateStorage, key: &IntermediateKey) {
    let kind = storage.kind();
    assert!(
        !storage.exists(key).unwrap(),
        "{kind}: {key} should not exist"
    );
    match storage.read(key) {
        Err(StorageError::NotFound { .. }) => {}
        Err(other) => panic!("{kind}: reading absent {key} should be NotFound, got {other}"),
        Ok(mut r) => {
            let mut got = Vec::new();
            let _ = r.read_to_end(&mut got);
            panic!("{kind}: absent {key} was readable ({} bytes)", got.len());
        }
    }
    assert!(
        !storage.list_run(&key.run_id).unwrap().contains(key),
        "{kind}: list_run shows absent {key}"
    );
}

fn failing_write(
    storage: &dyn IntermediateStorage,
    key: &IntermediateKey,
    bytes_before_failure: usize,
) -> StorageError {
    let bytes = payload(7, bytes_before_failure);
    let result = storage.write(key, &mut |w: &mut dyn Write| {
        for piece in bytes.chunks(MIB) {
            w.write_all(piece)?;
        }
        Err(io::Error::other("encoder failed midway"))
    });
    match result {
        Ok(n) => panic!(
            "{}: a write whose callback failed returned Ok({n})",
            storage.kind()
        ),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------------------
// The cases

fn round_trips_payloads(b: &Backend) {
    let storage = &*b.storage;
    let run = unique_run("roundtrip");
    let all_bytes: Vec<u8> = (0..=255u8).cycle().take(1024).collect();
    let payloads: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("one byte", vec![0]),
        ("text", b"Hello, World!".to_vec()),
        ("every byte value", all_bytes),
        ("1 MiB", payload(1, MIB)),
        // Larger than several S3 parts (the test S3 config uses 5 MiB parts).
        ("11 MiB + 3", payload(2, 11 * MIB + 3)),
    ];
    for (i, (name, bytes)) in payloads.iter().enumerate() {
        let key = IntermediateKey::new(&run, format!("step_{i}.compute"), "result");
        assert_eq!(
            write_all(storage, &key, bytes),
            bytes.len() as u64,
            "{}: length written for {name}",
            storage.kind()
        );
        assert!(
            storage.exists(&key).unwrap(),
            "{}: {name} should exist",
            storage.kind()
        );
        let back = read_all(storage, &key).unwrap();
        assert!(
            back == *bytes,
            "{}: {name} came back different ({} bytes vs {})",
            storage.kind(),
            back.len(),
            bytes.len()
        );
    }
    // Tiny writes and tiny reads work too (codecs and decoders do both).
    let key = IntermediateKey::new(&run, "tiny.compute", "result");
    let bytes = payload(3, 100_003);
    write_chunked(storage, &key, &bytes, 7);
    let mut reader = storage.read(&key).unwrap();
    let mut back = Vec::new();
    let mut buf = [0u8; 13];
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        back.extend_from_slice(&buf[..n]);
    }
    assert!(
        back == bytes,
        "{}: value written and read in tiny pieces differs",
        storage.kind()
    );
}

fn overwrite_replaces_the_value(b: &Backend) {
    let storage = &*b.storage;
    let key = IntermediateKey::new(unique_run("overwrite"), "a.compute", "result");
    write_all(storage, &key, &payload(1, 6 * MIB));
    write_all(storage, &key, b"short");
    assert_eq!(read_all(storage, &key).unwrap(), b"short");
    assert_eq!(storage.list_run(&key.run_id).unwrap(), vec![key]);
}

fn failed_write_leaves_no_object(b: &Backend) {
    let storage = &*b.storage;
    let run = unique_run("failed");
    // Failing early (nothing sent yet) and failing late (S3: parts already uploaded).
    for (i, before_failure) in [0, 100, 6 * MIB + 17].into_iter().enumerate() {
        let key = IntermediateKey::new(&run, format!("step_{i}.compute"), "result");
        let err = failing_write(storage, &key, before_failure);
        assert!(
            err.to_string().contains("encoder failed midway"),
            "{}: the error should carry the callback's cause: {err}",
            storage.kind()
        );
        assert_absent(storage, &key);
    }
    assert!(storage.list_run(&run).unwrap().is_empty());
}

fn failed_overwrite_keeps_the_old_value(b: &Backend) {
    let storage = &*b.storage;
    let key = IntermediateKey::new(unique_run("keep"), "a.compute", "result");
    let old = payload(5, 2 * MIB);
    write_all(storage, &key, &old);
    failing_write(storage, &key, 7 * MIB);
    assert!(
        read_all(storage, &key).unwrap() == old,
        "{}: a failed overwrite damaged the old value",
        storage.kind()
    );
}

fn reader_never_sees_a_value_being_written(b: &Backend) {
    let storage = b.storage.clone();
    let key = IntermediateKey::new(unique_run("inflight"), "a.compute", "result");
    let value = payload(9, 12 * MIB);
    let (half_written, wait_half) = mpsc::sync_channel::<()>(0);
    let (checked, wait_checked) = mpsc::sync_channel::<()>(0);
    let writer = {
        let (storage, key, value) = (storage.clone(), key.clone(), value.clone());
        thread::spawn(move || {
            storage.write(&key, &mut |w: &mut dyn Write| {
                let (first, second) = value.split_at(value.len() / 2);
                w.write_all(first)?;
                // Half the value is in the storage's hands (for S3: a part is uploaded).
                half_written.send(()).unwrap();
                wait_checked.recv().unwrap();
                w.write_all(second)
            })
        })
    };
    wait_half.recv().unwrap();
    assert_absent(&*storage, &key);
    checked.send(()).unwrap();
    assert_eq!(writer.join().unwrap().unwrap(), value.len() as u64);
    assert!(read_all(&*storage, &key).unwrap() == value);
}

fn readers_racing_overwrites_see_whole_values(b: &Backend) {
    let storage = b.storage.clone();
    let key = IntermediateKey::new(unique_run("race"), "a.compute", "result");
    let writes = 12u64;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (storage, key, done) = (storage.clone(), key.clone(), done.clone());
        thread::spawn(move || {
            for seed in 1..=writes {
                // Sizes vary so a torn read would show as a wrong length, not just wrong bytes.
                let value = self_checking(seed, 256 * 1024 + (seed as usize * 7919) % 65_536);
                write_chunked(&*storage, &key, &value, 4096);
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let mut seen = std::collections::BTreeSet::new();
    loop {
        let finished = done.load(std::sync::atomic::Ordering::SeqCst);
        match read_all(&*storage, &key) {
            Ok(bytes) => {
                let seed = check_self_checking(&bytes)
                    .unwrap_or_else(|e| panic!("{}: torn read: {e}", storage.kind()));
                seen.insert(seed);
            }
            Err(StorageError::NotFound { .. }) => {
                assert!(seen.is_empty(), "a value disappeared after being visible")
            }
            Err(e) => panic!("{}: read failed during overwrites: {e}", storage.kind()),
        }
        if finished {
            break;
        }
    }
    writer.join().unwrap();
    assert!(
        seen.contains(&writes),
        "the last value should be read at the end, saw {seen:?}"
    );
}

fn concurrent_runs_never_collide(b: &Backend) {
    let storage = b.storage.clone();
    let base = unique_run("concurrent");
    // `<base>-1` is a prefix of `<base>-10`: listing one must not pick up the other.
    let runs: Vec<String> = (1..=10).map(|i| format!("{base}-{i}")).collect();
    let steps = ["load.compute", "transform.compute"];
    let outputs = ["result", "stats"];
    let content = |run: &str, step: &str, output: &str| {
        format!("{run}/{step}/{output}").repeat(100).into_bytes()
    };
    let threads: Vec<_> = runs
        .iter()
        .cloned()
        .map(|run| {
            let storage = storage.clone();
            thread::spawn(move || {
                for step in steps {
                    for output in outputs {
                        write_all(
                            &*storage,
                            &IntermediateKey::new(&run, step, output),
                            &content(&run, step, output),
                        );
                    }
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    for run in &runs {
        let mut expected = Vec::new();
        for step in steps {
            for output in outputs {
                let key = IntermediateKey::new(run, step, output);
                assert_eq!(
                    read_all(&*storage, &key).unwrap(),
                    content(run, step, output),
                    "{}: {key}",
                    storage.kind()
                );
                expected.push(key);
            }
        }
        expected.sort();
        assert_eq!(
            storage.list_run(run).unwrap(),
            expected,
            "{}: list_run({run})",
            storage.kind()
        );
    }
}

fn list_run_lists_exactly_the_run(b: &Backend) {
    let storage = &*b.storage;
    let run = unique_run("list");
    let other = format!("{run}x");
    let keys = [
        IntermediateKey::new(&run, "zeta.compute", "result"),
        IntermediateKey::new(&run, "alpha.compute", "result"),
        IntermediateKey::new(&run, "alpha.compute", "out_2"),
        IntermediateKey::new(&run, "mid_step.compute", "result"),
    ];
    for (i, key) in keys.iter().enumerate() {
        write_all(storage, key, format!("value {i}").as_bytes());
    }
    write_all(
        storage,
        &IntermediateKey::new(&other, "alpha.compute", "result"),
        b"other run",
    );
    let mut expected = keys.to_vec();
    expected.sort();
    assert_eq!(
        storage.list_run(&run).unwrap(),
        expected,
        "{}: list_run sorted, only this run",
        storage.kind()
    );
    assert_eq!(storage.list_run(&other).unwrap().len(), 1);
    assert!(
        storage
            .list_run(&unique_run("never-ran"))
            .unwrap()
            .is_empty()
    );
}

fn missing_key_is_not_found(b: &Backend) {
    let storage = &*b.storage;
    let run = unique_run("missing");
    let key = IntermediateKey::new(&run, "never_ran.compute", "result");
    match storage.read(&key) {
        Err(StorageError::NotFound { location }) => {
            assert_eq!(location, storage.location(&key));
            assert!(
                location.contains("never_ran.compute") && location.contains(&run),
                "{location}"
            );
        }
        Err(e) => panic!("{}: expected NotFound, got {e}", storage.kind()),
        Ok(_) => panic!("{}: read of a missing key succeeded", storage.kind()),
    }
    assert!(!storage.exists(&key).unwrap());
    // Another output of the same step existing changes nothing.
    write_all(
        storage,
        &IntermediateKey::new(&run, "never_ran.compute", "other"),
        b"x",
    );
    assert_absent(storage, &key);
}

// ---------------------------------------------------------------------------------------
// S3 only: the server, credentials, retries.

mod s3_only {
    use std::time::{Duration, Instant};

    use solidflow::storage::registry::{StorageContext, default_storages};
    use solidflow::storage::{
        IntermediateKey, IntermediateStorage, S3Credentials, S3Storage, StorageError,
    };

    use super::s3_support::{ACCESS_KEY, Fault, FaultProxy, S3Server, SECRET_KEY};
    use super::{payload, read_all, write_all};

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
