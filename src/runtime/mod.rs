//! The executor: how fetched jobs become scoped transactions and outcomes.
//!
//! - [`backend`]: our apalis backend (fetch groups of one tenant's jobs, registration,
//!   heartbeats, orphan recovery) over apalis-postgres's table;
//! - [`execute`]: verify and parse one job, run it alone within its limits, classify how it
//!   ended;
//! - [`rounds`]: several short jobs of one tenant in one transaction;
//! - [`ack`]: batched write-back of outcomes, and the progress writer;
//! - [`worker`]: the apalis wiring, generations, shutdown and idle detection.
//!
//! Imports run one way: `worker` → `rounds` → `execute` → `backend`, `ack`.

pub(crate) mod ack;
pub(crate) mod backend;
pub(crate) mod execute;
pub(crate) mod rounds;
pub mod worker;
