//! The serde codecs: MessagePack (the default for every type without a codec of its
//! own) and JSON (on request).

use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::Arc;

use super::{CODEC_BUFFER, Codec, ReadRef, TypeCodec, WriteRef, invalid, keep, not_a};
use crate::definition::types::{SolidType, Value};

pub(super) fn codec<T: SolidType>() -> TypeCodec {
    TypeCodec {
        codec: Codec::MessagePack,
        encode: |value, out| encode_serde::<T>(value, Codec::MessagePack, out),
        decode: |mut input| decode_serde::<T>(Codec::MessagePack, &mut input),
        share: keep,
    }
}

/// Writes `value` (a `T`) with a serde codec: MessagePack or JSON.
pub(crate) fn encode_serde<T: SolidType>(
    value: &Value,
    codec: Codec,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let value = value.downcast_ref::<T>().ok_or_else(not_a::<T>)?;
    let mut out = BufWriter::with_capacity(CODEC_BUFFER, WriteRef(out));
    match codec {
        Codec::MessagePack => {
            rmp_serde::encode::write_named(&mut out, value).map_err(msgpack_write_error)?
        }
        // A failed write comes back as the original io::Error (kind and all).
        Codec::Json => serde_json::to_writer(&mut out, value).map_err(std::io::Error::from)?,
        Codec::Raw | Codec::Arrow => return Err(not_serde(codec)),
    }
    out.flush()
}

/// Reads a `T` written with a serde codec.
pub(crate) fn decode_serde<T: SolidType>(
    codec: Codec,
    input: &mut dyn Read,
) -> std::io::Result<Value> {
    let input = BufReader::with_capacity(CODEC_BUFFER, ReadRef(input));
    let value: T = match codec {
        Codec::MessagePack => rmp_serde::from_read(input).map_err(invalid)?,
        Codec::Json => serde_json::from_reader(input).map_err(invalid)?,
        Codec::Raw | Codec::Arrow => return Err(not_serde(codec)),
    };
    Ok(Arc::new(value))
}

fn not_serde(codec: Codec) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("{codec:?} is not a serde codec; it belongs to the types that choose it"),
    )
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
