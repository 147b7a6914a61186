//! [`Table`]: Arrow record batches as a solid input or output, streamed batch by batch.
//!
//! A table is a schema and a sequence of [`RecordBatch`]es. Storage holds it as an Arrow
//! IPC file (see [`Codec::Arrow`](super::codec::Codec::Arrow)), written one batch at a time
//! while the producing solid's batches are generated, and read one batch at a time while
//! the consuming solid iterates. So a table far larger than memory passes between steps:
//!
//! ```
//! use std::sync::Arc;
//! use solidflow::arrow::array::{Float64Array, RecordBatch};
//! use solidflow::arrow::datatypes::{DataType, Field, Schema};
//! use solidflow::prelude::*;
//!
//! /// Ten batches of 1,000 rows each, made as the storage asks for them.
//! #[solid]
//! fn readings(_ctx: &SolidContext) -> Table {
//!     let schema = Arc::new(Schema::new(vec![Field::new("celsius", DataType::Float64, false)]));
//!     let batches = (0..10).map({
//!         let schema = schema.clone();
//!         move |b| {
//!             let values = Float64Array::from_iter_values((0..1000).map(|i| (b * 1000 + i) as f64));
//!             RecordBatch::try_new(schema.clone(), vec![Arc::new(values)])
//!         }
//!     });
//!     Table::from_stream(schema, batches)
//! }
//!
//! /// Reads the table one batch at a time.
//! #[solid]
//! fn total(_ctx: &SolidContext, readings: Table) -> Result<f64, SolidError> {
//!     let mut sum = 0.0;
//!     for batch in readings.batches() {
//!         let batch = batch?;
//!         let column = batch.column(0).as_any().downcast_ref::<Float64Array>().expect("f64");
//!         sum += column.values().iter().sum::<f64>();
//!     }
//!     Ok(sum)
//! }
//!
//! let pipeline = Pipeline::build("tables", |p| {
//!     let t = p.invoke(readings, ());
//!     p.invoke(total, (t,));
//! }).unwrap();
//! let result = execute_pipeline(&pipeline, serde_json::json!({})).unwrap();
//! assert_eq!(result.output::<f64>("total", "result").unwrap(), 49_995_000.0);
//! ```

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use arrow_array::RecordBatch;
use arrow_schema::{ArrowError, SchemaRef};

/// One batch, or the error that stopped the table (a storage read, a producer's failure).
pub type BatchResult = Result<RecordBatch, ArrowError>;

/// A table of Arrow record batches: in memory, or a stream read or made one batch at a time.
///
/// Cloning is cheap and shares the batches. A streaming table (made with
/// [`from_stream`](Self::from_stream), or an input read from storage) can be iterated
/// once; [`read_all`](Self::read_all) keeps its batches so it can be read again.
#[derive(Clone)]
pub struct Table {
    schema: SchemaRef,
    source: Arc<Mutex<Source>>,
}

enum Source {
    Batches(Vec<RecordBatch>),
    Stream(Box<dyn Iterator<Item = BatchResult> + Send>),
    Taken,
}

impl Table {
    /// A table of batches already in memory; every batch must have `schema`'s fields.
    pub fn new(schema: SchemaRef, batches: Vec<RecordBatch>) -> Result<Self, ArrowError> {
        for (i, batch) in batches.iter().enumerate() {
            check_schema(&schema, batch)
                .map_err(|e| ArrowError::SchemaError(format!("batch {i} of the table: {e}")))?;
        }
        Ok(Self::with(schema, Source::Batches(batches)))
    }

    /// A table of one batch.
    pub fn from_batch(batch: RecordBatch) -> Self {
        Self::with(batch.schema(), Source::Batches(vec![batch]))
    }

    /// A table whose batches are made (or read) one at a time, when the table is stored
    /// or read; an `Err` item fails the step that is reading or storing the table.
    pub fn from_stream<I>(schema: SchemaRef, batches: I) -> Self
    where
        I: IntoIterator<Item = BatchResult>,
        I::IntoIter: Send + 'static,
    {
        Self::with(schema, Source::Stream(Box::new(batches.into_iter())))
    }

    fn with(schema: SchemaRef, source: Source) -> Self {
        Self {
            schema,
            source: Arc::new(Mutex::new(source)),
        }
    }

    /// The table's schema.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Whether the batches are still to be made or read (as opposed to held in memory).
    pub fn is_streaming(&self) -> bool {
        !matches!(*self.lock(), Source::Batches(_))
    }

