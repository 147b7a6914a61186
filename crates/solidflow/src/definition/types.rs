//! Runtime type information for values that flow between solids.
//!
//! Solids are plain Rust functions, but the executor moves their values around without
//! knowing their types: in memory as [`Value`], and through storage as bytes. A
//! [`TypeInfo`] carries what is needed for both, captured once from the static type.

use std::any::{Any, TypeId};
use std::io::{BufReader, BufWriter, Read, Write};

/// Buffer between a codec and the storage stream.
const CODEC_BUFFER: usize = 64 * 1024;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A value produced by a solid, shared without copying between steps in one process.
pub type Value = Arc<dyn Any + Send + Sync>;

/// The serialization format of stored intermediates.
///
/// The default, [`Codec::MessagePack`], was picked by benchmark (see `docs/benchmarks.md`):
/// it is compact and fast on large numeric vectors and, unlike postcard, is self-describing,
/// so every serde type round-trips (including `#[serde(flatten)]` and `serde_json::Value`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Codec {
    /// MessagePack via `rmp-serde`.
    #[default]
    MessagePack,
    /// JSON via `serde_json`: readable, larger and slower.
    Json,
}

type EncodeFn = fn(&Value, Codec, &mut dyn Write) -> std::io::Result<()>;
type DecodeFn = fn(Codec, &mut dyn Read) -> std::io::Result<Value>;
type FromJsonFn = fn(serde_json::Value) -> Result<Value, String>;
type ToJsonFn = fn(&Value) -> Option<serde_json::Value>;
type CollectFn = fn(Vec<Value>) -> Result<Value, String>;

/// Everything the engine needs to handle values of one Rust type.
#[derive(Clone, Copy)]
pub struct TypeInfo {
    /// `std::any::type_name` of the type, for messages and plans.
    pub name: &'static str,
    id: fn() -> TypeId,
    encode: EncodeFn,
    decode: DecodeFn,
    from_json: FromJsonFn,
    to_json: ToJsonFn,
    vec_id: fn() -> TypeId,
    collect: CollectFn,
}

impl std::fmt::Debug for TypeInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl PartialEq for TypeInfo {
    fn eq(&self, other: &Self) -> bool {
        (self.id)() == (other.id)()
    }
}

/// Types that can flow between solids: anything serde can read and write.
pub trait SolidType: Serialize + DeserializeOwned + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> SolidType for T {}

impl TypeInfo {
    /// Type information for `T`.
    pub fn of<T: SolidType>() -> Self {
        Self {
            name: std::any::type_name::<T>(),
            id: TypeId::of::<T>,
            encode: encode::<T>,
            decode: decode::<T>,
            from_json: |v| {
                serde_json::from_value::<T>(v)
                    .map(|t| Arc::new(t) as Value)
                    .map_err(|e| e.to_string())
            },
            to_json: |v| {
                v.downcast_ref::<T>()
                    .and_then(|t| serde_json::to_value(t).ok())
            },
            vec_id: TypeId::of::<Vec<T>>,
            collect: collect::<T>,
        }
    }

    /// Whether a list input of type `list` can gather values of this type (`list` is `Vec<Self>`).
    pub fn is_element_of(&self, list: &TypeInfo) -> bool {
        (self.vec_id)() == (list.id)()
    }

    /// Gathers values of this type, in order, into one `Vec` of them (a fan-in input).
    pub fn collect(&self, values: Vec<Value>) -> Result<Value, String> {
        (self.collect)(values)
    }

    /// Writes `value` (which must be of this type) with `codec`.
    pub fn encode(&self, value: &Value, codec: Codec, out: &mut dyn Write) -> std::io::Result<()> {
        (self.encode)(value, codec, out)
    }

    /// Reads a value of this type written with `codec`.
    pub fn decode(&self, codec: Codec, input: &mut dyn Read) -> std::io::Result<Value> {
        (self.decode)(codec, input)
    }

    /// Builds a value from config (`solids.<name>.inputs.<input>: ...`).
    pub fn from_json(&self, json: serde_json::Value) -> Result<Value, String> {
        (self.from_json)(json)
    }

    /// Renders a value as JSON, for display and the programmatic API.
    pub fn to_json(&self, value: &Value) -> Option<serde_json::Value> {
        (self.to_json)(value)
    }

