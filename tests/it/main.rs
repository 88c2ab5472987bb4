//! Integration tests: one binary (fast linking), a real PostgreSQL, the locked-down role, the
//! real queue and the real binary.

mod data_layer;
mod exports;
mod fairness;
mod faults;
mod helpers;
mod job_api;
mod processing;
mod rounds;
mod settings;
mod tenant_context;
mod worker;
