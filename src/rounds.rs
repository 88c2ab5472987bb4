//! Rounds: several short jobs of one tenant in one scoped transaction.
//!
//! A scoped transaction per job costs two round trips, a commit (a WAL flush) and the
//! statements around it; for short jobs that is most of the work. Our backend fetches jobs of
//! one tenant together ([`crate::backend`]); the verified jobs of a fetch that name the same
//! tenant in their signed envelopes share one transaction:
//!
//! 1. `BEGIN`, `set_config('app.tenant_id', <tenant>, true)` and one statement claiming every
//!    job's run record, in one round trip (a job whose record exists is a duplicate).
//! 2. Each job runs in turn with the same [`TenantTx`]. Its first statement takes a savepoint
//!    (`savepoint j<n>`), so a job that sends no statement costs nothing and a job that fails
//!    is rolled back to it, alone.
//! 3. `public.complete_job_runs` completes the records of the jobs that succeeded, drops those
//!    of the ones that failed and checks the tenant context is unchanged, sent with `COMMIT`.
//!
//! Nothing about isolation changes: the transaction is scoped to the one tenant every job's
//! signed envelope names, before any job runs. Whatever goes wrong at the level of the round
//! (the claim or the commit fails, a job changed the tenant context, a job timed out or
//! panicked with a statement possibly in flight, so the connection's state is unknown) rolls
//! the whole round back and every job that had not failed on its own runs again **alone**, on
//! the ordinary one-job path, which finds the culprit and lets the others finish.
//!
//! Only short, database-only kinds share rounds ([`shares_rounds`]). A job that runs alone
//! claims and completes its run record through the same two statements ([`begin_and_claim`],
//! [`complete_statement`]), as a round of one without savepoints.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::{AssertSqlSafe, PgPool};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::envelope::{JobId, Rejection, TenantId};
use crate::jobs::{JobContext, JobError, JobSpec};
use crate::tenant::{self, Savepoint, TenantTx};
use crate::worker::{ExecError, Outcome, within_limits};

/// True for the kinds that may share a transaction with other jobs of their tenant: short,
/// database-only work. Exports and imports write and read files and stream for long; rollups
/// take their own locks; a `noop` that sleeps stands for a slow job.
pub(crate) fn shares_rounds(spec: &JobSpec) -> bool {
    match spec {
        JobSpec::Noop(n) => n.sleep_ms.is_none(),
        JobSpec::Process(_) => true,
        JobSpec::Export(_) | JobSpec::Import(_) | JobSpec::Rollup(_) => false,
    }
}

/// What a job's round decided; `None` means "run it alone".
pub(crate) type RoundResult = Option<Result<Outcome, ExecError>>;

/// One job of a round.
pub(crate) struct RoundJob {
    /// What to run.
    pub spec: JobSpec,
    /// Its context.
    pub ctx: JobContext,
    /// Its kind's time limit.
    pub timeout: Duration,
    /// Its `job` span, so that what it logs carries its tenant and job ids.
    pub span: tracing::Span,
}

/// Runs `jobs` (all verified for `tenant`) as one round. Returns one result per job, in
/// order; `None` means "run it alone".
pub(crate) async fn run_round(
    pool: &PgPool,
    tenant: TenantId,
    jobs: &[&RoundJob],
) -> Vec<RoundResult> {
    let mut results: Vec<RoundResult> = (0..jobs.len()).map(|_| None).collect();
    // The same job twice (a redelivery racing the first delivery): the later one is a
    // duplicate, as it would be on the one-job path once the first committed.
    let mut seen = HashSet::new();
    let mut members = Vec::with_capacity(jobs.len());
    for (i, job) in jobs.iter().enumerate() {
        if seen.insert(job.ctx.job_id) {
            members.push(i);
        } else {
            results[i] = Some(Ok(Outcome::Duplicate));
        }
    }
    let claim = begin_and_claim(
        pool,
        tenant,
        members.iter().map(|&i| (&jobs[i].spec, &jobs[i].ctx)),
    )
    .await;
    let (mut tx, claimed) = match claim {
        Ok(claimed) => claimed,
        Err(ExecError::Rejected(r)) => {
            for i in members {
                results[i] = Some(Err(ExecError::Rejected(r.clone())));
            }
            return results;
        }
        // Each job finds out for itself, alone.
        Err(ExecError::Job(_)) => return results,
    };
    let mut runnable = Vec::with_capacity(members.len());
    for i in members {
        if claimed.contains(&jobs[i].ctx.job_id.0) {
            runnable.push(i);
        } else {
            results[i] = Some(Ok(Outcome::Duplicate));
        }
    }

    let mut done: Vec<(usize, serde_json::Value)> = Vec::new();
    let mut failed: Vec<(usize, JobError)> = Vec::new();
    for (n, &i) in runnable.iter().enumerate() {
        let job = jobs[i];
        tx.set_savepoint(Savepoint::Pending(n as u32));
        let result = within_limits(job.timeout, job.spec.run(&mut tx, &job.ctx))
            .instrument(job.span.clone())
            .await;
        let savepoint = tx.set_savepoint(Savepoint::None);
        // `cut_off`: timed out or panicked, maybe mid-statement.
        let (error, cut_off) = match result {
            Ok(Ok(mut out)) => {
                crate::worker::scrub_json(&mut out);
                done.push((i, out));
                continue;
            }
            Ok(Err(error)) => (error, false),
            Err(error) => (error, true),
        };
        let clean = match savepoint {
            // It failed on its own terms: its statements finished; undo them.
            Savepoint::Taken(n) if !cut_off => {
                sqlx::raw_sql(AssertSqlSafe(format!("rollback to savepoint j{n}")))
                    .execute(tx.raw_conn())
                    .await
                    .is_ok()
            }
            // A statement may be in flight: the connection cannot be trusted.
            Savepoint::Taken(_) => false,
            // It sent nothing: nothing to undo.
            Savepoint::Pending(_) | Savepoint::None => true,
        };
        if !clean {
            // Dropping `tx` closes the connection; the server rolls everything back. Every
            // other job (done, failed or not yet run) runs again alone.
            drop(tx);
            results[i] = Some(Err(ExecError::Job(error)));
            return results;
        }
        failed.push((i, error));
    }

    let complete = complete_statement(
        tenant,
        done.iter().map(|(i, out)| (jobs[*i].ctx.job_id, out)),
        failed.iter().map(|(i, _)| jobs[*i].ctx.job_id),
    );
    // A job changed the tenant context, or the commit failed: none of it happened, and each
    // job runs again alone (the failed ones too, which are rolled back either way).
    if tx.commit_after(&complete).await.is_ok() {
        for (i, error) in failed {
            results[i] = Some(Err(ExecError::Job(error)));
        }
        for (i, out) in done {
            results[i] = Some(Ok(Outcome::Done(out)));
        }
    }
    results
}

