//! Enqueueing: checking a job against its kind, signing it for the tenant the caller has
//! verified, and inserting it (alone, in a batch, or inside the caller's own transaction).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use super::{Error, Result};
use crate::config::Settings;
use crate::envelope::keys::Signer;
use crate::envelope::{Rejection, Unsigned};
use crate::ids::{JobId, TenantId};
use crate::job::{Registry, TenantJob};

/// A job to enqueue: its kind, its arguments as JSON, and its options.
///
/// Build one from typed arguments with [`NewJob::of`], or from a kind name and JSON with
/// [`NewJob::new`] (for callers that do not know the Rust type, such as the CLI).
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Kind name.
    pub kind: String,
    /// Arguments.
    pub args: serde_json::Value,
    /// Earliest start (default: now). A time in the past means now.
    pub run_at: Option<DateTime<Utc>>,
    /// Higher runs first (default 0).
    pub priority: i32,
    /// When set, a second job with the same key for the same tenant is not created: the first
    /// one's id is returned (see [`Enqueued`]). Keys are remembered as long as the job's row is
    /// kept (see `[retention]`).
    pub idempotency_key: Option<String>,
    /// Attempts before the job is dead (default: the kind's, else `worker.max_attempts`).
    pub max_attempts: Option<u32>,
}

impl NewJob {
    /// A job of `kind` with `args`, to run now.
    pub fn new(kind: impl Into<String>, args: serde_json::Value) -> Self {
        Self {
            kind: kind.into(),
            args,
            run_at: None,
            priority: 0,
            idempotency_key: None,
            max_attempts: None,
        }
    }

    /// A job of kind `J` with typed arguments.
    ///
    /// # Errors
    /// [`Error::Encode`] when the arguments do not serialize.
    pub fn of<J: TenantJob>(args: &J::Args) -> Result<Self> {
        Ok(Self::new(J::KIND, serde_json::to_value(args)?))
    }

    /// Runs no earlier than `at`.
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self
    }

    /// Runs before jobs of lower priority (default 0; negative runs later).
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// At most one job with this key per tenant.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Gives up after this many attempts.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }
}

/// What an enqueue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The job's id: the new job's, or, when its idempotency key was taken, the id of the job
    /// that holds the key.
    pub id: JobId,
    /// False when the idempotency key was taken and nothing new was enqueued.
    pub created: bool,
}

/// Signs jobs for a tenant the caller has verified and puts them on the queue.
///
/// It checks each job against the kinds of its [`Registry`] first (a kind it lacks, or
/// arguments the kind refuses, enqueue nothing) and refuses jobs for tenants that do not exist
/// or are suspended.
#[derive(Debug, Clone)]
pub struct Enqueuer {
    registry: Arc<Registry>,
    pool: PgPool,
    signer: Signer,
    queue: String,
    settings: Arc<Settings>,
}

/// One signed row, ready to insert.
struct Prepared {
    id: JobId,
    payload: Vec<u8>,
    tenant: TenantId,
    kind: String,
    run_at: DateTime<Utc>,
    priority: i32,
    max_attempts: i32,
    key: Option<String>,
}

impl Enqueuer {
    /// An enqueuer inserting through `pool` (the queue role's), checking jobs against
    /// `registry`.
    pub fn new(pool: PgPool, signer: Signer, settings: &Settings, registry: Arc<Registry>) -> Self {
        Self {
            registry,
            pool,
            signer,
            queue: settings.worker.queue.clone(),
            settings: Arc::new(settings.clone()),
        }
    }

