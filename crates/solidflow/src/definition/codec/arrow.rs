//! The Arrow codec of [`Table`]: an Arrow IPC *file* (Feather v2), written batch by batch
//! into the storage's writer and read batch by batch from its reader.
//!
//! The file format is the stream format between a magic header (`ARROW1`, zero-padded to
//! the writer's alignment: 64 bytes here) and a footer, so writing it needs no seeking, and
//! reading it front to back is reading the stream after the header: the footer is never
//! needed. pandas (`read_feather`), polars
//! (`read_ipc`) and pyarrow (`ipc.open_file`) read the stored file as it is.

use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::Arc;

use arrow_ipc::reader::StreamReader;
use arrow_ipc::writer::FileWriter;
use arrow_schema::ArrowError;

use super::{CODEC_BUFFER, Codec, TypeCodec, WriteRef, invalid, not_a, read_up_to};
use crate::definition::table::Table;
use crate::definition::types::Value;

/// The first bytes of an Arrow IPC file, before zero padding.
const MAGIC: &[u8; 6] = b"ARROW1";
/// The most zero padding after the magic a writer adds (arrow-rs pads to its alignment, 64).
const MAX_PADDING: usize = 64 - MAGIC.len();

pub(super) fn codec() -> TypeCodec {
    TypeCodec {
        codec: Codec::Arrow,
        encode,
        decode,
        share,
    }
}

fn encode(value: &Value, out: &mut dyn Write) -> std::io::Result<()> {
    let table = value.downcast_ref::<Table>().ok_or_else(not_a::<Table>)?;
    let out = BufWriter::with_capacity(CODEC_BUFFER, WriteRef(out));
    let mut writer = FileWriter::try_new(out, &table.schema()).map_err(io_error)?;
    for batch in table.batches() {
        writer.write(&batch.map_err(io_error)?).map_err(io_error)?;
    }
    writer.finish().map_err(io_error)?;
    writer.into_inner().map_err(io_error)?.flush()
}

fn decode(mut input: Box<dyn Read + Send>) -> std::io::Result<Value> {
    let mut magic = [0u8; MAGIC.len()];
    let got = read_up_to(&mut input, &mut magic)?;
    if got < MAGIC.len() || &magic != MAGIC {
        return Err(invalid(
            "not an Arrow IPC file (no `ARROW1` magic): this value was not written as a table",
        ));
    }
    // Skip the padding; the stream's first message starts with a non-zero byte.
    let mut byte = [0u8; 1];
    let mut first = None;
    for _ in 0..=MAX_PADDING {
        if read_up_to(&mut input, &mut byte)? == 0 || byte[0] != 0 {
            first = Some(byte[0]).filter(|b| *b != 0);
            break;
        }
    }
    let first = first.ok_or_else(|| invalid("an Arrow IPC file without a schema"))?;
    let stream = std::io::Cursor::new([first]).chain(input);
    let reader = StreamReader::try_new(BufReader::with_capacity(CODEC_BUFFER, stream), None)
        .map_err(io_error)?;
    Ok(Arc::new(Table::from_stream(reader.schema(), reader)))
}

/// Several readers in one process share a table: a stream is read into memory once.
fn share(value: Value) -> Result<Value, String> {
    if let Some(table) = value.downcast_ref::<Table>() {
        table.read_all().map_err(|e| e.to_string())?;
    }
    Ok(value)
}

/// The I/O error under an Arrow error (a full disk stays "No space left on device").
fn io_error(e: ArrowError) -> std::io::Error {
    match e {
        ArrowError::IoError(_, io) => io,
        ArrowError::ExternalError(inner) => match inner.downcast::<std::io::Error>() {
            Ok(io) => *io,
            Err(other) => std::io::Error::other(other),
        },
        other => invalid(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Int64Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};

    fn batch(schema: &Arc<Schema>, start: i64) -> RecordBatch {
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from_iter_values(start..start + 3)),
                Arc::new(StringArray::from(vec!["a", "b", "c"])),
            ],
        )
        .unwrap()
    }

    fn schema() -> Arc<Schema> {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, false),
        ]))
    }

    #[test]
    fn streams_a_table_through_an_ipc_file() {
        let schema = schema();
        let made = schema.clone();
        let table =
            Table::from_stream(schema.clone(), (0..4).map(move |b| Ok(batch(&made, b * 3))));
        let mut bytes = Vec::new();
        encode(&(Arc::new(table) as Value), &mut bytes).unwrap();
        assert_eq!(&bytes[..6], MAGIC);
        assert_eq!(&bytes[bytes.len() - 6..], b"ARROW1");
        // The footer is a valid IPC file footer too: arrow's own file reader agrees.
        let file =
            arrow_ipc::reader::FileReader::try_new(std::io::Cursor::new(bytes.clone()), None)
                .unwrap();
        assert_eq!(file.num_batches(), 4);
        let back = decode(Box::new(std::io::Cursor::new(bytes))).unwrap();
        let back = back.downcast_ref::<Table>().unwrap();
        assert!(back.is_streaming());
        let batches = back.read_all().unwrap();
        assert_eq!(batches.len(), 4);
        assert_eq!(batches[3], batch(&schema, 9));
        assert_eq!(back.num_rows().unwrap(), 12);
    }

    #[test]
    fn a_failing_stream_fails_the_write_and_wrong_bytes_fail_the_read() {
        let schema = schema();
        let made = schema.clone();
        let items = vec![
            Ok(batch(&made, 0)),
            Err(ArrowError::ComputeError("source went away".into())),
        ];
        let table = Table::from_stream(schema, items);
        let err = encode(&(Arc::new(table) as Value), &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("source went away"), "{err}");
        let err = decode(Box::new(std::io::Cursor::new(b"\x93NUMPY".to_vec()))).unwrap_err();
        assert!(err.to_string().contains("not an Arrow IPC file"), "{err}");
    }

    #[test]
    fn a_stream_is_read_once_unless_kept() {
        let schema = schema();
        let made = schema.clone();
        let stream = move || {
            let made = made.clone();
            (0..2).map(move |b| Ok(batch(&made, b)))
        };
        let table = Table::from_stream(schema.clone(), stream());
        assert_eq!(table.batches().count(), 2);
        let again: Vec<_> = table.batches().collect();
        assert_eq!(again.len(), 1);
        assert!(
            again[0]
                .as_ref()
                .unwrap_err()
                .to_string()
                .contains("already read")
        );
        // Shared in memory, a stream is kept: every reader sees every batch.
        let shared = share(Arc::new(Table::from_stream(schema, stream())) as Value).unwrap();
        let shared = shared.downcast_ref::<Table>().unwrap();
        assert!(!shared.is_streaming());
        assert_eq!(shared.batches().count(), 2);
        assert_eq!(shared.clone().batches().count(), 2);
    }

    #[test]
    fn a_batch_of_another_schema_is_refused() {
        let other = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let wrong = RecordBatch::try_new(other, vec![Arc::new(Int64Array::from(vec![1]))]).unwrap();
        let err = Table::new(schema(), vec![wrong]).unwrap_err();
        assert!(err.to_string().contains("batch 0 of the table"), "{err}");
    }
}
