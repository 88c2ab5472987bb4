//! Inspecting and managing queued jobs: what `tenant-worker jobs list/show/retry/cancel` do.
//! Everything here runs on the queue role's pool and reads the queue table only, never tenant
//! data (results are what the jobs themselves returned).

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{CANCELLED_BY_OPERATOR, CANCELLED_PREFIX, Error, JobState, REJECTED_PREFIX, Result};
use crate::ids::{JobId, TenantId};
use crate::job::Progress;

/// A job as operators see it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobInfo {
    /// Job id (UUID).
    pub id: String,
    /// Tenant (from the row's routing metadata; unsigned, display only).
    pub tenant_id: Option<String>,
    /// Kind (from the row's routing metadata).
    pub kind: Option<String>,
    /// Where the job is in its life.
    pub state: JobState,
    /// Attempts made.
    pub attempts: i32,
    /// Attempt limit (stored at enqueue).
    pub max_attempts: i32,
    /// Higher runs first.
    pub priority: i32,
    /// Next or last start time.
    pub run_at: Option<DateTime<Utc>>,
    /// When a worker took it.
    pub lock_at: Option<DateTime<Utc>>,
    /// When it finished.
    pub done_at: Option<DateTime<Utc>>,
    /// Last result or error, as stored in the queue row.
    pub last_result: Option<serde_json::Value>,
    /// Which worker holds or held it.
    pub lock_by: Option<String>,
    /// The latest progress the job reported.
    pub progress: Option<Progress>,
    /// Something about a waiting job an operator should know: no live worker runs its kind.
    pub note: Option<String>,
}

impl PartialEq<&str> for JobState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[derive(sqlx::FromRow)]
struct JobRow {
    id: String,
    job_type: String,
    status: String,
    attempts: i32,
    max_attempts: i32,
    priority: i32,
    run_at: Option<DateTime<Utc>>,
    lock_at: Option<DateTime<Utc>>,
    done_at: Option<DateTime<Utc>>,
    last_result: Option<serde_json::Value>,
    tenant_id: Option<String>,
    kind: Option<String>,
    lock_by: Option<String>,
    progress: Option<String>,
}

const SELECT_JOBS: &str = r#"select id, job_type, status, attempts, max_attempts, priority, run_at, lock_at,
        done_at, last_result, metadata -> 'tenant_id' as tenant_id, metadata -> 'kind' as kind,
        lock_by, metadata -> 'progress' as progress
    from apalis.jobs"#;

/// The error text of a stored result, if it is an error.
fn last_error(v: &Option<serde_json::Value>) -> Option<String> {
    let err = v.as_ref()?.get("Err")?;
    let text = match err {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    // apalis stores the error's Display, which prefixes the wrapper type's name.
    Some(
        text.strip_prefix("AbortError: ")
            .map(str::to_string)
            .unwrap_or(text),
    )
}

fn to_info(r: JobRow) -> JobInfo {
    let err = last_error(&r.last_result).unwrap_or_default();
    let now = Utc::now();
    let later = r.run_at.is_some_and(|t| t > now);
    let state = match r.status.as_str() {
        "Pending" if r.attempts > 0 && later => JobState::Retrying,
        "Pending" if later => JobState::Scheduled,
        "Pending" => JobState::Pending,
        // apalis marks a fetched job `Queued` (claimed by `lock_by`) and `Running` only once
        // its lock message lands; our fetch marks it `Running` at once. Claimed is running.
        "Queued" | "Running" => JobState::Running,
        "Done" => JobState::Done,
        "Failed" if r.attempts < r.max_attempts => JobState::Retrying,
        "Failed" => JobState::Dead,
        "Killed" if err.starts_with(REJECTED_PREFIX) => JobState::Rejected,
        "Killed" if err.starts_with(CANCELLED_PREFIX) => JobState::Cancelled,
        _ => JobState::Dead,
    };
    let id = JobId::parse_any(&r.id)
        .map(|j| j.to_string())
        .unwrap_or(r.id);
    JobInfo {
        id,
        tenant_id: r.tenant_id,
        kind: r.kind,
        state,
        attempts: r.attempts,
        max_attempts: r.max_attempts,
        priority: r.priority,
        run_at: r.run_at,
        lock_at: r.lock_at,
        done_at: r.done_at,
        last_result: r.last_result,
        lock_by: r.lock_by,
        progress: r.progress.and_then(|p| serde_json::from_str(&p).ok()),
        note: None,
    }
}

/// The kinds the workers of `queue` seen in the last minute have registered, or `None` when
/// no worker was seen (then nothing can be said about any kind).
async fn live_kinds(pool: &PgPool, queue: &str) -> Result<Option<Vec<String>>> {
    let layers: Vec<String> = sqlx::query_scalar(
        "select layers from apalis.workers
         where worker_type = $1 and last_seen > now() - interval '1 minute'",
    )
    .bind(queue)
    .fetch_all(pool)
    .await?;
    if layers.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        layers
            .iter()
            .filter_map(|l| l.strip_prefix("kinds:"))
            .flat_map(|k| k.split(','))
            .map(str::to_string)
            .collect(),
    ))
}

