//! How values are stored: each type picks its codec, and the bytes at a storage location
//! are what `docs/definitions.md` ("Stored values") says they are.
//!
//! | type | codec | bytes |
//! |---|---|---|
//! | `Vec<f64>`, `Vec<f32>`, `Vec<i8..i64>`, `Vec<u8..u64>` | [`Codec::Raw`] | a 128-byte NumPy `.npy` header, then the elements as raw little-endian bytes |
//! | [`Table`] | [`Codec::Arrow`] | an Arrow IPC file (Feather v2), written and read batch by batch |
//! | anything else serde can write | [`Codec::MessagePack`] | MessagePack (`rmp-serde`, named fields) |
//!
//! The choice is made once per type in [`TypeInfo::of`](super::types::TypeInfo::of) by
//! comparing `TypeId`s, so pipelines choose nothing and change nothing. Releases before
//! the raw codec stored numeric vectors as MessagePack; a raw read that does not find the
//! `.npy` magic decodes MessagePack instead (re-executions read their parent's values).
//! The magic cannot be mistaken for MessagePack: a MessagePack array beginning with those
//! bytes would be a 3-element array `[78, 85, 77]` that ends 2 bytes before the magic does.

mod arrow;
mod messagepack;
mod raw;

use std::any::TypeId;
use std::io::{Read, Write};

use serde::Serialize;

use super::table::Table;
use super::types::{SolidType, Value};

pub(crate) use messagepack::{decode_serde, encode_serde};

/// The format of a stored value. A type's codec is [`TypeInfo::codec`](super::types::TypeInfo::codec).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Codec {
    /// MessagePack via `rmp-serde`: every serde type; the default.
    #[default]
    MessagePack,
    /// JSON via `serde_json`: readable, larger and slower; only on request
    /// ([`TypeInfo::encode_with`](super::types::TypeInfo::encode_with)).
    Json,
    /// A NumPy `.npy` file: 128 header bytes, then raw little-endian elements
    /// (`numpy.load(path)`, or `numpy.fromfile(path, dtype="<f8", offset=128)`).
    Raw,
    /// An Arrow IPC file (`pyarrow.ipc.open_file`, `pandas.read_feather`, `polars.read_ipc`).
    Arrow,
}

pub(crate) type EncodeFn = fn(&Value, &mut dyn Write) -> std::io::Result<()>;
pub(crate) type DecodeFn = fn(Box<dyn Read + Send>) -> std::io::Result<Value>;
pub(crate) type ShareFn = fn(Value) -> Result<Value, String>;

/// The codec one type uses, as plain function pointers.
#[derive(Clone, Copy)]
pub(crate) struct TypeCodec {
    pub(crate) codec: Codec,
    pub(crate) encode: EncodeFn,
    pub(crate) decode: DecodeFn,
    /// Makes a value safe to hand to several readers in one process (`in_memory`).
    pub(crate) share: ShareFn,
}

/// The codec of `T`.
pub(crate) fn for_type<T: SolidType>() -> TypeCodec {
    if let Some(raw) = raw::for_type::<T>() {
        return raw;
    }
    if TypeId::of::<T>() == TypeId::of::<Table>() {
        return arrow::codec();
    }
    messagepack::codec::<T>()
}

/// Buffer between a codec and the storage stream: serializers write a few bytes at a
/// time, and buffering keeps those writes out of the `dyn Write` calls.
pub(crate) const CODEC_BUFFER: usize = 64 * 1024;

fn keep(value: Value) -> Result<Value, String> {
    Ok(value)
}

fn not_a<T>() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("value is not a {}", std::any::type_name::<T>()),
    )
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

/// Reads up to `buf.len()` bytes, fewer only at the end of the stream.
fn read_up_to(input: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// `&mut dyn Write` is not `Sized`; these adapters make it usable where `W: Write` is needed.
pub(crate) struct WriteRef<'a>(pub(crate) &'a mut dyn Write);
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

pub(crate) struct ReadRef<'a>(pub(crate) &'a mut dyn Read);
impl Read for ReadRef<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
    fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_exact(buf)
    }
}
