//! Conformance suites a backend runs in its own tests (behind the `conformance`
//! feature): [`storage`] for an [`IntermediateStorage`](crate::storage::IntermediateStorage),
//! [`executor`] for an executor (run through a pipeline binary's CLI), and [`files`], the
//! file handshakes between a test and the solids of a fixture binary.
//! `docs/architecture.md` ("Testing a new executor or storage") says how a new backend
//! joins them.

pub mod executor;
pub mod files;
pub mod storage;