/// Notes, on waiting jobs, a kind no live worker runs.
async fn note_waiting(pool: &PgPool, queue: &str, jobs: &mut [JobInfo]) -> Result<()> {
    let waiting = |j: &JobInfo| {
        matches!(
            j.state,
            JobState::Pending | JobState::Scheduled | JobState::Retrying
        )
    };
    if !jobs.iter().any(waiting) {
        return Ok(());
    }
    let Some(kinds) = live_kinds(pool, queue).await? else {
        return Ok(());
    };
    for j in jobs.iter_mut().filter(|j| waiting(j)) {
        let kind = j.kind.clone().unwrap_or_default();
        if !kind.is_empty() && !kinds.contains(&kind) {
            j.note = Some(format!(
                "no worker has registered kind `{kind}`: it waits for one that has"
            ));
        }
    }
    Ok(())
}

impl JobInfo {
    /// The stored error text (or rejection reason), if the job did not take effect.
    pub fn error(&self) -> Option<String> {
        if self.state == JobState::Done {
            return None;
        }
        let e = last_error(&self.last_result)?;
        Some(
            e.strip_prefix(REJECTED_PREFIX)
                .map(str::to_string)
                .unwrap_or(e),
        )
    }

    /// What a successful run returned.
    pub fn result(&self) -> Option<&serde_json::Value> {
        self.last_result.as_ref()?.get("Ok")
    }
}

/// Lists jobs, newest first, optionally filtered by tenant and state.
///
/// # Errors
/// Database errors.
pub async fn list(
    pool: &PgPool,
    queue: &str,
    tenant: Option<TenantId>,
    state: Option<JobState>,
    limit: i64,
) -> Result<Vec<JobInfo>> {
    list_of_kind(pool, queue, tenant, state, None, limit).await
}

/// [`list`], only jobs of `kind` when one is given.
///
/// # Errors
/// Database errors.
pub async fn list_of_kind(
    pool: &PgPool,
    queue: &str,
    tenant: Option<TenantId>,
    state: Option<JobState>,
    kind: Option<&str>,
    limit: i64,
) -> Result<Vec<JobInfo>> {
    let filtered = state.is_some() || kind.is_some();
    let rows: Vec<JobRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT_JOBS} where job_type = $1 and ($2::text is null or metadata -> 'tenant_id' = $2)
         order by id desc limit $3"
    )))
    .bind(queue)
    .bind(tenant.map(|t| t.to_string()))
    .bind(if filtered { 100_000 } else { limit })
    .fetch_all(pool)
    .await?;
    let mut out: Vec<JobInfo> = rows.into_iter().map(to_info).collect();
    if filtered {
        out.retain(|j| {
            state.is_none_or(|s| j.state == s) && kind.is_none_or(|k| j.kind.as_deref() == Some(k))
        });
        out.truncate(limit.max(0) as usize);
    }
    note_waiting(pool, queue, &mut out).await?;
    Ok(out)
}

/// The SQL condition on an `apalis.jobs` row for each [`JobState`], the same reading of the
/// row as `to_info`'s (a test holds them together).
fn state_condition(state: JobState) -> &'static str {
    // The stored error text without apalis's wrapper-type prefix.
    macro_rules! err {
        () => {
            "regexp_replace(coalesce(last_result ->> 'Err', ''), '^AbortError: ', '')"
        };
    }
    match state {
        JobState::Pending => "(status = 'Pending' and not coalesce(run_at > now(), false))",
        JobState::Scheduled => "(status = 'Pending' and run_at > now() and attempts = 0)",
        JobState::Retrying => {
            "((status = 'Pending' and run_at > now() and attempts > 0)
              or (status = 'Failed' and attempts < max_attempts))"
        }
        JobState::Running => "(status in ('Queued', 'Running'))",
        JobState::Done => "(status = 'Done')",
        JobState::Rejected => concat!(
            "(status = 'Killed' and starts_with(",
            err!(),
            ", 'rejected: '))"
        ),
        JobState::Cancelled => concat!(
            "(status = 'Killed' and not starts_with(",
            err!(),
            ", 'rejected: ') and starts_with(",
            err!(),
            ", 'cancelled: '))"
        ),
        JobState::Dead => concat!(
            "((status = 'Failed' and attempts >= max_attempts)
              or (status = 'Killed' and not starts_with(",
            err!(),
            ", 'rejected: ')
                  and not starts_with(",
            err!(),
            ", 'cancelled: '))
              or status not in ('Pending', 'Queued', 'Running', 'Done', 'Failed', 'Killed'))"
        ),
    }
}

