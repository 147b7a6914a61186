//! Storage throughput: writing and reading one large intermediate through solidflow's
//! `filesystem` and `s3` storages, next to raw `object_store` put/get of the same bytes.
//!
//! ```text
//! scripts/s3-server.sh            # once: installs the local S3 server (s3s-fs)
//! cargo bench --bench storage_throughput
//! SOLIDFLOW_BENCH_SIZES_MB=100 SOLIDFLOW_BENCH_REPS=5 cargo bench --bench storage_throughput
//! SOLIDFLOW_BENCH_ONLY=table SOLIDFLOW_BENCH_TABLE_MB=1000 cargo bench --bench storage_throughput
//! ```
//!
//! The `table` part (always run last, alone with `SOLIDFLOW_BENCH_ONLY=table`) moves an
//! Arrow [`Table`] of `SOLIDFLOW_BENCH_TABLE_MB` (default 1000) through the S3 storage with
//! the engine's own codec path, `TypeInfo::encode`/`decode`: the producer's batches are
//! made one at a time as the upload asks for them, and the reader iterates the batches of
//! the decoded table, so peak memory must stay bounded by the part budget, not the table.
//!
//! For every size (default 100 MB and 1 GB) and backend it measures write and read
//! throughput (best of `SOLIDFLOW_BENCH_REPS`, default 3) and the peak resident memory of
//! the process during the operation: `VmHWM` is reset through `/proc/self/clear_refs`
//! before each operation and read after it; the table shows how far it rose above the RSS
//! at the start of the operation (the largest over the repetitions).
//!
//! - `solidflow` writes stream the value from a 1 MiB block into the storage's writer, as a
//!   codec does; reads stream it out through `io::copy` into a sink that checks the length.
//! - `raw` is `object_store` itself with the whole value in memory: one `put` of the full
//!   payload and one `get(..).bytes()`, the simplest way to move the bytes with the crate.
//!   Its peak memory therefore includes the value itself.
//!
//! The S3 server runs locally (s3s-fs, on the same 2 cores as the client), so the S3
//! numbers measure the client's overhead against the same server, not AWS.

#[path = "../tests/support/s3.rs"]
mod s3_support;

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use solidflow::storage::{FilesystemStorage, IntermediateKey, IntermediateStorage, S3Storage};