    /// The kinds this enqueuer accepts.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn prepare(&self, tenant: TenantId, job: NewJob) -> Result<Prepared> {
        self.registry.check(&job.kind, &job.args)?;
        let now = Utc::now();
        let run_at = job.run_at.unwrap_or(now).max(now);
        let issued_at = now.timestamp();
        // A job scheduled for later must still be valid when it runs.
        let expires_at = run_at.timestamp() + self.settings.keys.job_ttl_secs as i64;
        let id = JobId::new();
        let envelope = self.signer.sign(&Unsigned {
            job_id: id,
            tenant_id: tenant,
            kind: job.kind.clone(),
            args: job.args,
            issued_at,
            expires_at,
        });
        let payload = serde_json::to_vec(&envelope)?;
        // Workers refuse payloads over this size; refuse them here, where the caller can act.
        let limit = self.settings.worker.max_payload_bytes;
        if payload.len() > limit {
            return Err(Rejection::TooLarge {
                size: payload.len(),
                limit,
            }
            .into());
        }
        let max_attempts = job
            .max_attempts
            .unwrap_or_else(|| self.registry.policy(&job.kind, &self.settings).max_attempts);
        if max_attempts == 0 {
            return Err(Rejection::InvalidArgs {
                kind: job.kind,
                reason: "max_attempts must be at least 1".into(),
            }
            .into());
        }
        if let Some(key) = &job.idempotency_key
            && (key.is_empty() || key.len() > 200 || key.contains('\0'))
        {
            return Err(Rejection::InvalidArgs {
                kind: job.kind,
                reason: "the idempotency key must be 1 to 200 characters".into(),
            }
            .into());
        }
        Ok(Prepared {
            id,
            payload,
            tenant,
            kind: job.kind,
            run_at,
            priority: job.priority,
            max_attempts: max_attempts.min(i32::MAX as u32) as i32,
            key: job.idempotency_key,
        })
    }

    /// Signs and enqueues one job of kind `J` for `tenant`.
    ///
    /// # Errors
    /// [`Error::Invalid`] when `J` is not registered with this enqueuer, refuses the
    /// arguments, or the tenant is unknown or suspended; database errors.
    pub async fn enqueue<J: TenantJob>(
        &self,
        tenant: TenantId,
        args: &J::Args,
    ) -> Result<Enqueued> {
        self.enqueue_job(tenant, NewJob::of::<J>(args)?).await
    }

    /// [`Enqueuer::enqueue`] inside the caller's own transaction (`&mut *tx`): the job exists
    /// only if the caller commits.
    ///
    /// # Errors
    /// See [`Enqueuer::enqueue`].
    pub async fn enqueue_in<J: TenantJob>(
        &self,
        conn: &mut PgConnection,
        tenant: TenantId,
        args: &J::Args,
    ) -> Result<Enqueued> {
        self.enqueue_job_in(conn, tenant, NewJob::of::<J>(args)?)
            .await
    }

    /// Signs and enqueues one job with options (`NewJob::of::<J>(&args)?.priority(5)`), or of
    /// a kind named at run time (`NewJob::new("export", json)`).
    ///
    /// # Errors
    /// See [`Enqueuer::enqueue`].
    pub async fn enqueue_job(&self, tenant: TenantId, job: NewJob) -> Result<Enqueued> {
        let mut conn = self.pool.acquire().await?;
        self.enqueue_job_in(&mut conn, tenant, job).await
    }

    /// [`Enqueuer::enqueue_job`] on the caller's connection or transaction.
    ///
    /// # Errors
    /// See [`Enqueuer::enqueue`].
    pub async fn enqueue_job_in(
        &self,
        conn: &mut PgConnection,
        tenant: TenantId,
        job: NewJob,
    ) -> Result<Enqueued> {
        let mut done = self.enqueue_batch_in(conn, vec![(tenant, job)]).await?;
        done.pop().ok_or(Error::Database(sqlx::Error::RowNotFound))
    }

    /// Signs and enqueues many jobs in one statement; per input, what happened.
    ///
    /// # Errors
    /// See [`Enqueuer::enqueue`]; nothing is enqueued when any job is refused.
    pub async fn enqueue_batch(&self, jobs: Vec<(TenantId, NewJob)>) -> Result<Vec<Enqueued>> {
        let mut conn = self.pool.acquire().await?;
        self.enqueue_batch_in(&mut conn, jobs).await
    }

    /// [`Enqueuer::enqueue_batch`] on the caller's connection or transaction.
    ///
    /// # Errors
    /// See [`Enqueuer::enqueue`].
    pub async fn enqueue_batch_in(
        &self,
        conn: &mut PgConnection,
        jobs: Vec<(TenantId, NewJob)>,
    ) -> Result<Vec<Enqueued>> {
        let prepared = jobs
            .into_iter()
            .map(|(t, j)| self.prepare(t, j))
            .collect::<Result<Vec<_>>>()?;
        check_tenants(conn, prepared.iter().map(|p| p.tenant)).await?;
        let ids: Vec<String> = prepared
            .iter()
            .map(|p| p.id.to_ulid().to_string())
            .collect();
        let payloads: Vec<&[u8]> = prepared.iter().map(|p| p.payload.as_slice()).collect();
        let run_ats: Vec<DateTime<Utc>> = prepared.iter().map(|p| p.run_at).collect();
        let priorities: Vec<i32> = prepared.iter().map(|p| p.priority).collect();
        let attempts: Vec<i32> = prepared.iter().map(|p| p.max_attempts).collect();
        let tenants: Vec<String> = prepared.iter().map(|p| p.tenant.to_string()).collect();
        let kinds: Vec<&str> = prepared.iter().map(|p| p.kind.as_str()).collect();
        let keys: Vec<Option<&str>> = prepared.iter().map(|p| p.key.as_deref()).collect();
        // Same columns as apalis-postgres's own sink, plus ON CONFLICT so that a repeated
        // idempotency key (unique per queue and tenant: `apalis_jobs_idempotency_per_tenant`)
        // is "already enqueued" instead of failing the whole batch.
        let inserted: Vec<String> = sqlx::query_scalar(
            r#"insert into apalis.jobs
                   (id, job_type, job, status, attempts, max_attempts, run_at, priority,
                    metadata, idempotency_key)
               select t.id, $1, t.job, 'Pending', 0, t.max_attempts, t.run_at, t.priority,
                      hstore(array['tenant_id', 'kind'], array[t.tenant, t.kind]), t.key
               from unnest($2::text[], $3::bytea[], $4::timestamptz[], $5::int[], $6::int[],
                           $7::text[], $8::text[], $9::text[])
                    as t(id, job, run_at, priority, max_attempts, tenant, kind, key)
               on conflict do nothing
               returning id"#,
        )
        .bind(&self.queue)
        .bind(&ids)
        .bind(&payloads)
        .bind(&run_ats)
        .bind(&priorities)
        .bind(&attempts)
        .bind(&tenants)
        .bind(&kinds)
        .bind(&keys)
        .fetch_all(&mut *conn)
        .await?;
        let inserted: std::collections::HashSet<String> = inserted.into_iter().collect();
        let mut out = Vec::with_capacity(prepared.len());
        for (p, id) in prepared.iter().zip(&ids) {
            if inserted.contains(id) {
                out.push(Enqueued {
                    id: p.id,
                    created: true,
                });
                continue;
            }
            out.push(self.existing(conn, p).await?);
        }
        Ok(out)
    }

    /// The job that holds `p`'s idempotency key (its insert did nothing).
    async fn existing(&self, conn: &mut PgConnection, p: &Prepared) -> Result<Enqueued> {
        let Some(key) = &p.key else {
            // Only a key can make the insert do nothing (ids are fresh UUIDs).
            return Err(Error::Database(sqlx::Error::RowNotFound));
        };
        let row: Option<(String, Option<String>)> = sqlx::query_as(
            "select id, metadata -> 'kind' from apalis.jobs
             where job_type = $1 and metadata -> 'tenant_id' = $2 and idempotency_key = $3",
        )
        .bind(&self.queue)
        .bind(p.tenant.to_string())
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?;
        let (id, kind) = row.ok_or(Error::Database(sqlx::Error::RowNotFound))?;
        let existing = JobId::parse_any(&id).ok_or(Error::Database(sqlx::Error::RowNotFound))?;
        let kind = kind.unwrap_or_default();
        if kind != p.kind {
            return Err(Error::KeyConflict {
                key: key.clone(),
                existing,
                kind,
            });
        }
        Ok(Enqueued {
            id: existing,
            created: false,
        })
    }
}

/// Refuses jobs for tenants that do not exist or are suspended (the worker checks again when
/// the job runs, for tenants suspended meanwhile). The queue role reads only the id and status
/// columns of the registry.
pub(crate) async fn check_tenants(
    conn: &mut PgConnection,
    tenants: impl IntoIterator<Item = TenantId>,
) -> Result<()> {
    let mut wanted: Vec<uuid::Uuid> = tenants.into_iter().map(|t| t.0).collect();
    wanted.sort_unstable();
    wanted.dedup();
    let found: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("select id, status from public.tenants where id = any($1)")
            .bind(&wanted)
            .fetch_all(&mut *conn)
            .await?;
    for id in wanted {
        match found.iter().find(|(t, _)| *t == id) {
            None => return Err(Error::UnknownTenant(TenantId(id))),
            Some((_, status)) if status != "active" => {
                return Err(Error::SuspendedTenant(TenantId(id)));
            }
            Some(_) => {}
        }
    }
    Ok(())
}