/// Begins a scoped transaction for `tenant` and, in the same round trip, checks the tenant and
/// claims the run records of `jobs`. Returns the transaction and the ids it claimed: a job
/// whose record already exists (a redelivery) is not among them, and a second delivery
/// running concurrently waits here for the first to commit. Under RLS the app role sees only
/// this tenant's row of `tenants`, so "no row" means an unknown tenant.
///
/// # Errors
/// [`ExecError::Rejected`] for an unknown or suspended tenant (rolled back), or the database
/// error.
pub(crate) async fn begin_and_claim<'a>(
    pool: &PgPool,
    tenant: TenantId,
    jobs: impl Iterator<Item = (&'a JobSpec, &'a JobContext)>,
) -> Result<(TenantTx, HashSet<Uuid>), ExecError> {
    let t = tenant.0.hyphenated();
    let values: Vec<String> = jobs
        .map(|(spec, ctx)| {
            format!(
                "('{}'::uuid, '{}', {})",
                ctx.job_id.0.hyphenated(),
                spec.kind(),
                ctx.attempt
            )
        })
        .collect();
    // Every value inlined here is one this crate formatted: UUIDs, kind names from a fixed
    // set, integers.
    let claim = format!(
        "with t as (select status from tenants where id = '{t}'),
              ins as (insert into job_runs (tenant_id, job_id, kind, attempt)
                      select '{t}', j.id, j.kind, j.attempt
                      from t, (values {values}) as j(id, kind, attempt)
                      where t.status = 'active'
                      on conflict do nothing
                      returning job_id)
         select (select status from t) as status,
                coalesce((select string_agg(job_id::text, ',') from ins), '') as claimed",
        values = values.join(", "),
    );
    let (tx, row) = TenantTx::begin_then(pool, tenant, Some(&claim)).await?;
    let row = row.ok_or(sqlx::Error::RowNotFound)?;
    let status: Option<String> = sqlx::Row::try_get(&row, "status")?;
    let claimed: String = sqlx::Row::try_get(&row, "claimed")?;
    let rejection = match status.as_deref() {
        None => Rejection::UnknownTenant,
        Some("active") => {
            let ids = claimed
                .split(',')
                .filter_map(|id| id.parse().ok())
                .collect();
            return Ok((tx, ids));
        }
        Some(_) => Rejection::SuspendedTenant,
    };
    let _ = tx.rollback().await;
    Err(ExecError::Rejected(rejection))
}

/// The statement that ends a scoped transaction's jobs, sent with `COMMIT`:
/// `public.complete_job_runs` completes the run records of the jobs `done` (with their
/// results), drops those of the jobs that `failed` (their work was rolled back to their
/// savepoints) and raises when the tenant context changed, so that the `COMMIT` never runs.
pub(crate) fn complete_statement<'a>(
    tenant: TenantId,
    done: impl Iterator<Item = (JobId, &'a serde_json::Value)>,
    failed: impl Iterator<Item = JobId>,
) -> String {
    let outs: Vec<serde_json::Value> = done
        .map(|(id, out)| serde_json::json!({ "job_id": id.0, "result": out }))
        .collect();
    let failed: Vec<String> = failed
        .map(|id| format!("'{}'::uuid", id.0.hyphenated()))
        .collect();
    format!(
        "select public.complete_job_runs('{}', {}::jsonb, array[{}]::uuid[])",
        tenant.0.hyphenated(),
        tenant::dollar_quote(&serde_json::Value::Array(outs).to_string()),
        failed.join(", "),
    )
}
