//! Picks the default intermediate codec: JSON vs MessagePack vs postcard, on a 100 MB
//! `Vec<f64>` and on a small struct; then the engine's path, MessagePack (before issue 13)
//! against each type's own codec (raw `.npy` bytes for numeric vectors).
//!
//! ```sh
//! cargo bench --bench codec
//! ```

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Small {
    id: u64,
    name: String,
    tags: Vec<String>,
    score: f64,
}

fn time<T>(reps: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut out = None;
    for _ in 0..reps {
        let t = Instant::now();
        out = Some(f());
        best = best.min(t.elapsed());
    }
    (best, out.unwrap())
}

fn report<T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug>(
    label: &str,
    value: &T,
    reps: usize,
) {
    type Enc<T> = fn(&T) -> Vec<u8>;
    type Dec<T> = fn(&[u8]) -> T;
    let codecs: [(&str, Enc<T>, Dec<T>); 3] = [
        (
            "json",
            |v| serde_json::to_vec(v).unwrap(),
            |b| serde_json::from_slice(b).unwrap(),
        ),
        (
            "messagepack",
            |v| rmp_serde::to_vec_named(v).unwrap(),
            |b| rmp_serde::from_slice(b).unwrap(),
        ),
        (
            "postcard",
            |v| postcard::to_stdvec(v).unwrap(),
            |b| postcard::from_bytes(b).unwrap(),
        ),
    ];
    for (name, enc, dec) in codecs {
        let (te, bytes) = time(reps, || enc(value));
        let (td, back) = time(reps, || dec(&bytes));
        assert_eq!(&back, value);
        let per = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "| {label} | {name} | {} | {:.1} µs | {:.1} µs |",
            bytes.len(),
            per(te),
            per(td)
        );
    }
}

fn main() {
    println!("| value | codec | bytes | encode | decode |");
    println!("|---|---|---|---|---|");
    let big: Vec<f64> = (0..12_500_000).map(|i| i as f64 * 0.5).collect(); // 100 MB
    report("Vec<f64> 100 MB", &big, 3);
    let small = Small {
        id: 42,
        name: "order-42".into(),
        tags: vec!["emea".into(), "priority".into()],
        score: 0.75,
    };
    report("small struct", &small, 10_000);
    engine_path();
}

/// The engine's own path: `TypeInfo` encoding into `&mut dyn Write` and decoding from a
/// storage-like `Box<dyn Read + Send>`, as storage does; MessagePack (every type's codec
/// before issue 13) against the type's own codec now (raw `.npy` bytes for these two).
fn engine_path() {
    use solidflow::definition::types::{Codec, TypeInfo, Value};
    println!();
    println!("| value | path | bytes | encode | decode |");
    println!("|---|---|---|---|---|");
    let cases: [(&str, Value, TypeInfo); 2] = [
        (
            "Vec<f64> 100 MB",
            std::sync::Arc::new(
                (0..12_500_000)
                    .map(|i| i as f64 * 0.5)
                    .collect::<Vec<f64>>(),
            ),
            TypeInfo::of::<Vec<f64>>(),
        ),
        (
            "Vec<u8> 100 MB",
            std::sync::Arc::new(vec![7u8; 100_000_000]),
            TypeInfo::of::<Vec<u8>>(),
        ),
    ];
    for (label, value, ty) in cases {
        for own in [false, true] {
            let (te, bytes) = time(3, || {
                let mut out: Vec<u8> = Vec::new();
                let out_ref = &mut out as &mut dyn std::io::Write;
                match own {
                    true => ty.encode(&value, out_ref),
                    false => ty.encode_with(&value, Codec::MessagePack, out_ref),
                }
                .unwrap();
                out
            });
            // MessagePack bytes are read by the raw codec's fallback for old values.
            let shared: std::sync::Arc<[u8]> = bytes.clone().into();
            let (td, back) = time(3, || {
                ty.decode(Box::new(std::io::Cursor::new(shared.clone())))
                    .unwrap()
            });
            assert!(ty.matches(&back));
            let path = match own {
                true => format!("TypeInfo, {:?} (now)", ty.codec()),
                false => "TypeInfo, MessagePack (before)".to_string(),
            };
            println!(
                "| {label} | {path} | {} | {:.1} ms | {:.1} ms |",
                bytes.len(),
                te.as_secs_f64() * 1e3,
                td.as_secs_f64() * 1e3
            );
        }
    }
}
