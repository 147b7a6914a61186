//! Execution: the run context, running one step, shared step scheduling, events and
//! the programmatic API ([`execute_pipeline`](run::execute_pipeline)).

pub mod cancel;
pub mod context;
pub mod error;
pub mod event;
pub mod launcher;
pub mod protocol;
pub mod run;
pub mod scheduler;
pub mod sink;
pub mod step;
pub mod values;