const MB: usize = 1_000_000;

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let sizes: Vec<usize> = std::env::var("SOLIDFLOW_BENCH_SIZES_MB")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .expect("SOLIDFLOW_BENCH_SIZES_MB: comma-separated MB")
                * MB
        })
        .collect();
    // SOLIDFLOW_BENCH_RAW=0 measures only solidflow (e.g. for /usr/bin/time's whole-process peak).
    let with_raw = std::env::var("SOLIDFLOW_BENCH_RAW").map_or(true, |v| v != "0");
    let reps: usize = std::env::var("SOLIDFLOW_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);

    let server = s3_support::S3Server::start();
    server.create_bucket("bench");
    let mut s3_config = server.config("bench");
    // The storage's defaults, not the tests' small parts.
    let defaults = solidflow::storage::S3Config::new("bench");
    s3_config.part_size = defaults.part_size;
    s3_config.concurrency = defaults.concurrency;
    s3_config.max_retries = defaults.max_retries;
    if let Some(mb) = std::env::var("SOLIDFLOW_BENCH_S3_PART_MB")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
    {
        s3_config.part_size = mb * 1024 * 1024;
    }
    if let Some(n) = std::env::var("SOLIDFLOW_BENCH_S3_CONCURRENCY")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        s3_config.concurrency = n;
    }
    let (part_size, concurrency) = (s3_config.part_size, s3_config.concurrency);
    println!(
        "s3: part size {} MiB, concurrency {concurrency}",
        part_size >> 20
    );
    let s3 = S3Storage::new(s3_config).expect("s3 storage");
    let raw_s3: Arc<dyn ObjectStore> = Arc::new(
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name("bench")
            .with_region("us-east-1")
            .with_endpoint(server.endpoint())
            .with_allow_http(true)
            .with_access_key_id(s3_support::ACCESS_KEY)
            .with_secret_access_key(s3_support::SECRET_KEY)
            .build()
            .expect("raw s3 store"),
    );
    let fs_dir = tempfile::tempdir().expect("temp dir");
    let fs = FilesystemStorage::new(fs_dir.path().join("storage"));
    let raw_fs_dir = fs_dir.path().join("raw");
    std::fs::create_dir_all(&raw_fs_dir).unwrap();
    let raw_fs: Arc<dyn ObjectStore> = Arc::new(
        object_store::local::LocalFileSystem::new_with_prefix(&raw_fs_dir)
            .expect("raw local store"),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let only_table = std::env::var("SOLIDFLOW_BENCH_ONLY").is_ok_and(|v| v == "table");
    let sizes = if only_table { Vec::new() } else { sizes };
    let block = random_block(1 << 20);
    println!(
        "| size | backend | write MB/s | write peak RSS (growth) | read MB/s | read peak RSS (growth) | vs raw (write / read) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &size in &sizes {
        let mut rows = Vec::new();
        for (name, storage) in [
            ("filesystem", &fs as &dyn IntermediateStorage),
            ("s3", &s3 as &dyn IntermediateStorage),
        ] {
            let key = IntermediateKey::new("bench-run", "big.compute", format!("result_{size}"));
            let ours = measure(
                reps,
                size,
                || solidflow_write(storage, &key, &block, size),
                || solidflow_read(storage, &key, size),
            );
            if !with_raw {
                println!(
                    "| {} MB | solidflow {name} | {:.0} | {} | {:.0} | {} | |",
                    size / MB,
                    ours.write_mbps,
                    ours.write_peak,
                    ours.read_mbps,
                    ours.read_peak
                );
                continue;
            }
            let raw_store = if name == "s3" { &raw_s3 } else { &raw_fs };
            let path = ObjectPath::from(format!("raw/result_{size}"));
            let payload = {
                let mut all = Vec::with_capacity(size);
                while all.len() < size {
                    let n = block.len().min(size - all.len());
                    all.extend_from_slice(&block[..n]);
                }
                PutPayload::from(all)
            };
            let raw = measure(
                reps,
                size,
                || {
                    runtime
                        .block_on(raw_store.put(&path, payload.clone()))
                        .expect("raw put");
                },
                || {
                    let bytes = runtime
                        .block_on(async { raw_store.get(&path).await?.bytes().await })
                        .expect("raw get");
                    assert_eq!(bytes.len(), size);
                },
            );
            drop(payload);
            // object_store's own streaming upload, with the same part size and concurrency.
            let multipart = (name == "s3").then(|| {
                measure(
                    reps,
                    size,
                    || {
                        runtime.block_on(async {
                            let upload =
                                raw_store.put_multipart(&path).await.expect("raw multipart");
                            let mut writer = object_store::WriteMultipart::new_with_chunk_size(
                                upload, part_size,
                            );
                            let mut left = size;
                            while left > 0 {
                                let n = block.len().min(left);
                                writer
                                    .wait_for_capacity(concurrency)
                                    .await
                                    .expect("raw part");
                                writer.write(&block[..n]);
                                left -= n;
                            }
                            writer.finish().await.expect("raw multipart complete");
                        })
                    },
                    || {},
                )
            });
            rows.push((name, ours, raw, multipart));
        }
        for (name, ours, raw, multipart) in rows {
            println!(
                "| {} MB | solidflow {name} | {:.0} | {} | {:.0} | {} | {:.0}% / {:.0}% |",
                size / MB,
                ours.write_mbps,
                ours.write_peak,
                ours.read_mbps,
                ours.read_peak,
                100.0 * ours.write_mbps / raw.write_mbps,
                100.0 * ours.read_mbps / raw.read_mbps,
            );
            println!(
                "| {} MB | raw object_store {} | {:.0} | {} | {:.0} | {} | |",
                size / MB,
                if name == "s3" {
                    "AmazonS3"
                } else {
                    "LocalFileSystem"
                },
                raw.write_mbps,
                raw.write_peak,
                raw.read_mbps,
                raw.read_peak,
            );
            if let Some(m) = multipart {
                println!(
                    "| {} MB | raw object_store WriteMultipart | {:.0} | {} | | | |",
                    size / MB,
                    m.write_mbps,
                    m.write_peak
                );
            }
        }
    }
    let table_mb: usize = std::env::var("SOLIDFLOW_BENCH_TABLE_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    table_through_s3(&s3, reps, table_mb * MB);
    drop(server);
}

/// Rows per batch of the bench table: an `Int64` and a `Float64` column, 16 MB a batch.
const TABLE_ROWS: usize = 1 << 20;

/// A streamed Arrow table of about `size` bytes through S3, with the type's codec.
fn table_through_s3(s3: &S3Storage, reps: usize, size: usize) {
    use solidflow::arrow::array::{Array, Float64Array, Int64Array, RecordBatch};
    use solidflow::arrow::datatypes::{DataType, Field, Schema};
    use solidflow::definition::types::{TypeInfo, Value};
    use solidflow::prelude::Table;

    let ty = TypeInfo::of::<Table>();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("value", DataType::Float64, false),
    ]));
    let batches = size.div_ceil(TABLE_ROWS * 16);
    let rows = batches * TABLE_ROWS;
    let key = IntermediateKey::new("bench-run", "table.compute", "result");
    let make = || {
        let batch_schema = schema.clone();
        let stream = (0..batches).map(move |b| {
            let start = (b * TABLE_ROWS) as i64;
            let ids = Int64Array::from_iter_values(start..start + TABLE_ROWS as i64);
            let values = Float64Array::from_iter_values((0..TABLE_ROWS).map(|i| i as f64));
            RecordBatch::try_new(batch_schema.clone(), vec![Arc::new(ids), Arc::new(values)])
        });
        Arc::new(Table::from_stream(schema.clone(), stream)) as Value
    };
    let mut stored = 0u64;
    let measured = measure(
        reps,
        rows * 16,
        || {
            let table = make();
            stored = s3
                .write(&key, &mut |w| ty.encode(&table, w))
                .expect("table write");
        },
        || {
            let reader = s3.read(&key).expect("table read");
            let table = ty.decode(reader).expect("table decode");
            let table = table.downcast_ref::<Table>().expect("a table");
            let mut seen = 0;
            for batch in table.batches() {
                let batch = batch.expect("a batch");
                seen += batch.num_rows();
                assert_eq!(batch.column(0).len(), batch.num_rows());
            }
            assert_eq!(seen, rows);
        },
    );
    println!();
    println!(
        "| Arrow table through s3 | rows | stored bytes | write MB/s | write peak RSS (growth) | read MB/s | read peak RSS (growth) |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {batches} batches of {TABLE_ROWS} rows (Int64, Float64) | {rows} | {stored} | {:.0} | {} | {:.0} | {} |",
        measured.write_mbps, measured.write_peak, measured.read_mbps, measured.read_peak
    );
}