    /// The batches, in order. A streaming table hands its stream over: a second call
    /// yields one error saying so (use [`read_all`](Self::read_all) to read it twice).
    /// Each batch is checked against the schema.
    pub fn batches(&self) -> Batches {
        let taken = std::mem::replace(&mut *self.lock(), Source::Taken);
        let inner = match taken {
            Source::Batches(batches) => {
                *self.lock() = Source::Batches(batches.clone());
                Inner::Memory(batches.into_iter())
            }
            Source::Stream(stream) => Inner::Stream(stream),
            Source::Taken => Inner::Taken(true),
        };
        Batches {
            schema: self.schema.clone(),
            inner,
        }
    }

    /// Every batch, in memory; the table keeps them, so it can be read again afterwards.
    pub fn read_all(&self) -> Result<Vec<RecordBatch>, ArrowError> {
        if let Source::Batches(batches) = &*self.lock() {
            return Ok(batches.clone());
        }
        let batches = self.batches().collect::<Result<Vec<_>, _>>()?;
        *self.lock() = Source::Batches(batches.clone());
        Ok(batches)
    }

    /// The number of rows (reads a streaming table into memory, see [`read_all`](Self::read_all)).
    pub fn num_rows(&self) -> Result<usize, ArrowError> {
        Ok(self.read_all()?.iter().map(RecordBatch::num_rows).sum())
    }

    fn lock(&self) -> MutexGuard<'_, Source> {
        self.source.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn check_schema(schema: &SchemaRef, batch: &RecordBatch) -> Result<(), ArrowError> {
    if batch.schema().fields() == schema.fields() {
        return Ok(());
    }
    Err(ArrowError::SchemaError(format!(
        "its fields {:?} differ from the table's schema {:?}",
        batch.schema().fields(),
        schema.fields()
    )))
}

impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table")
            .field("schema", &self.schema)
            .field("streaming", &self.is_streaming())
            .finish()
    }
}

/// The batches of a [`Table`], from [`Table::batches`].
pub struct Batches {
    schema: SchemaRef,
    inner: Inner,
}

enum Inner {
    Memory(std::vec::IntoIter<RecordBatch>),
    Stream(Box<dyn Iterator<Item = BatchResult> + Send>),
    /// `true` until the one error has been yielded.
    Taken(bool),
}

impl Iterator for Batches {
    type Item = BatchResult;

    fn next(&mut self) -> Option<BatchResult> {
        match &mut self.inner {
            Inner::Memory(batches) => batches.next().map(Ok),
            Inner::Stream(stream) => {
                let item = stream.next()?;
                Some(item.and_then(|batch| check_schema(&self.schema, &batch).map(|()| batch)))
            }
            Inner::Taken(pending) => std::mem::take(pending).then(|| {
                Err(ArrowError::InvalidArgumentError(
                    "this streaming table was already read: a table made with `Table::from_stream` \
                     or read from storage can be iterated once; call `read_all()` first to read it again"
                        .into(),
                ))
            }),
        }
    }
}

/// Serde sees a table as the bytes of an Arrow IPC stream. This is what lets a `Table`
/// (and a `Vec<Table>`) be a solid type; storage never uses it, it writes an Arrow IPC
/// file batch by batch.
impl serde::Serialize for Table {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        let batches = self.read_all().map_err(S::Error::custom)?;
        let mut bytes = Vec::new();
        let mut writer = arrow_ipc::writer::StreamWriter::try_new(&mut bytes, &self.schema)
            .map_err(S::Error::custom)?;
        for batch in &batches {
            writer.write(batch).map_err(S::Error::custom)?;
        }
        writer.finish().map_err(S::Error::custom)?;
        drop(writer);
        serializer.serialize_bytes(&bytes)
    }
}

impl<'de> serde::Deserialize<'de> for Table {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let bytes = deserializer.deserialize_byte_buf(BytesVisitor)?;
        let reader = arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
            .map_err(D::Error::custom)?;
        let schema = reader.schema();
        let batches = reader
            .collect::<Result<Vec<_>, _>>()
            .map_err(D::Error::custom)?;
        Table::new(schema, batches).map_err(D::Error::custom)
    }
}

struct BytesVisitor;

impl<'de> serde::de::Visitor<'de> for BytesVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the bytes of an Arrow IPC stream")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(b) = seq.next_element()? {
            bytes.push(b);
        }
        Ok(bytes)
    }
}