/// One page of a tenant's jobs, newest first: those older than the job `before` (the last
/// job of the previous page) when given, of `state` and `kind` when given. Filters run in the
/// query, so a page costs about its size whatever the tenant's history.
///
/// # Errors
/// Database errors.
pub async fn page(
    pool: &PgPool,
    queue: &str,
    tenant: TenantId,
    state: Option<JobState>,
    kind: Option<&str>,
    before: Option<JobId>,
    limit: i64,
) -> Result<Vec<JobInfo>> {
    let condition = state.map_or("true", state_condition);
    let rows: Vec<JobRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT_JOBS} where job_type = $1 and metadata -> 'tenant_id' = $2
             and ($3::text is null or metadata -> 'kind' = $3)
             and ($4::text is null or id < $4)
             and {condition}
         order by id desc limit $5"
    )))
    .bind(queue)
    .bind(tenant.to_string())
    .bind(kind)
    .bind(before.map(|b| b.to_ulid().to_string()))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(to_info).collect())
}

/// The `apalis.jobs` row id (ULID text) of a job id given in UUID or ULID form.
fn row_id(id: &str) -> Result<String> {
    JobId::parse_any(id)
        .map(|j| j.to_ulid().to_string())
        .ok_or_else(|| Error::NotFound(id.chars().take(64).collect()))
}

/// One job by id (UUID or ULID form).
///
/// # Errors
/// [`Error::NotFound`] or database errors.
pub async fn show(pool: &PgPool, id: &str) -> Result<JobInfo> {
    let row: Option<JobRow> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!("{SELECT_JOBS} where id = $1")))
            .bind(row_id(id)?)
            .fetch_optional(pool)
            .await?;
    let row = row.ok_or_else(|| Error::NotFound(id.to_string()))?;
    let queue = row.job_type.clone();
    let mut info = [to_info(row)];
    note_waiting(pool, &queue, &mut info).await?;
    let [info] = info;
    Ok(info)
}

/// Makes a dead, rejected or cancelled job run again (attempts reset). A rejected job will be
/// rejected again unless what made it invalid changed (a tenant re-activated, a key restored).
///
/// # Errors
/// [`Error::NotFound`], [`Error::WrongState`] or database errors.
pub async fn retry(pool: &PgPool, id: &str) -> Result<()> {
    let info = show(pool, id).await?;
    if !matches!(
        info.state,
        JobState::Dead | JobState::Rejected | JobState::Cancelled | JobState::Retrying
    ) {
        return Err(Error::WrongState {
            id: info.id,
            state: info.state,
            what: "retry",
        });
    }
    let ulid = row_id(id)?;
    sqlx::query(
        "update apalis.jobs set status = 'Pending', attempts = 0, run_at = now(), lock_by = null,
                lock_at = null, done_at = null
         where id = $1 and status in ('Failed', 'Killed', 'Pending')",
    )
    .bind(ulid)
    .execute(pool)
    .await?;
    Ok(())
}

