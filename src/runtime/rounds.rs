//! Rounds: several short jobs of one tenant in one scoped transaction.
//!
//! A scoped transaction per job costs two round trips, a commit (a WAL flush) and the
//! statements around it; for short jobs that is most of the work. Our backend fetches jobs of
//! one tenant together ([`super::backend`]); the verified jobs of a fetch that name the same
//! tenant in their signed envelopes, and whose kinds allow it ([`crate::TenantJob::shares_rounds`]),
//! share one transaction:
//!
//! 1. `BEGIN`, `set_config('app.tenant_id', <tenant>, true)` and one statement claiming every
//!    job's run record, in one round trip (a job whose record exists is a duplicate).
//! 2. Each job runs in turn with the same [`ScopedTx`]. Its first statement takes a savepoint
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

use std::collections::HashSet;

use sqlx::AssertSqlSafe;
use tracing::Instrument as _;

use super::execute::{Outcome, UnitJob, begin_and_claim, complete_statement, within_limits};
use crate::ids::TenantId;
use crate::job::JobError;
use crate::scope::{Savepoint, Scope};

/// What a job's round decided; `None` means "run it alone".
pub(crate) type RoundResult = Option<Outcome>;

/// Runs `jobs` (all verified for `tenant`) as one round. Returns one result per job, in
/// order; `None` means "run it alone".
pub(crate) async fn run_round(
    scope: &Scope,
    tenant: TenantId,
    jobs: &mut [&mut UnitJob],
) -> Vec<RoundResult> {
    let mut results: Vec<RoundResult> = (0..jobs.len()).map(|_| None).collect();
    // The same job twice (a redelivery racing the first delivery): the later one is a
    // duplicate, as it would be on the one-job path once the first committed.
    let mut seen = HashSet::new();
    let mut members = Vec::with_capacity(jobs.len());
    for (i, job) in jobs.iter().enumerate() {
        if seen.insert(job.job_id) {
            members.push(i);
        } else {
            results[i] = Some(Outcome::Duplicate);
        }
    }
    let claim = begin_and_claim(scope, tenant, members.iter().map(|&i| &*jobs[i])).await;
    let (mut tx, claimed) = match claim {
        Ok(claimed) => claimed,
        Err(Outcome::Rejected(r)) => {
            for i in members {
                results[i] = Some(Outcome::Rejected(r.clone()));
            }
            return results;
        }
        // Each job finds out for itself, alone.
        Err(_) => return results,
    };
    let mut runnable = Vec::with_capacity(members.len());
    for i in members {
        if claimed.contains(&jobs[i].job_id.0) {
            runnable.push(i);
        } else {
            results[i] = Some(Outcome::Duplicate);
        }
    }

    let mut done: Vec<(usize, serde_json::Value)> = Vec::new();
    let mut failed: Vec<(usize, JobError)> = Vec::new();
    for (n, &i) in runnable.iter().enumerate() {
        let job = &mut *jobs[i];
        tx.set_savepoint(Savepoint::Pending(n as u32));
        let (timeout, span) = (job.timeout, job.span.clone());
        let result = within_limits(timeout, job.run(&mut tx))
            .instrument(span)
            .await;
        let savepoint = tx.set_savepoint(Savepoint::None);
        // `cut_off`: timed out or panicked, maybe mid-statement.
        let (error, cut_off) = match result {
            Ok(Ok(out)) => {
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
            results[i] = Some(Outcome::Failed(error));
            return results;
        }
        failed.push((i, error));
    }

    let complete = complete_statement(
        &tx,
        done.iter().map(|(i, out)| (jobs[*i].job_id, out)),
        failed.iter().map(|(i, _)| jobs[*i].job_id),
    );
    // A job changed the tenant context, or the commit failed: none of it happened, and each
    // job runs again alone (the failed ones too, which are rolled back either way).
    if tx.commit_after(&complete).await.is_ok() {
        for (i, error) in failed {
            results[i] = Some(Outcome::Failed(error));
        }
        for (i, out) in done {
            results[i] = Some(Outcome::Done(out));
        }
    }
    results
}