struct Measured {
    write_mbps: f64,
    write_peak: Peak,
    read_mbps: f64,
    read_peak: Peak,
}

/// Peak RSS during an operation, and how far it rose above the RSS when the operation began.
#[derive(Clone, Copy, Default)]
struct Peak {
    absolute: u64,
    growth: u64,
}

impl Peak {
    fn max(self, other: Peak) -> Peak {
        Peak {
            absolute: self.absolute.max(other.absolute),
            growth: self.growth.max(other.growth),
        }
    }
}

impl std::fmt::Display for Peak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} MiB (+{})", self.absolute >> 20, self.growth >> 20)
    }
}

/// Best-of-`reps` throughput for a write then a read, with each operation's peak RSS
/// growth: the highest VmHWM during the operation minus the RSS when it started (memory
/// the allocator kept from earlier operations is not charged to this one).
fn measure(reps: usize, size: usize, mut write: impl FnMut(), mut read: impl FnMut()) -> Measured {
    let (mut best_write, mut best_read) = (Duration::MAX, Duration::MAX);
    let (mut write_peak, mut read_peak) = (Peak::default(), Peak::default());
    for _ in 0..reps.max(1) {
        reset_peak_rss();
        let start = current_rss();
        let t = Instant::now();
        write();
        best_write = best_write.min(t.elapsed());
        write_peak = write_peak.max(Peak {
            absolute: peak_rss(),
            growth: peak_rss().saturating_sub(start),
        });
        reset_peak_rss();
        let start = current_rss();
        let t = Instant::now();
        read();
        best_read = best_read.min(t.elapsed());
        read_peak = read_peak.max(Peak {
            absolute: peak_rss(),
            growth: peak_rss().saturating_sub(start),
        });
    }
    let mbps = |d: Duration| size as f64 / MB as f64 / d.as_secs_f64();
    Measured {
        write_mbps: mbps(best_write),
        write_peak,
        read_mbps: mbps(best_read),
        read_peak,
    }
}

fn solidflow_write(
    storage: &dyn IntermediateStorage,
    key: &IntermediateKey,
    block: &[u8],
    size: usize,
) {
    let written = storage
        .write(key, &mut |w: &mut dyn Write| {
            let mut left = size;
            while left > 0 {
                let n = block.len().min(left);
                w.write_all(&block[..n])?;
                left -= n;
            }
            Ok(())
        })
        .expect("solidflow write");
    assert_eq!(written, size as u64);
}

fn solidflow_read(storage: &dyn IntermediateStorage, key: &IntermediateKey, size: usize) {
    let mut reader = storage.read(key).expect("solidflow read");
    let copied =
        io::copy(&mut reader as &mut dyn Read, &mut io::sink()).expect("solidflow read stream");
    assert_eq!(copied, size as u64);
}

fn random_block(len: usize) -> Vec<u8> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    (0..len / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect()
}

fn reset_peak_rss() {
    // "5" resets VmHWM to the current RSS (Linux >= 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// VmHWM in bytes.
fn peak_rss() -> u64 {
    proc_status_bytes("VmHWM:")
}

/// VmRSS in bytes.
fn current_rss() -> u64 {
    proc_status_bytes("VmRSS:")
}

fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
