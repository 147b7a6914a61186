//! Conformance suites a backend runs in its own tests (behind the `conformance`
//! feature): [`storage`] for an [`IntermediateStorage`](crate::storage::IntermediateStorage).
//! The executor suite drives a pipeline binary's CLI and lives in
//! `tests/executor_conformance.rs`; see `docs/architecture.md` for how a new executor
//! joins it.

pub mod storage;
