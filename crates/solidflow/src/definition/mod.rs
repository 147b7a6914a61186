//! Definitions: what users write. Solids, pipelines, modes and repositories, the
//! executor and storage choices a mode offers, and the runtime type information that
//! lets the engine move typed values around: types, the codec each type stores its values
//! with, and tables of Arrow record batches.

pub mod codec;
pub mod dynamic;
mod dynamic_check;
pub mod executor;
pub mod mode;
pub mod pipeline;
pub mod repository;
pub mod retry;
pub mod solid;
pub mod storage;
pub mod table;
pub mod types;
