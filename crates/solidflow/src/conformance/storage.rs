//! The storage conformance suite: what every [`IntermediateStorage`] must do, as plain
//! functions a backend's own tests call (the pattern of `object_store`'s integration
//! tests). Enable the `conformance` feature of `solidflow` in your dev-dependencies and
//! run the whole suite against a fresh storage:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use solidflow::storage::{FilesystemStorage, IntermediateStorage};
//! let dir = tempfile::tempdir().unwrap();
//! let storage: Arc<dyn IntermediateStorage> = Arc::new(FilesystemStorage::new(dir.path()));
//! solidflow::conformance::storage::run_all(&storage);
//! ```
//!
//! Or one test per case, as `tests/storage_conformance.rs` does, by iterating [`CASES`]
//! or calling the case functions by name. A case panics with the storage's kind and
//! what it saw when the storage misbehaves. The storage must be empty of the runs the
//! cases create (each case makes up a fresh run id), writable, and may be remote: the
//! largest value written is 12 MiB.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;

use crate::storage::{IntermediateKey, IntermediateStorage, StorageError};

const MIB: usize = 1024 * 1024;

/// One case of the suite.
pub type Case = fn(&Arc<dyn IntermediateStorage>);

/// Every case, by name.
pub const CASES: &[(&str, Case)] = &[
    ("round_trips_payloads", round_trips_payloads),
    ("overwrite_replaces_the_value", overwrite_replaces_the_value),
    (
        "failed_write_leaves_no_object",
        failed_write_leaves_no_object,
    ),
    (
        "failed_overwrite_keeps_the_old_value",
        failed_overwrite_keeps_the_old_value,
    ),
    (
        "reader_never_sees_a_value_being_written",
        reader_never_sees_a_value_being_written,
    ),
    (
        "readers_racing_overwrites_see_whole_values",
        readers_racing_overwrites_see_whole_values,
    ),
    (
        "concurrent_runs_never_collide",
        concurrent_runs_never_collide,
    ),
    (
        "list_run_lists_exactly_the_run",
        list_run_lists_exactly_the_run,
    ),
    ("missing_key_is_not_found", missing_key_is_not_found),
];

/// Runs every case of [`CASES`] against `storage`, printing each name as it starts;
/// panics at the first case that fails.
pub fn run_all(storage: &Arc<dyn IntermediateStorage>) {
    for (name, case) in CASES {
        eprintln!("storage conformance: {name} ({})", storage.kind());
        case(storage);
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

/// Deterministic pseudo-random bytes (xorshift), different for every seed.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
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
pub fn write_chunked(
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

/// Writes `bytes` in 64 KiB + 1 chunks; panics naming the storage if the write fails.
pub fn write_all(storage: &dyn IntermediateStorage, key: &IntermediateKey, bytes: &[u8]) -> u64 {
    write_chunked(storage, key, bytes, 64 * 1024 + 1)
}

/// Reads the whole value under `key`.
pub fn read_all(
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

/// Values from empty to 11 MiB come back byte for byte, written and read in pieces of any size.
pub fn round_trips_payloads(storage: &Arc<dyn IntermediateStorage>) {
    let storage = &**storage;
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

/// Writing a key again replaces its value.
pub fn overwrite_replaces_the_value(storage: &Arc<dyn IntermediateStorage>) {
    let storage = &**storage;
    let key = IntermediateKey::new(unique_run("overwrite"), "a.compute", "result");
    write_all(storage, &key, &payload(1, 6 * MIB));
    write_all(storage, &key, b"short");
    assert_eq!(read_all(storage, &key).unwrap(), b"short");
    assert_eq!(storage.list_run(&key.run_id).unwrap(), vec![key]);
}

/// A write whose callback fails leaves nothing under the key.
pub fn failed_write_leaves_no_object(storage: &Arc<dyn IntermediateStorage>) {
    let storage = &**storage;
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

/// A failed overwrite keeps the value that was there.
pub fn failed_overwrite_keeps_the_old_value(storage: &Arc<dyn IntermediateStorage>) {
    let storage = &**storage;
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

/// A value being written is invisible until the write completes.
pub fn reader_never_sees_a_value_being_written(storage: &Arc<dyn IntermediateStorage>) {
    let storage = storage.clone();
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

/// Readers racing overwrites see one whole value, never a mix.
pub fn readers_racing_overwrites_see_whole_values(storage: &Arc<dyn IntermediateStorage>) {
    let storage = storage.clone();
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

/// Runs writing the same step keys at once never see each other's values.
pub fn concurrent_runs_never_collide(storage: &Arc<dyn IntermediateStorage>) {
    let storage = storage.clone();
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

/// `list_run` lists exactly the keys of the run.
pub fn list_run_lists_exactly_the_run(storage: &Arc<dyn IntermediateStorage>) {
    let storage = &**storage;
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

/// A key never written is `NotFound` (not another error) and does not exist.
pub fn missing_key_is_not_found(storage: &Arc<dyn IntermediateStorage>) {
    let storage = &**storage;
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
