//! The raw codec of plain numeric vectors: a NumPy `.npy` (version 1.0) file whose header
//! is always 128 bytes, then the elements as little-endian bytes, copied in one piece.
//!
//! `numpy.load(path)` reads it, and so does `numpy.fromfile(path, dtype="<f8", offset=128)`.
//! A stored value without the magic was written by an earlier release as MessagePack and
//! is decoded as such.

use std::any::TypeId;
use std::io::{Read, Write};
use std::sync::Arc;

use bytemuck::Pod;
use serde::de::DeserializeOwned;

use super::{Codec, TypeCodec, invalid, keep, not_a, read_up_to};
use crate::definition::types::{SolidType, Value};

/// The `.npy` magic string.
const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// Header length, magic included: fixed, so that readers can skip it without parsing.
pub(crate) const HEADER_LEN: usize = 128;

/// An element type stored as raw bytes, with its NumPy dtype.
trait Plain: Pod + serde::Serialize + DeserializeOwned + Send + Sync {
    const DESCR: &'static str;
    /// `self` with its bytes in little-endian order (a no-op on little-endian machines).
    fn to_le(self) -> Self;
}

macro_rules! plain {
    ($($t:ty => $descr:literal),* $(,)?) => {
        $(impl Plain for $t {
            const DESCR: &'static str = $descr;
            fn to_le(self) -> Self {
                <$t>::from_ne_bytes(self.to_le_bytes())
            }
        })*

        /// The raw codec of `T`, if `T` is a `Vec` of a plain numeric type.
        pub(super) fn for_type<T: SolidType>() -> Option<TypeCodec> {
            let id = TypeId::of::<T>();
            $(if id == TypeId::of::<Vec<$t>>() {
                return Some(codec::<$t>());
            })*
            None
        }
    };
}

plain!(
    f64 => "<f8", f32 => "<f4",
    i64 => "<i8", i32 => "<i4", i16 => "<i2", i8 => "|i1",
    u64 => "<u8", u32 => "<u4", u16 => "<u2", u8 => "|u1",
);

fn codec<E: Plain>() -> TypeCodec {
    TypeCodec {
        codec: Codec::Raw,
        encode: encode::<E>,
        decode: decode::<E>,
        share: keep,
    }
}

/// The 128-byte header of a vector of `len` elements of `E`.
fn header<E: Plain>(len: usize) -> Vec<u8> {
    let dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': ({len},), }}",
        E::DESCR
    );
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&[1, 0]);
    header.extend_from_slice(&((HEADER_LEN - 10) as u16).to_le_bytes());
    header.extend_from_slice(dict.as_bytes());
    header.resize(HEADER_LEN - 1, b' ');
    header.push(b'\n');
    header
}

fn encode<E: Plain>(value: &Value, out: &mut dyn Write) -> std::io::Result<()> {
    let items = value.downcast_ref::<Vec<E>>().ok_or_else(not_a::<Vec<E>>)?;
    out.write_all(&header::<E>(items.len()))?;
    if cfg!(target_endian = "little") {
        out.write_all(bytemuck::cast_slice(items))?;
    } else {
        for chunk in items.chunks(8192) {
            let le: Vec<E> = chunk.iter().map(|e| e.to_le()).collect();
            out.write_all(bytemuck::cast_slice(&le))?;
        }
    }
    out.flush()
}

fn decode<E: Plain>(mut input: Box<dyn Read + Send>) -> std::io::Result<Value> {
    let mut head = [0u8; HEADER_LEN];
    let got = read_up_to(&mut input, &mut head[..MAGIC.len()])?;
    if got < MAGIC.len() || &head[..MAGIC.len()] != MAGIC {
        // Written by a release before the raw codec: MessagePack.
        let mut legacy = std::io::Cursor::new(head[..got].to_vec()).chain(input);
        return super::decode_serde::<Vec<E>>(Codec::MessagePack, &mut legacy);
    }
    input.read_exact(&mut head[MAGIC.len()..]).map_err(|e| {
        invalid(format!(
            "a .npy header shorter than {HEADER_LEN} bytes: {e}"
        ))
    })?;
    let len = parse_header(&head, E::DESCR)?;
    let mut items = vec![E::zeroed(); len];
    input
        .read_exact(bytemuck::cast_slice_mut(&mut items))
        .map_err(|e| invalid(format!("the .npy data is shorter than {len} elements: {e}")))?;
    if read_up_to(&mut input, &mut [0u8; 1])? != 0 {
        return Err(invalid(format!(
            "the .npy data is longer than the {len} elements its header declares"
        )));
    }
    if cfg!(target_endian = "big") {
        items.iter_mut().for_each(|e| *e = e.to_le());
    }
    Ok(Arc::new(items))
}