    /// Whether `value` holds this type.
    pub fn matches(&self, value: &Value) -> bool {
        (**value).type_id() == (self.id)()
    }
}

fn collect<T: SolidType>(values: Vec<Value>) -> Result<Value, String> {
    let items = values
        .into_iter()
        .map(|value| {
            let typed = value
                .downcast::<T>()
                .map_err(|_| format!("a fan-in item is not a {}", std::any::type_name::<T>()))?;
            // A value another step also reads (in memory) is copied through the codec.
            Arc::try_unwrap(typed).or_else(|shared| {
                let bytes = rmp_serde::to_vec_named(&*shared).map_err(|e| e.to_string())?;
                rmp_serde::from_slice::<T>(&bytes).map_err(|e| e.to_string())
            })
        })
        .collect::<Result<Vec<T>, String>>()?;
    Ok(Arc::new(items))
}

fn encode<T: SolidType>(value: &Value, codec: Codec, out: &mut dyn Write) -> std::io::Result<()> {
    let value = value.downcast_ref::<T>().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("value is not a {}", std::any::type_name::<T>()),
        )
    })?;
    // Serializers write a few bytes at a time; buffering here keeps those writes out of
    // the `dyn Write` calls (4x faster on a 100 MB `Vec<u8>`, see docs/benchmarks.md).
    let mut out = BufWriter::with_capacity(CODEC_BUFFER, WriteRef(out));
    match codec {
        Codec::MessagePack => {
            rmp_serde::encode::write_named(&mut out, value).map_err(msgpack_write_error)?
        }
        // A failed write comes back as the original io::Error (kind and all).
        Codec::Json => serde_json::to_writer(&mut out, value).map_err(std::io::Error::from)?,
    }
    out.flush()
}

/// The I/O error under a MessagePack write error, so that a full disk reads as
/// "No space left on device" first, not under the serializer's message.
fn msgpack_write_error(e: rmp_serde::encode::Error) -> std::io::Error {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return match io.raw_os_error() {
                Some(code) => std::io::Error::from_raw_os_error(code),
                None => std::io::Error::new(io.kind(), io.to_string()),
            };
        }
        cause = c.source();
    }
    std::io::Error::other(e)
}

fn decode<T: SolidType>(codec: Codec, input: &mut dyn Read) -> std::io::Result<Value> {
    let input = BufReader::with_capacity(CODEC_BUFFER, ReadRef(input));
    let value: T = match codec {
        Codec::MessagePack => rmp_serde::from_read(input).map_err(invalid)?,
        Codec::Json => serde_json::from_reader(input).map_err(invalid)?,
    };
    Ok(Arc::new(value))
}

fn invalid(e: impl std::error::Error + Send + Sync + 'static) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

/// `&mut dyn Write` is not `Sized`; these adapters make it usable where `W: Write` is needed.
struct WriteRef<'a>(&'a mut dyn Write);
impl Write for WriteRef<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.0.write_all(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

struct ReadRef<'a>(&'a mut dyn Read);
impl Read for ReadRef<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
    fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_exact(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct Row {
        name: String,
        #[serde(flatten)]
        extra: std::collections::BTreeMap<String, f64>,
    }

    #[test]
    fn round_trips_through_every_codec() {
        let info = TypeInfo::of::<Row>();
        let row = Row {
            name: "a".into(),
            extra: [("x".to_string(), 1.5)].into(),
        };
        let value: Value = Arc::new(Row {
            name: row.name.clone(),
            extra: row.extra.clone(),
        });
        for codec in [Codec::MessagePack, Codec::Json] {
            let mut buf = Vec::new();
            info.encode(&value, codec, &mut buf).unwrap();
            let back = info.decode(codec, &mut buf.as_slice()).unwrap();
            assert_eq!(back.downcast_ref::<Row>(), Some(&row));
        }
    }

    #[test]
    fn compares_by_type() {
        assert_eq!(TypeInfo::of::<String>(), TypeInfo::of::<String>());
        assert_ne!(TypeInfo::of::<String>(), TypeInfo::of::<i64>());
        assert!(TypeInfo::of::<i64>().matches(&(Arc::new(5i64) as Value)));
    }
}
