//! tenant-worker: a background job worker for multi-tenant PostgreSQL data where tenant
//! isolation is a property of the database, not a habit of the programmer.
//!
//! Every tenant-data query runs as a locked-down role inside one transaction that first sets
//! `app.tenant_id` from a job envelope whose signature was verified. Row-Level Security,
//! enabled **and forced** on every tenant table, does the rest. See `DESIGN.md` in the shared
//! folder and the README for the whole picture.

pub mod audit;
pub mod backend;
pub mod bench;
pub mod cli;
pub mod config;
pub mod db;
pub mod demo;
pub mod embedded;
pub mod envelope;
pub mod jobs;
pub mod queue;
mod rounds;
pub mod scheduler;
pub mod telemetry;
pub mod tenant;
pub mod worker;
