//! Runtime type information for values that flow between solids.
//!
//! Solids are plain Rust functions, but the executor moves their values around without
//! knowing their types: in memory as [`Value`], and through storage as bytes. A
//! [`TypeInfo`] carries what is needed for both, captured once from the static type,
//! including the type's codec (see [`super::codec`]).

use std::any::{Any, TypeId};
use std::io::{Read, Write};
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use super::codec::Codec;
use super::codec::{self as codecs, TypeCodec};

/// A value produced by a solid, shared without copying between steps in one process.
pub type Value = Arc<dyn Any + Send + Sync>;

type SerdeEncodeFn = fn(&Value, Codec, &mut dyn Write) -> std::io::Result<()>;
type SerdeDecodeFn = fn(Codec, &mut dyn Read) -> std::io::Result<Value>;
type FromJsonFn = fn(serde_json::Value) -> Result<Value, String>;
type ToJsonFn = fn(&Value) -> Option<serde_json::Value>;
type CollectFn = fn(Vec<Value>) -> Result<Value, String>;

/// Everything the engine needs to handle values of one Rust type.
#[derive(Clone, Copy)]
pub struct TypeInfo {
    /// `std::any::type_name` of the type, for messages and plans.
    pub name: &'static str,
    id: fn() -> TypeId,
    codec: TypeCodec,
    serde_encode: SerdeEncodeFn,
    serde_decode: SerdeDecodeFn,
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
    /// Type information for `T`, with `T`'s codec.
    pub fn of<T: SolidType>() -> Self {
        Self {
            name: std::any::type_name::<T>(),
            id: TypeId::of::<T>,
            codec: codecs::for_type::<T>(),
            serde_encode: codecs::encode_serde::<T>,
            serde_decode: codecs::decode_serde::<T>,
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

    /// The codec storage uses for this type: [`Codec::Raw`] for plain numeric vectors,
    /// [`Codec::Arrow`] for [`Table`](super::table::Table), [`Codec::MessagePack`] otherwise.
    pub fn codec(&self) -> Codec {
        self.codec.codec
    }

    /// Writes `value` (which must be of this type) with this type's codec.
    pub fn encode(&self, value: &Value, out: &mut dyn Write) -> std::io::Result<()> {
        (self.codec.encode)(value, out)
    }

    /// Reads a value of this type written with its codec (or, for a type whose codec was
    /// MessagePack in earlier releases, written by those). A table keeps `input` and
    /// reads it batch by batch as the table is iterated.
    pub fn decode(&self, input: Box<dyn Read + Send>) -> std::io::Result<Value> {
        (self.codec.decode)(input)
    }

    /// Writes `value` with a serde codec ([`Codec::MessagePack`] or [`Codec::Json`]),
    /// whatever this type's own codec is.
    pub fn encode_with(
        &self,
        value: &Value,
        codec: Codec,
        out: &mut dyn Write,
    ) -> std::io::Result<()> {
        (self.serde_encode)(value, codec, out)
    }

    /// Reads a value written by [`encode_with`](Self::encode_with).
    pub fn decode_with(&self, codec: Codec, input: &mut dyn Read) -> std::io::Result<Value> {
        (self.serde_decode)(codec, input)
    }

    /// Makes `value` safe to hand to several readers in one process (a streaming table
    /// is read into memory); the in-memory store calls it on every output it keeps.
    pub fn share(&self, value: Value) -> Result<Value, String> {
        (self.codec.share)(value)
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
    let codec = codecs::for_type::<T>();
    let items = values
        .into_iter()
        .map(|value| {
            let typed = value
                .downcast::<T>()
                .map_err(|_| format!("a fan-in item is not a {}", std::any::type_name::<T>()))?;
            // A value another step also reads (in memory) is copied through its codec.
            Arc::try_unwrap(typed).or_else(|shared| {
                let mut bytes = Vec::new();
                (codec.encode)(&(shared as Value), &mut bytes).map_err(|e| e.to_string())?;
                let copy = (codec.decode)(Box::new(std::io::Cursor::new(bytes)))
                    .map_err(|e| e.to_string())?;
                copy.downcast::<T>()
                    .ok()
                    .and_then(|t| Arc::try_unwrap(t).ok())
                    .ok_or_else(|| "a decoded fan-in item is shared".to_string())
            })
        })
        .collect::<Result<Vec<T>, String>>()?;
    Ok(Arc::new(items))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::table::Table;

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct Row {
        name: String,
        #[serde(flatten)]
        extra: std::collections::BTreeMap<String, f64>,
    }

    #[test]
    fn round_trips_through_every_serde_codec() {
        let info = TypeInfo::of::<Row>();
        assert_eq!(info.codec(), Codec::MessagePack);
        let row = Row {
            name: "a".into(),
            extra: [("x".to_string(), 1.5)].into(),
        };
        let value: Value = Arc::new(Row {
            name: row.name.clone(),
            extra: row.extra.clone(),
        });
        let mut own = Vec::new();
        info.encode(&value, &mut own).unwrap();
        let back = info.decode(Box::new(std::io::Cursor::new(own))).unwrap();
        assert_eq!(back.downcast_ref::<Row>(), Some(&row));
        for codec in [Codec::MessagePack, Codec::Json] {
            let mut buf = Vec::new();
            info.encode_with(&value, codec, &mut buf).unwrap();
            let back = info.decode_with(codec, &mut buf.as_slice()).unwrap();
            assert_eq!(back.downcast_ref::<Row>(), Some(&row));
        }
    }

    #[test]
    fn each_type_picks_its_codec() {
        assert_eq!(TypeInfo::of::<Vec<f64>>().codec(), Codec::Raw);
        assert_eq!(TypeInfo::of::<Vec<u8>>().codec(), Codec::Raw);
        assert_eq!(TypeInfo::of::<Vec<i32>>().codec(), Codec::Raw);
        assert_eq!(TypeInfo::of::<Table>().codec(), Codec::Arrow);
        assert_eq!(TypeInfo::of::<Vec<String>>().codec(), Codec::MessagePack);
        assert_eq!(TypeInfo::of::<f64>().codec(), Codec::MessagePack);
        assert_eq!(TypeInfo::of::<Vec<Vec<f64>>>().codec(), Codec::MessagePack);
    }

    #[test]
    fn a_shared_fan_in_item_is_copied_through_its_codec() {
        let shared: Value = Arc::new(vec![1.0f64, 2.0]);
        let _other_reader = shared.clone();
        let list = TypeInfo::of::<Vec<f64>>()
            .collect(vec![shared, Arc::new(vec![3.0f64])])
            .unwrap();
        assert_eq!(
            list.downcast_ref::<Vec<Vec<f64>>>(),
            Some(&vec![vec![1.0, 2.0], vec![3.0]])
        );
    }

    #[test]
    fn compares_by_type() {
        assert_eq!(TypeInfo::of::<String>(), TypeInfo::of::<String>());
        assert_ne!(TypeInfo::of::<String>(), TypeInfo::of::<i64>());
        assert!(TypeInfo::of::<i64>().matches(&(Arc::new(5i64) as Value)));
    }
}
