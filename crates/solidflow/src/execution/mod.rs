//! Execution: the run context, running one step, shared step scheduling, the executor
//! seam, events and the programmatic API ([`execute_pipeline`](run::execute_pipeline)).

pub mod cancel;
pub mod context;
pub mod error;
pub mod event;
pub mod executor;
pub mod launcher;
pub(crate) mod message_stream;
pub mod protocol;
pub mod reexecution;
pub mod run;
pub mod run_id;
pub(crate) mod scheduler;
pub mod sink;
pub(crate) mod step;
pub mod step_server;
pub(crate) mod supervisor;
pub(crate) mod values;

pub use scheduler::{Resources, Summary};
pub use step::StepEnvironment;