/// The element count of a 1-D `.npy` header of dtype `descr`.
fn parse_header(head: &[u8; HEADER_LEN], descr: &str) -> std::io::Result<usize> {
    if head[6] != 1 {
        return Err(invalid(format!(
            "a .npy file of version {}.{}; solidflow writes and reads version 1.0",
            head[6], head[7]
        )));
    }
    let dict = String::from_utf8_lossy(&head[10..]);
    let field = |name: &str, end: char| {
        let start = dict.find(name)? + name.len();
        let rest = &dict[start..];
        Some(rest[..rest.find(end)?].trim().to_string())
    };
    let stored = field("'descr': '", '\'').unwrap_or_default();
    if stored != descr {
        return Err(invalid(format!(
            "the stored vector has dtype `{stored}`, expected `{descr}`"
        )));
    }
    let shape = field("'shape': (", ')').unwrap_or_default();
    let dims: Vec<&str> = shape.split(',').filter(|d| !d.trim().is_empty()).collect();
    match dims.as_slice() {
        [n] => n
            .trim()
            .parse()
            .map_err(|_| invalid(format!("a .npy shape `({shape})` that is not a length"))),
        _ => Err(invalid(format!(
            "a .npy array of shape ({shape}); a vector is one-dimensional"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<E: Plain + std::fmt::Debug + PartialEq>(items: Vec<E>) -> Vec<u8> {
        let mut bytes = Vec::new();
        encode::<E>(&(Arc::new(items.clone()) as Value), &mut bytes).unwrap();
        let back = decode::<E>(Box::new(std::io::Cursor::new(bytes.clone()))).unwrap();
        assert_eq!(back.downcast_ref::<Vec<E>>(), Some(&items));
        bytes
    }

    #[test]
    fn stores_npy_with_a_fixed_header_then_raw_le_bytes() {
        let bytes = round_trip(vec![1.5f64, -2.0, 3.25]);
        assert_eq!(bytes.len(), HEADER_LEN + 3 * 8);
        assert_eq!(&bytes[..6], MAGIC);
        let text = String::from_utf8_lossy(&bytes[10..HEADER_LEN]);
        assert!(text.starts_with("{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }"));
        assert!(text.ends_with(" \n"), "{text:?}");
        assert_eq!(&bytes[HEADER_LEN..HEADER_LEN + 8], &1.5f64.to_le_bytes());
        round_trip(Vec::<u8>::new());
        round_trip(vec![u64::MAX, 0, 7]);
        round_trip(vec![-1i8, 2]);
    }

    #[test]
    fn reads_messagepack_written_by_earlier_releases() {
        // [78, 85, 77] is the one MessagePack array that starts like the magic.
        for legacy in [vec![], vec![78i64, 85, 77], vec![1, -2, 300]] {
            let bytes = rmp_serde::to_vec_named(&legacy).unwrap();
            let back = decode::<i64>(Box::new(std::io::Cursor::new(bytes))).unwrap();
            assert_eq!(back.downcast_ref::<Vec<i64>>(), Some(&legacy));
        }
    }

    #[test]
    fn refuses_a_vector_of_another_type_or_length() {
        let mut bytes = Vec::new();
        encode::<f32>(&(Arc::new(vec![1f32]) as Value), &mut bytes).unwrap();
        let err = decode::<f64>(Box::new(std::io::Cursor::new(bytes.clone()))).unwrap_err();
        assert!(
            err.to_string().contains("dtype `<f4`, expected `<f8`"),
            "{err}"
        );
        bytes.push(0);
        let err = decode::<f32>(Box::new(std::io::Cursor::new(bytes))).unwrap_err();
        assert!(
            err.to_string().contains("longer than the 1 elements"),
            "{err}"
        );
    }
}
