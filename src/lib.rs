//! tenant-worker: a background job worker for multi-tenant PostgreSQL data where tenant
//! isolation is a property of the database, not a habit of the programmer.
//!
//! Every tenant-data query runs as a locked-down role inside one transaction that first sets
//! the tenant from a job envelope whose signature was verified ([`ScopedTx`]). Row-Level
//! Security, enabled **and forced** on every tenant table, does the rest: a job's SQL sees one
//! tenant's rows whatever it says.
//!
//! # Your own jobs
//!
//! A kind of job is a [`TenantJob`]: typed arguments, a per-kind policy, and a body that is
//! handed the scoped transaction and a [`JobContext`]. Register kinds on a [`Worker`] (beside
//! the built-in ones in [`jobs`]), enqueue them with an [`Enqueuer`] (typed, in a batch, or
//! inside your own transaction), and run the worker:
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//! use tenant_worker::{Client, JobContext, JobError, ScopedTx, Settings, TenantJob};
//!
//! struct CountInvoices;
//!
//! #[derive(Serialize, Deserialize)]
//! struct CountArgs {}
//!
//! impl TenantJob for CountInvoices {
//!     const KIND: &'static str = "count_invoices";
//!     type Args = CountArgs;
//!     type Output = i64;
//!
//!     async fn run(&self, tx: &mut ScopedTx, _: &JobContext, _: CountArgs) -> Result<i64, JobError> {
//!         // No `where tenant_id = ...`: the transaction sees one tenant's invoices.
//!         Ok(sqlx::query_scalar("select count(*) from v_invoice")
//!             .fetch_one(tx.conn().await?)
//!             .await?)
//!     }
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::connect(&Settings::load(None)?).await?;
//! let mut kinds = client.builtins();
//! kinds.register(CountInvoices)?;
//! let kinds = std::sync::Arc::new(kinds);
//!
//! let tenant = client.add_tenant("Northwind").await?.id;
//! // The tenant comes from your verified login, never from a request body.
//! client.enqueuer(kinds.clone())?.enqueue::<CountInvoices>(tenant, &CountArgs {}).await?;
//! client.worker()?.registry(&kinds).build()?.run_until_idle().await?;
//! # Ok(()) }
//! ```
//!
//! # Where things are
//!
//! - [`job`]: the job API ([`TenantJob`], [`JobContext`], [`JobError`], [`Registry`]);
//!   [`jobs`]: the built-in kinds and declared jobs.
//! - [`scope`]: scoped transactions; [`tenant`]: the tenant registry.
//! - [`queue`]: enqueueing and inspecting jobs; [`envelope`]: the signed envelope and keys.
//! - [`worker`]: running jobs; [`schedule`]: per-tenant cron schedules.
//! - [`http`]: the HTTP API (enqueue with a login token, from any language).
//! - [`db`]: connections, `setup`, `audit`; [`embedded`]: the private PostgreSQL clusters;
//!   [`config`]: settings; [`client`]: all of it from one [`Settings`].
//!
//! The design, the threat model and the benchmarks are in the repository's `docs/`.

#![warn(missing_docs)]

pub mod client;
pub mod config;
pub mod db;
pub mod embedded;
pub mod envelope;
pub mod http;
pub mod ids;
pub mod job;
pub mod jobs;
pub mod queue;
mod runtime;
pub mod schedule;
pub mod scope;
pub mod sql;
pub mod telemetry;
pub mod tenant;

pub use runtime::worker;

pub use client::Client;
pub use config::Settings;
pub use envelope::keys::{Keyring, Signer};
pub use ids::{JobId, KeyId, TenantId};
pub use job::{Classify, JobContext, JobError, Progress, Registry, TenantJob};
pub use queue::{Enqueued, Enqueuer, NewJob};
pub use scope::{Scope, ScopedTx};
pub use worker::{RunOptions, Summary, Worker, WorkerBuilder};