/// Cancels a job that has not started. Running jobs finish (their work is transactional).
///
/// # Errors
/// [`Error::NotFound`], [`Error::WrongState`] or database errors.
pub async fn cancel(pool: &PgPool, id: &str) -> Result<()> {
    let info = show(pool, id).await?;
    let ulid = row_id(id)?;
    let n = sqlx::query(
        "update apalis.jobs set status = 'Killed', done_at = now(), lock_by = null,
                last_result = jsonb_build_object('Err', $2::text)
         where id = $1 and (status = 'Pending' or (status = 'Failed' and attempts < max_attempts))",
    )
    .bind(ulid)
    .bind(CANCELLED_BY_OPERATOR)
    .execute(pool)
    .await?
    .rows_affected();
    if n == 0 {
        return Err(Error::WrongState {
            id: info.id,
            state: info.state,
            what: "cancel",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(status: &str, lock_by: Option<&str>) -> JobRow {
        JobRow {
            id: JobId::new().to_ulid().to_string(),
            job_type: "q".into(),
            status: status.to_string(),
            attempts: 0,
            max_attempts: 25,
            priority: 0,
            run_at: Some(Utc::now() - chrono::Duration::seconds(1)),
            lock_at: lock_by.map(|_| Utc::now()),
            done_at: None,
            last_result: None,
            tenant_id: None,
            kind: None,
            lock_by: lock_by.map(str::to_string),
            progress: None,
        }
    }

    #[test]
    fn a_claimed_job_is_running_before_its_lock_message_lands() {
        assert_eq!(to_info(row("Pending", None)).state, JobState::Pending);
        assert_eq!(to_info(row("Queued", Some("w"))).state, JobState::Running);
        assert_eq!(to_info(row("Running", Some("w"))).state, JobState::Running);
    }

    #[test]
    fn the_state_filters_match_the_stored_prefixes() {
        let rejected = state_condition(JobState::Rejected);
        let cancelled = state_condition(JobState::Cancelled);
        assert!(rejected.contains(&format!("'{REJECTED_PREFIX}'")));
        assert!(cancelled.contains(&format!("'{CANCELLED_PREFIX}'")));
        assert!(state_condition(JobState::Dead).contains(&format!("'{CANCELLED_PREFIX}'")));
    }

    #[test]
    fn killed_rows_say_why() {
        let killed = |text: &str| {
            let mut r = row("Killed", None);
            r.last_result = Some(serde_json::json!({ "Err": text }));
            to_info(r).state
        };
        assert_eq!(killed("rejected: unknown tenant"), JobState::Rejected);
        assert_eq!(killed(CANCELLED_BY_OPERATOR), JobState::Cancelled);
        assert_eq!(killed("job panicked: boom"), JobState::Dead);
    }
}

/// One tenant's load on the queue, as `jobs stats` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct TenantLoad {
    /// Tenant (the rows' routing copy; `""` for rows without one).
    pub tenant_id: String,
    /// Jobs that could run now.
    pub runnable: i64,
    /// Jobs waiting for a later `run_at` (scheduled, or retrying after a backoff).
    pub delayed: i64,
    /// Jobs a worker is running.
    pub running: i64,
    /// How long the oldest runnable job has waited past its `run_at`, in seconds.
    pub oldest_wait_secs: Option<f64>,
    /// The tenant's weight (1 when it is not in the registry).
    pub weight: i32,
    /// Its cap on running jobs, if any.
    pub max_running: Option<i32>,
    /// Whether it is paused.
    pub paused: bool,
}

/// Per-tenant load of `queue`: every tenant with unfinished jobs, the longest-waiting first, at
/// most `limit`. One pass over the unfinished jobs (the partial indexes of runnable and
/// in-flight rows), never over finished history.
///
/// # Errors
/// Database errors.
pub async fn tenant_loads(pool: &PgPool, queue: &str, limit: i64) -> Result<Vec<TenantLoad>> {
    let rows = sqlx::query_as(
        "with unfinished as (
             select coalesce(metadata -> 'tenant_id', '') as tenant, status, run_at
             from apalis.jobs
             where job_type = $1
               and (status = 'Pending' or (status = 'Failed' and attempts < max_attempts))
             union all
             select coalesce(metadata -> 'tenant_id', ''), status, run_at
             from apalis.jobs
             where job_type = $1 and status = 'Running'
         ),
         per as (
             select tenant,
                    count(*) filter (where status <> 'Running' and run_at <= now()) as runnable,
                    count(*) filter (where status <> 'Running' and run_at > now()) as delayed,
                    count(*) filter (where status = 'Running') as running,
                    extract(epoch from now() - min(run_at)
                        filter (where status <> 'Running' and run_at <= now()))::float8
                        as oldest_wait_secs
             from unfinished group by tenant
         )
         select per.tenant as tenant_id, per.runnable, per.delayed, per.running,
                per.oldest_wait_secs, coalesce(t.weight, 1) as weight, t.max_running,
                coalesce(t.paused, false) as paused
         from per
         left join public.tenants t on t.id::text = per.tenant
         order by per.oldest_wait_secs desc nulls last, per.running desc, per.tenant
         limit $2",
    )
    .bind(queue)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}
