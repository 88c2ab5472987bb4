//! The worker's guarantees, proven end to end: the real worker on the real queue, tenant data
//! read as the superuser for ground truth, and the real binary for the operator commands.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::json;
use serde_json::value::RawValue;
use sqlx::{Executor, PgPool};
use tenant_worker::db::{self, audit};
use tenant_worker::embedded::EphemeralCluster;
use tenant_worker::envelope::{Envelope, Rejection, Unsigned};
use tenant_worker::jobs::declared::Catalog;
use tenant_worker::queue::{self, Enqueuer, NewJob};
use tenant_worker::{
    JobId, KeyId, RunOptions, Scope, Signer, Summary, TenantId, Worker, client, config, jobs,
    tenant,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::seed_towers as seed;
use crate::helpers::{self, TestDb, row_id, stderr, stdout};

/// Ground truth: the run records of a job, read as the superuser: (tenant, attempt, result).
async fn runs_of(admin: &PgPool, job: JobId) -> Vec<(TenantId, i32, Option<serde_json::Value>)> {
    sqlx::query_as("select tenant_id, attempt, result from job_runs where job_id = $1")
        .bind(job)
        .fetch_all(admin)
        .await
        .unwrap()
}

/// Ground truth: every job id with a run record.
async fn all_run_ids(admin: &PgPool) -> BTreeSet<Uuid> {
    sqlx::query_scalar::<_, Uuid>("select job_id from job_runs")
        .fetch_all(admin)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// The job as the queue reports it to operators.
async fn show(queue: &PgPool, job: JobId) -> queue::JobInfo {
    queue::show(queue, &job.to_string())
        .await
        .expect("job exists")
}

async fn status(admin: &PgPool, job: JobId) -> String {
    sqlx::query_scalar("select status from apalis.jobs where id = $1")
        .bind(row_id(job))
        .fetch_one(admin)
        .await
        .unwrap()
}

/// Polls the apalis row until it has `wanted` status.
async fn wait_for_status(admin: &PgPool, job: JobId, wanted: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let s = status(admin, job).await;
        if s == wanted {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "job never reached {wanted}; it is {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stored_payload(admin: &PgPool, job: JobId) -> Vec<u8> {
    sqlx::query_scalar("select job from apalis.jobs where id = $1")
        .bind(row_id(job))
        .fetch_one(admin)
        .await
        .unwrap()
}

async fn set_payload(admin: &PgPool, job: JobId, payload: &[u8]) {
    let n = sqlx::query("update apalis.jobs set job = $2 where id = $1")
        .bind(row_id(job))
        .bind(payload)
        .execute(admin)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(n, 1);
}

/// Edits the stored envelope of a queued job (the attacker with write access to the queue).
async fn tamper(admin: &PgPool, job: JobId, edit: impl FnOnce(&mut Envelope)) {
    let mut env: Envelope = serde_json::from_slice(&stored_payload(admin, job).await).unwrap();
    edit(&mut env);
    set_payload(admin, job, &serde_json::to_vec(&env).unwrap()).await;
}

/// Inserts a crafted row the way `Enqueuer::enqueue_batch_in` does.
async fn insert_row(
    db: &TestDb,
    admin: &PgPool,
    row: &str,
    payload: &[u8],
    tenant: &str,
    kind: &str,
) {
    sqlx::query(
        "insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, priority, metadata)
         values ($1, $2, $3, 'Pending', 0, $4, now(), 0, hstore(array['tenant_id', 'kind'], array[$5, $6]))",
    )
    .bind(row)
    .bind(&db.settings.worker.queue)
    .bind(payload)
    .bind(db.settings.worker.max_attempts as i32)
    .bind(tenant)
    .bind(kind)
    .execute(admin)
    .await
    .unwrap();
}

/// Signs `job` with `signer` and inserts it under the job's own row id.
async fn insert_signed(db: &TestDb, admin: &PgPool, signer: &Signer, job: &Unsigned) {
    let env = signer.sign(job);
    let payload = serde_json::to_vec(&env).unwrap();
    insert_row(
        db,
        admin,
        &row_id(job.job_id),
        &payload,
        &job.tenant_id.to_string(),
        &job.kind,
    )
    .await;
}

fn unix_now() -> i64 {
    Utc::now().timestamp()
}

fn unsigned(tenant: TenantId, kind: &str, args: serde_json::Value) -> Unsigned {
    Unsigned {
        job_id: JobId::new(),
        tenant_id: tenant,
        kind: kind.into(),
        args,
        issued_at: unix_now(),
        expires_at: unix_now() + 3600,
    }
}

/// Runs the real worker (not until idle) alongside `driver`, which cancels `token` when done.
/// Both run in this task, so a failed assertion in `driver` ends the test (and the worker) at
/// once.
async fn with_worker<F: Future>(
    db: &TestDb,
    token: CancellationToken,
    driver: F,
) -> (Summary, F::Output) {
    tokio::join!(db.run_with(RunOptions::default(), token), driver)
}

// ------------------------------------------------------------------------------------------
// Isolation
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_job_reads_and_writes_only_its_tenants_rows() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let app = db.scope().await;
    seed(&app, a, 5).await;
    seed(&app, b, 2).await;
    let admin = db.admin().await;
    let truth = |t: TenantId| {
        let admin = admin.clone();
        async move {
            sqlx::query_scalar::<_, i64>("select count(*) from records where tenant_id = $1")
                .bind(t)
                .fetch_one(&admin)
                .await
                .unwrap()
        }
    };
    let (n_a, n_b) = (truth(a).await, truth(b).await);
    assert_eq!((n_a, n_b), (5, 2), "different sizes make a leak visible");

    let job_a = db.enqueue(a, "noop", json!({"count": true})).await;
    let job_b = db.enqueue(b, "noop", json!({"count": true})).await;
    let summary = db.run_until_idle().await;
    assert_eq!(
        (summary.done, summary.rejected, summary.failed),
        (2, 0, 0),
        "{summary:?}"
    );

    for (tenant, job, expected) in [(a, job_a, n_a), (b, job_b, n_b)] {
        let runs = runs_of(&admin, job).await;
        assert_eq!(runs.len(), 1, "{runs:?}");
        let (run_tenant, attempt, result) = &runs[0];
        assert_eq!(
            *run_tenant, tenant,
            "the run record belongs to the job's tenant"
        );
        assert_eq!(*attempt, 1);
        assert_eq!(result.as_ref(), Some(&json!({"records_visible": expected})));
        assert_eq!(show(&db.queue().await, job).await.state, "done");
    }

    // As the app role, each tenant's run records contain its own job and nothing else.
    for (tenant, own) in [(a, job_a), (b, job_b)] {
        let mut tx = db.scoped(&app, tenant).await;
        let rows: Vec<(TenantId, Uuid)> = sqlx::query_as("select tenant_id, job_id from job_runs")
            .fetch_all(tx.conn().await.unwrap())
            .await
            .unwrap();
        assert_eq!(rows, vec![(tenant, own.0)]);
        tx.rollback().await.unwrap();
    }
    // The jobs changed no tenant data.
    assert_eq!((truth(a).await, truth(b).await), (n_a, n_b));
}

// ------------------------------------------------------------------------------------------
// Tampering and rejection
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn tampered_jobs_are_rejected_with_their_own_reason_and_touch_nothing() {
    let db = TestDb::new().await;
    let (a, b, c) = (
        db.tenant("A").await,
        db.tenant("B").await,
        db.tenant("C").await,
    );
    let app = db.scope().await;
    seed(&app, a, 3).await;
    seed(&app, b, 4).await;
    let admin = db.admin().await;
    let queue_pool = db.queue().await;

    // (case, job, expected reason text)
    let mut bad: Vec<(&str, JobId, &str)> = Vec::new();

    let j = db.enqueue(a, "noop", json!({"count": true})).await;
    tamper(&admin, j, |e| e.tenant_id = b).await;
    bad.push(("tenant id edited", j, "signature does not verify"));

    let j = db.enqueue(a, "noop", json!({"sleep_ms": 1})).await;
    tamper(&admin, j, |e| {
        e.args = RawValue::from_string(r#"{"sleep_ms":2}"#.into()).unwrap()
    })
    .await;
    bad.push(("args edited", j, "signature does not verify"));

    let j = db.enqueue(a, "noop", json!({})).await;
    tamper(&admin, j, |e| e.kind = "export".into()).await;
    bad.push(("kind edited", j, "signature does not verify"));

    let stranger = Signer::new(
        KeyId::parse("stranger").unwrap(),
        ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng),
    );
    let job = unsigned(a, "noop", json!({}));
    insert_signed(&db, &admin, &stranger, &job).await;
    bad.push((
        "unknown key",
        job.job_id,
        "signed with unknown key id `stranger`",
    ));

    let donor = db.enqueue(a, "noop", json!({})).await;
    let donor_env: Envelope = serde_json::from_slice(&stored_payload(&admin, donor).await).unwrap();
    // The donor runs normally; only its signature is reused.
    let j = db.enqueue(a, "noop", json!({})).await;
    tamper(&admin, j, |e| e.sig = donor_env.sig.clone()).await;
    bad.push((
        "signature copied from another job",
        j,
        "signature does not verify",
    ));

    let mut job = unsigned(a, "noop", json!({}));
    job.issued_at = unix_now() - 120;
    job.expires_at = unix_now() - 60;
    insert_signed(&db, &admin, &db.signer, &job).await;
    bad.push(("expired", job.job_id, "expired at"));

    let job = unsigned(TenantId(Uuid::new_v4()), "noop", json!({}));
    insert_signed(&db, &admin, &db.signer, &job).await;
    bad.push(("unknown tenant", job.job_id, "unknown tenant"));

    let j = db.enqueue(c, "noop", json!({})).await;
    tenant::set_status(&admin, &db.settings.roles.owner, c, false)
        .await
        .unwrap();
    bad.push(("suspended tenant", j, "tenant is suspended"));

    let garbage = JobId::new();
    insert_row(
        &db,
        &admin,
        &row_id(garbage),
        b"\xff\x00not json",
        &a.to_string(),
        "noop",
    )
    .await;
    bad.push(("not JSON", garbage, "payload is not a valid job envelope"));

    // A kind no worker has registered is not rejected: it waits for a worker that runs it.
    let unknown_kind = unsigned(a, "frobnicate", json!({}));
    insert_signed(&db, &admin, &db.signer, &unknown_kind).await;
    // A row without a routing kind is fetched and verified like any other: its signed kind,
    // which no worker runs, is rejected.
    let unrouted = unsigned(a, "frobnicate", json!({}));
    insert_signed(&db, &admin, &db.signer, &unrouted).await;
    sqlx::query("update apalis.jobs set metadata = delete(metadata, 'kind') where id = $1")
        .bind(row_id(unrouted.job_id))
        .execute(&admin)
        .await
        .unwrap();
    bad.push((
        "signed kind unknown to the worker",
        unrouted.job_id,
        "unknown job kind `frobnicate`",
    ));

    // Valid jobs of another tenant in the same run, plus the donor.
    let mut good = vec![(a, donor)];
    for _ in 0..3 {
        good.push((b, db.enqueue(b, "noop", json!({"count": true})).await));
    }

    let fingerprint = || {
        let admin = admin.clone();
        async move {
            sqlx::query_scalar::<_, Option<String>>(
                "select md5(string_agg(r::text, '|' order by tenant_id, id)) from records r",
            )
            .fetch_one(&admin)
            .await
            .unwrap()
        }
    };
    let before = fingerprint().await;
    assert!(before.is_some());

    let summary = db.run_until_idle().await;
    assert_eq!(summary.rejected, bad.len() as u64, "{summary:?}");
    assert_eq!(
        (summary.done, summary.failed),
        (good.len() as u64, 0),
        "{summary:?}"
    );

    for (case, job, reason) in &bad {
        let info = show(&queue_pool, *job).await;
        assert_eq!(info.state, "rejected", "{case}: {info:?}");
        let error = info.error().unwrap_or_default();
        // Stored as the queue's error text, marked as a rejection.
        let stored = info
            .last_result
            .as_ref()
            .map(|r| r.to_string())
            .unwrap_or_default();
        assert!(
            stored.contains(&format!("rejected: {reason}")),
            "{case}: {stored}"
        );
        assert!(
            error.contains(reason),
            "{case}: expected `{reason}` in `{error}`"
        );
        assert_eq!(info.attempts, 1, "{case}: a rejected job is never retried");
        assert!(
            runs_of(&admin, *job).await.is_empty(),
            "{case}: took effect"
        );
    }
    for (tenant, job) in &good {
        let info = show(&queue_pool, *job).await;
        assert_eq!(info.state, "done", "{info:?}");
        let runs = runs_of(&admin, *job).await;
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].0, *tenant);
    }
    let waiting = show(&queue_pool, unknown_kind.job_id).await;
    assert_eq!(waiting.state, "pending", "{waiting:?}");
    assert!(
        waiting
            .note
            .as_deref()
            .is_some_and(|n| n.contains("no worker has registered kind `frobnicate`")),
        "{waiting:?}"
    );
    assert!(runs_of(&admin, unknown_kind.job_id).await.is_empty());
    let b_result = &runs_of(&admin, good[1].1).await[0].2;
    assert_eq!(b_result.as_ref(), Some(&json!({"records_visible": 4})));
    // Nothing but the valid jobs left a trace; no tenant data changed.
    let expected: BTreeSet<Uuid> = good.iter().map(|(_, j)| j.0).collect();
    assert_eq!(all_run_ids(&admin).await, expected);
    assert_eq!(fingerprint().await, before);
}

#[tokio::test]
async fn a_job_delivered_twice_takes_effect_once() {
    let db = TestDb::new().await;
    let a = db.tenant("A").await;
    let admin = db.admin().await;
    let queue_pool = db.queue().await;
    let job = db.enqueue(a, "noop", json!({})).await;
    let first = db.run_until_idle().await;
    assert_eq!((first.done, first.duplicates), (1, 0), "{first:?}");
    assert_eq!(runs_of(&admin, job).await.len(), 1);

    // A redelivery: the queue hands the same row out again.
    let n = sqlx::query(
        "update apalis.jobs set status = 'Pending', lock_by = null, lock_at = null,
                run_at = now() - interval '1 second'
         where id = $1",
    )
    .bind(row_id(job))
    .execute(&admin)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(n, 1);
    let second = db.run_until_idle().await;
    assert_eq!(
        (second.done, second.duplicates, second.rejected),
        (0, 1, 0),
        "{second:?}"
    );
    let info = show(&queue_pool, job).await;
    assert_eq!(info.state, "done", "{info:?}");
    let runs = runs_of(&admin, job).await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].1, 1, "the record is the first delivery's");

    // A replay: the identical signed bytes under a new row id.
    let replay = JobId::new();
    let payload = stored_payload(&admin, job).await;
    insert_row(
        &db,
        &admin,
        &row_id(replay),
        &payload,
        &a.to_string(),
        "noop",
    )
    .await;
    let third = db.run_until_idle().await;
    assert_eq!(
        (third.done, third.duplicates, third.rejected),
        (0, 0, 1),
        "{third:?}"
    );
    let info = show(&queue_pool, replay).await;
    assert_eq!(info.state, "rejected");
    let error = info.error().unwrap();
    assert!(
        error.contains("envelope job id does not match the queued job id"),
        "{error}"
    );
    assert_eq!(runs_of(&admin, job).await.len(), 1);
    assert!(runs_of(&admin, replay).await.is_empty());
}

// ------------------------------------------------------------------------------------------
// Retries
// ------------------------------------------------------------------------------------------

/// One change of an apalis row, as recorded by a trigger.
#[derive(Debug, sqlx::FromRow)]
struct Change {
    status: String,
    attempts: i32,
    run_at: DateTime<Utc>,
    lock_at: Option<DateTime<Utc>>,
    done_at: Option<DateTime<Utc>>,
    /// When the change was made (clock time); shown in failure messages.
    #[allow(dead_code)]
    at: DateTime<Utc>,
}

#[tokio::test]
async fn failing_jobs_back_off_then_die_with_their_error() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("A").await, db.tenant("B").await);
    let admin = db.admin().await;
    // Every change of the apalis row, timestamped by the database (polling could miss one).
    helpers::record_queue_history(&admin).await;
    let failing = db.enqueue(a, "noop", json!({"fail": "boom"})).await;
    let fine = db.enqueue(b, "noop", json!({})).await;
    let max = db.settings.worker.max_attempts as i32;
    assert_eq!(max, 3);

    let token = CancellationToken::new();
    let watch = async {
        let deadline = Instant::now() + Duration::from_secs(12);
        loop {
            let (status, attempts): (String, i32) =
                sqlx::query_as("select status, attempts from apalis.jobs where id = $1")
                    .bind(row_id(failing))
                    .fetch_one(&admin)
                    .await
                    .unwrap();
            if status == "Failed" && attempts >= max {
                break;
            }
            if Instant::now() > deadline {
                token.cancel();
                panic!("still {status} after {attempts} attempts");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        token.cancel();
    };
    let (summary, ()) = with_worker(&db, token.clone(), watch).await;
    assert_eq!(summary.failed, 3, "{summary:?}");
    assert_eq!(summary.done, 1, "{summary:?}");

    let history: Vec<Change> = sqlx::query_as(
        "select status, attempts, run_at, lock_at, done_at, at from job_history where id = $1 order by seq",
    )
    .bind(row_id(failing))
    .fetch_all(&admin)
    .await
    .unwrap();
    let ms = |d: chrono::TimeDelta| d.num_milliseconds();
    let base = db.settings.worker.backoff_base_ms as i64;
    for n in 1..max {
        let raw = (base << (n - 1)).min(db.settings.worker.backoff_max_ms as i64);
        // The ack of failure n writes the next run time in the same statement as done_at, so
        // the delay is measured from the database's own clock at that statement.
        let failed = history
            .iter()
            .position(|c| c.status == "Failed" && c.attempts == n)
            .unwrap_or_else(|| panic!("no failure {n} in {history:#?}"));
        let next_run = history[failed].run_at;
        let done_at = history[failed].done_at.expect("done_at set by the ack");
        // The fetch that started attempt n + 1.
        let next_start = history[failed..]
            .iter()
            .find(|c| c.status == "Running")
            .unwrap_or_else(|| panic!("attempt {} never fetched: {history:#?}", n + 1))
            .lock_at
            .expect("lock_at set by the fetch");
        // Equal jitter: the delay lies in [raw/2, raw].
        let delay = ms(next_run - done_at);
        assert!(
            (raw / 2 - 5..=raw).contains(&delay),
            "failure {n}: delay {delay} ms outside [{}, {raw}]: {history:#?}",
            raw / 2
        );
        let gap = ms(next_start - done_at);
        assert!(
            gap >= raw / 2,
            "failure {n}: attempt {} started {gap} ms after its failure was recorded: {history:#?}",
            n + 1
        );
    }
    // A fetch is a change into `Running` (the fetch claims and marks the row at once).
    let fetches = history
        .windows(2)
        .filter(|w| w[1].status == "Running" && w[0].status != "Running")
        .count();
    assert_eq!(fetches, max as usize, "one fetch per attempt: {history:#?}");

    let queue_pool = db.queue().await;
    let info = show(&queue_pool, failing).await;
    assert_eq!(
        (info.state.as_str(), info.attempts),
        ("dead", 3),
        "{info:?}"
    );
    let error = info.error().unwrap();
    assert!(error.contains("boom"), "{error}");
    assert!(
        runs_of(&admin, failing).await.is_empty(),
        "failed attempts were rolled back"
    );
    // The other tenant's job kept flowing.
    assert_eq!(show(&queue_pool, fine).await.state, "done");
    assert_eq!(runs_of(&admin, fine).await.len(), 1);
}

// ------------------------------------------------------------------------------------------
// Audit
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn audit_detects_each_posture_problem_and_run_refuses_to_start() {
    // Roles are cluster-wide: this test breaks its own set only.
    let mut db = TestDb::empty().await;
    let suffix = db.name["tw_test_".len()..].to_string();
    {
        let r = &mut db.settings.roles;
        r.owner = format!("twa_owner_{suffix}");
        r.app = format!("twa_app_{suffix}");
        r.queue = format!("twa_queue_{suffix}");
        r.scheduler = format!("twa_sched_{suffix}");
    }
    db.refresh();
    db::setup(&db.settings, &db.urls).await.unwrap();
    let admin = db.admin().await;
    let roles = db.settings.roles.clone();
    let (app, owner, queue) = (&roles.app, &roles.owner, &roles.queue);

    let failed = || {
        let admin = admin.clone();
        let roles = roles.clone();
        async move {
            audit::run(&admin, &roles)
                .await
                .unwrap()
                .into_iter()
                .filter(|c| !c.ok)
                .map(|c| c.name)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        failed().await,
        Vec::<String>::new(),
        "baseline has no failure"
    );
    let out = db.cli(&["audit"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains(", 0 failed"), "{}", stdout(&out));

    let tenant = Uuid::new_v4();
    let dbname = &db.name;
    // (problem, statement that introduces it, statement that undoes it, failed check name)
    let cases: Vec<(&str, String, String, String)> = vec![
        (
            "app role superuser",
            format!("alter role {app} superuser"),
            format!("alter role {app} nosuperuser"),
            format!("app role `{app}` is not superuser"),
        ),
        (
            "app role bypassrls",
            format!("alter role {app} bypassrls"),
            format!("alter role {app} nobypassrls"),
            format!("app role `{app}` has no BYPASSRLS"),
        ),
        (
            "app role owns a tenant table",
            format!("alter table public.job_runs owner to {app}"),
            format!("alter table public.job_runs owner to {owner}"),
            "public.job_runs: not owned by the app role".into(),
        ),
        (
            "tenant table without FORCE",
            "alter table public.records no force row level security".into(),
            "alter table public.records force row level security".into(),
            "public.records: row level security forced".into(),
        ),
        (
            "tenant table without ENABLE",
            "alter table public.job_runs disable row level security".into(),
            "alter table public.job_runs enable row level security".into(),
            "public.job_runs: row level security enabled".into(),
        ),
        (
            "view owned by a superuser",
            "create view public.everything as select * from public.records".into(),
            "drop view public.everything".into(),
            "view everything: owner is subject to RLS".into(),
        ),
        (
            "queue role reads tenant data",
            format!("grant select on public.records to {queue}"),
            format!("revoke select on public.records from {queue}"),
            "public.records: queue role cannot read it".into(),
        ),
        (
            "tenant default on the app role",
            format!(r#"alter role {app} in database "{dbname}" set app.tenant_id = '{tenant}'"#),
            format!(r#"alter role {app} in database "{dbname}" reset app.tenant_id"#),
            "app.tenant_id has no role or database default".into(),
        ),
        (
            "the app role reads the context keys",
            format!("grant select on public.tenant_context_keys to {app}"),
            format!("revoke select on public.tenant_context_keys from {app}"),
            format!("app role `{app}` cannot read the context keys"),
        ),
        (
            "a policy that trusts app.tenant_id alone",
            "alter policy tenant_isolation on public.job_runs using (tenant_id = public.current_tenant_id())".into(),
            "alter policy tenant_isolation on public.job_runs using (tenant_id = public.current_tenant_id() and (select public.tenant_context_valid()))".into(),
            "tenant policies require the sealed context".into(),
        ),
        (
            "an immutable verifier",
            "alter function public.tenant_context_valid() immutable".into(),
            "alter function public.tenant_context_valid() stable".into(),
            "public.tenant_context_valid(): stable".into(),
        ),
        (
            "a security definer function without a pinned search_path",
            "alter function public.complete_job_runs(uuid, jsonb, uuid[], text) reset search_path".into(),
            "alter function public.complete_job_runs(uuid, jsonb, uuid[], text) set search_path = pg_catalog, pg_temp".into(),
            "security definer functions pin their search_path".into(),
        ),
        (
            "the app role may create in public",
            format!("grant create on schema public to {app}"),
            format!("revoke create on schema public from {app}"),
            format!("app role `{app}` cannot create in any schema"),
        ),
        (
            "the app role may run SQL text",
            format!("grant execute on function pg_catalog.query_to_xml(text, boolean, boolean, text) to {app}"),
            format!("revoke execute on function pg_catalog.query_to_xml(text, boolean, boolean, text) from {app}"),
            format!("app role `{app}` cannot run SQL text through functions"),
        ),
        (
            "a unique key that does not lead with tenant_id",
            "create unique index audit_global_id on public.records (id)".into(),
            "drop index public.audit_global_id".into(),
            "tenant table keys lead with tenant_id".into(),
        ),
    ];
    for (problem, introduce, undo, check) in &cases {
        admin
            .execute(sqlx::AssertSqlSafe(introduce.clone()))
            .await
            .unwrap();
        let names = failed().await;
        assert!(
            names.iter().any(|n| n == check),
            "{problem}: `{check}` not among {names:?}"
        );
        let out = db.cli(&["run", "--until-idle"]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{problem}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("refusing to start"),
            "{problem}: {}",
            stderr(&out)
        );
        assert!(
            stdout(&out).contains(&format!("FAIL  {check}")),
            "{problem}: {}",
            stdout(&out)
        );
        admin
            .execute(sqlx::AssertSqlSafe(undo.clone()))
            .await
            .unwrap();
        assert_eq!(
            failed().await,
            Vec::<String>::new(),
            "{problem}: not undone"
        );
    }

    // Best-effort cleanup: the database first, then its roles.
    admin.close().await;
    if let Ok(pg) = db::pool(
        "admin",
        &secrecy::SecretString::from(helpers::server_url("postgres")),
        1,
        Duration::from_secs(10),
    )
    .await
    {
        let _ = pg
            .execute(sqlx::AssertSqlSafe(format!(
                r#"drop database if exists "{dbname}" with (force)"#
            )))
            .await;
        for role in [&roles.app, &roles.queue, &roles.scheduler, &roles.owner] {
            let _ = pg
                .execute(sqlx::AssertSqlSafe(format!(
                    r#"drop role if exists "{role}""#
                )))
                .await;
        }
        pg.close().await;
    }
}

// ------------------------------------------------------------------------------------------
// Shutdown
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn graceful_shutdown_lets_an_inflight_job_finish() {
    let db = TestDb::new().await;
    let a = db.tenant("A").await;
    let admin = db.admin().await;
    let job = db.enqueue(a, "noop", json!({"sleep_ms": 1500})).await;
    let token = CancellationToken::new();
    let cancel_when_running = async {
        wait_for_status(&admin, job, "Running", Duration::from_secs(10)).await;
        token.cancel();
    };
    let (summary, ()) = with_worker(&db, token.clone(), cancel_when_running).await;
    assert_eq!(summary.done, 1, "{summary:?}");
    let info = show(&db.queue().await, job).await;
    assert_eq!(info.state, "done", "{info:?}");
    assert_eq!(runs_of(&admin, job).await.len(), 1);
}

#[tokio::test]
async fn a_job_cut_off_by_the_shutdown_timeout_runs_again_later_and_takes_effect_once() {
    let mut db = TestDb::new().await;
    db.settings.worker.shutdown_timeout_secs = 1;
    let a = db.tenant("A").await;
    let admin = db.admin().await;
    let job = db.enqueue(a, "noop", json!({"sleep_ms": 4000})).await;
    let token = CancellationToken::new();
    let cancel_when_running = async {
        wait_for_status(&admin, job, "Running", Duration::from_secs(10)).await;
        token.cancel();
        Instant::now()
    };
    let (summary, cancelled) = with_worker(&db, token.clone(), cancel_when_running).await;
    let took = cancelled.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "returned {took:?} after the cancel"
    );
    assert_eq!(summary.done, 0, "{summary:?}");
    assert!(
        runs_of(&admin, job).await.is_empty(),
        "nothing committed yet"
    );

    // Whatever became of the cut-off execution, a later worker finishes the job, once.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let between = status(&admin, job).await;
    let summary = db.run_until_idle().await;
    let info = show(&db.queue().await, job).await;
    assert_eq!(
        info.state, "done",
        "{info:?} (state between workers: {between})"
    );
    let runs = runs_of(&admin, job).await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(
        summary.done + summary.duplicates,
        1,
        "the second worker ran it or found it done: {summary:?}"
    );
}

// ------------------------------------------------------------------------------------------
// Database restart
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_worker_survives_a_database_restart() {
    let cluster = Arc::new(
        tokio::task::spawn_blocking(EphemeralCluster::start)
            .await
            .unwrap()
            .expect("start a private PostgreSQL"),
    );
    let url = config::with_database(&cluster.admin_url(), "tw");
    let mut settings = helpers::base_settings(&url);
    let keys = tempfile::tempdir().unwrap();
    let signer = helpers::add_key(&mut settings, keys.path(), "test");
    let urls = db::DbUrls::derive(&settings, &url, false);
    db::setup(&settings, &urls).await.unwrap();
    let admin = db::admin_pool(&settings, &urls).await.unwrap();
    let a = tenant::add(&admin, &settings.roles.owner, "A")
        .await
        .unwrap()
        .id;
    let b = tenant::add(&admin, &settings.roles.owner, "B")
        .await
        .unwrap()
        .id;
    let enqueuer = Enqueuer::new(
        db::queue_pool(&settings, &urls).await.unwrap(),
        signer,
        &settings,
        std::sync::Arc::new(jobs::builtins(&settings, Default::default())),
    );
    // 100 ms per job (8 at a time) keeps the first batch busy for ~0.7 s, so the restart
    // lands while jobs are in flight.
    let batch = || {
        (0..50)
            .map(|i| {
                (
                    if i % 2 == 0 { a } else { b },
                    NewJob::new("noop", json!({"sleep_ms": 100})),
                )
            })
            .collect::<Vec<_>>()
    };
    let mut ids: Vec<JobId> = enqueuer
        .enqueue_batch(batch())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids.len(), 50);

    let keyring = client::keyring(&settings, None).unwrap();
    let worker = Worker::builder(
        Scope::new(
            db::app_pool(&settings, &urls).await.unwrap(),
            db::context_key(&settings, &urls).await.unwrap(),
        ),
        db::queue_pool(&settings, &urls).await.unwrap(),
        keyring,
        &settings,
    )
    .registry(&jobs::builtins(&settings, Default::default()))
    .build()
    .unwrap();
    let token = CancellationToken::new();
    let done = |admin: PgPool| async move {
        sqlx::query_scalar::<_, i64>("select count(*) from apalis.jobs where status = 'Done'")
            .fetch_one(&admin)
            .await
    };
    let driver = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        while done(admin.clone()).await.unwrap() < 10 {
            if Instant::now() > deadline {
                token.cancel();
                panic!("the worker did not get going");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let before_restart = done(admin.clone()).await.unwrap();
        let c = cluster.clone();
        tokio::task::spawn_blocking(move || c.restart())
            .await
            .unwrap()
            .expect("restart");
        // The enqueuer's pool reconnects by itself.
        ids.extend(
            enqueuer
                .enqueue_batch(batch())
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.id),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while done(admin.clone()).await.unwrap_or(0) < 100 {
            if Instant::now() > deadline {
                token.cancel();
                panic!("not all jobs finished after the restart");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        token.cancel();
        before_restart
    };
    let worker = async {
        tokio::time::timeout(
            Duration::from_secs(100),
            worker.run(RunOptions::default(), token.clone()),
        )
        .await
        .expect("worker stopped in time")
        .expect("worker ran")
    };
    let (summary, before_restart) = tokio::join!(worker, driver);
    assert_eq!(ids.len(), 100);
    assert!(
        before_restart < 100,
        "the restart happened while jobs were still queued"
    );
    assert!(summary.done <= 100, "{summary:?}");

    let runs: Vec<(i64, i64)> =
        sqlx::query_as("select count(*), count(distinct job_id) from job_runs")
            .fetch_all(&admin)
            .await
            .unwrap();
    assert_eq!(runs, vec![(100, 100)]);
    let expected: BTreeSet<Uuid> = ids.iter().map(|j| j.0).collect();
    assert_eq!(all_run_ids(&admin).await, expected);
    let states: Vec<(String, i64)> =
        sqlx::query_as("select status, count(*) from apalis.jobs group by 1 order by 1")
            .fetch_all(&admin)
            .await
            .unwrap();
    assert_eq!(states, vec![("Done".to_string(), 100)]);

    admin.close().await;
    drop(enqueuer);
    let cluster = Arc::try_unwrap(cluster).expect("sole owner");
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

// ------------------------------------------------------------------------------------------
// Operator commands and enqueueing
// ------------------------------------------------------------------------------------------

fn state_line(out: &std::process::Output) -> String {
    stdout(out)
        .lines()
        .find_map(|l| l.strip_prefix("state:").map(|s| s.trim().to_string()))
        .unwrap_or_else(|| panic!("no state line in {}", stdout(out)))
}

#[tokio::test]
async fn enqueue_cli_prints_an_id_and_jobs_cli_shows_lists_retries_and_cancels() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("A").await, db.tenant("B").await);
    let (a_s, b_s) = (a.to_string(), b.to_string());

    let out = db.cli(&[
        "enqueue",
        "noop",
        "--tenant",
        &a_s,
        "--args",
        r#"{"fail":"nope"}"#,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    Uuid::parse_str(&id).expect("prints the job id");

    let out = db.cli(&["jobs", "show", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(state_line(&out), "pending");
    assert!(stdout(&out).contains(&a_s), "{}", stdout(&out));
    let queue_pool = db.queue().await;
    let info = queue::show(&queue_pool, &id).await.unwrap();
    assert_eq!(
        (info.tenant_id.as_deref(), info.kind.as_deref()),
        (Some(a_s.as_str()), Some("noop"))
    );

    let out = db.cli(&["jobs", "cancel", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(state_line(&db.cli(&["jobs", "show", &id])), "cancelled");
    // Cancelling twice is refused with the state.
    let out = db.cli(&["jobs", "cancel", &id]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is cancelled"), "{}", stderr(&out));

    let out = db.cli(&["jobs", "retry", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(state_line(&db.cli(&["jobs", "show", &id])), "pending");

    let out = db.cli(&[
        "enqueue",
        "noop",
        "--tenant",
        &a_s,
        "--args",
        r#"{"bogus":1}"#,
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid arguments for `noop`"),
        "{}",
        stderr(&out)
    );
    let out = db.cli(&["enqueue", "frobnicate", "--tenant", &a_s]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown job kind `frobnicate`"),
        "{}",
        stderr(&out)
    );

    let out = db.cli(&["enqueue", "noop", "--tenant", &a_s]);
    assert!(out.status.success(), "{}", stderr(&out));
    let second_a = stdout(&out).trim().to_string();
    let out = db.cli(&["enqueue", "noop", "--tenant", &b_s]);
    assert!(out.status.success(), "{}", stderr(&out));
    let only_b = stdout(&out).trim().to_string();

    let out = db.cli(&["jobs", "list", "--tenant", &a_s]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = stdout(&out);
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 2, "{listed}");
    assert!(
        lines.iter().all(|l| l.contains(&format!("tenant {a_s}"))),
        "{listed}"
    );
    assert!(
        listed.contains(&id) && listed.contains(&second_a),
        "{listed}"
    );
    assert!(
        !listed.contains(&only_b) && !listed.contains(&b_s),
        "{listed}"
    );

    // --limit says when more match; --kind filters by kind, within the tenant.
    let out = db.cli(&["jobs", "list", "--tenant", &a_s, "--limit", "1"]);
    let listed = stdout(&out);
    assert_eq!(listed.lines().count(), 2, "one job and the hint: {listed}");
    assert!(
        listed.contains("(more jobs match: --limit 2 shows more)"),
        "{listed}"
    );
    let out = db.cli(&["jobs", "list", "--tenant", &a_s, "--kind", "noop"]);
    let listed = stdout(&out);
    assert!(listed.lines().all(|l| l.contains("  noop  ")), "{listed}");
    assert!(!listed.contains(&only_b), "{listed}");
    let out = db.cli(&["jobs", "list", "--tenant", &a_s, "--kind", "export"]);
    assert_eq!(stdout(&out).trim(), "no jobs match", "{}", stdout(&out));

    let out = db.cli(&["jobs", "list", "--state", "nonsense"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown state `nonsense`"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn enqueue_inside_a_callers_transaction_exists_only_if_committed() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("A").await, db.tenant("B").await);
    let enqueuer = db.enqueuer().await;
    let queue_pool = db.queue().await;

    let mut tx = queue_pool.begin().await.unwrap();
    let rolled_back = enqueuer
        .enqueue_job_in(&mut tx, a, NewJob::new("noop", json!({})))
        .await
        .unwrap()
        .id;
    let inside: i64 = sqlx::query_scalar("select count(*) from apalis.jobs where id = $1")
        .bind(row_id(rolled_back))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(inside, 1, "visible inside the caller's transaction");
    tx.rollback().await.unwrap();
    assert!(matches!(
        queue::show(&queue_pool, &rolled_back.to_string()).await,
        Err(queue::Error::NotFound(_))
    ));

    let mut tx = queue_pool.begin().await.unwrap();
    let committed = enqueuer
        .enqueue_job_in(&mut tx, b, NewJob::new("noop", json!({})))
        .await
        .unwrap()
        .id;
    assert!(
        matches!(
            queue::show(&queue_pool, &committed.to_string()).await,
            Err(queue::Error::NotFound(_))
        ),
        "not visible to others before the commit"
    );
    tx.commit().await.unwrap();
    assert_eq!(show(&queue_pool, committed).await.state, "pending");

    let batch = vec![
        (a, NewJob::new("noop", json!({"count": true}))),
        (b, NewJob::new("noop", json!({}))),
        (a, NewJob::new("noop", json!({"sleep_ms": 10}))),
    ];
    let ids: Vec<JobId> = enqueuer
        .enqueue_batch(batch)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(ids.iter().map(|j| j.0).collect::<BTreeSet<_>>().len(), 3);
    // A batch with one invalid job enqueues nothing.
    let before: i64 = sqlx::query_scalar("select count(*) from apalis.jobs")
        .fetch_one(&queue_pool)
        .await
        .unwrap();
    let err = enqueuer
        .enqueue_batch(vec![
            (a, NewJob::new("noop", json!({}))),
            (b, NewJob::new("frobnicate", json!({}))),
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, queue::Error::Invalid(Rejection::UnknownKind { kind, .. }) if kind == "frobnicate"),
        "{err:?}"
    );
    let after: i64 = sqlx::query_scalar("select count(*) from apalis.jobs")
        .fetch_one(&queue_pool)
        .await
        .unwrap();
    assert_eq!(before, after);

    let summary = db.run_until_idle().await;
    assert_eq!(summary.done, 4, "{summary:?}");
    let admin = db.admin().await;
    for (tenant, job) in [(b, committed), (a, ids[0]), (b, ids[1]), (a, ids[2])] {
        assert_eq!(show(&queue_pool, job).await.state, "done");
        let runs = runs_of(&admin, job).await;
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].0, tenant);
    }
    assert!(runs_of(&admin, rolled_back).await.is_empty());
}

#[tokio::test]
async fn key_rotation() {
    let mut db = TestDb::new().await;
    let a = db.tenant("A").await;
    let dir = tempfile::tempdir().unwrap();
    let old = helpers::add_key(&mut db.settings, dir.path(), "old");
    let new = helpers::add_key(&mut db.settings, dir.path(), "new");
    let queue_pool = db.queue().await;
    let admin = db.admin().await;
    let with_old = Enqueuer::new(
        queue_pool.clone(),
        old,
        &db.settings,
        db.kinds(Catalog::new()),
    );
    let with_new = Enqueuer::new(
        queue_pool.clone(),
        new,
        &db.settings,
        db.kinds(Catalog::new()),
    );

    let before = with_old
        .enqueue_job(a, NewJob::new("noop", json!({})))
        .await
        .unwrap()
        .id;
    let summary = db.run_until_idle().await;
    assert_eq!(summary.done, 1, "{summary:?}");
    assert_eq!(show(&queue_pool, before).await.state, "done");

    // Rotation: "old" is no longer listed; the worker gets the new keyring.
    db.settings.keys.verifying.remove("old");
    let after_old = with_old
        .enqueue_job(a, NewJob::new("noop", json!({})))
        .await
        .unwrap()
        .id;
    let after_new = with_new
        .enqueue_job(a, NewJob::new("noop", json!({})))
        .await
        .unwrap()
        .id;
    let summary = db.run_until_idle().await;
    assert_eq!((summary.done, summary.rejected), (1, 1), "{summary:?}");
    let info = show(&queue_pool, after_old).await;
    assert_eq!(info.state, "rejected");
    let error = info.error().unwrap();
    assert!(
        error.contains("signed with unknown key id `old`"),
        "{error}"
    );
    assert!(runs_of(&admin, after_old).await.is_empty());
    assert_eq!(show(&queue_pool, after_new).await.state, "done");
    assert_eq!(runs_of(&admin, after_new).await.len(), 1);
    assert_eq!(
        runs_of(&admin, before).await.len(),
        1,
        "jobs run before the rotation stay done"
    );
}

/// Stopping a worker generation drops apalis's futures, and apalis-postgres wraps even its
/// fetches in a transaction: a BEGIN dropped mid-flight hands its connection back still inside
/// a transaction (sqlx#4385). On the shared queue pool such a connection made later fetches see
/// a frozen `now()` and miss new jobs (a `bench --quick` run once stopped without fetching its
/// job). Workers stopped while jobs keep arriving must leave no queue connection idle in a
/// transaction, and every job must still run once on the same pool.
#[tokio::test]
async fn stopped_worker_generations_leave_no_queue_connection_inside_a_transaction() {
    let db = TestDb::new().await;
    let a = db.tenant("Northwind").await;
    let (app, queue_pool, admin) = (db.scope().await, db.queue().await, db.admin().await);
    let stuck = || async {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let n: i64 = sqlx::query_scalar(
                "select count(*) from pg_stat_activity
                 where datname = $1 and usename = $2 and state like 'idle in transaction%'",
            )
            .bind(&db.name)
            .bind(&db.settings.roles.queue)
            .fetch_one(&admin)
            .await
            .unwrap();
            if n == 0 || Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let kinds = db.kinds(Catalog::new());
    let run = |until_idle: bool, shutdown: CancellationToken| {
        let worker = Worker::builder(app.clone(), queue_pool.clone(), db.keyring(), &db.settings)
            .registry(&kinds)
            .build()
            .unwrap();
        tokio::spawn(worker.run(
            RunOptions {
                until_idle,
                name: None,
            },
            shutdown,
        ))
    };
    // Jobs keep arriving (each NOTIFY wakes a fetch) while workers start and stop.
    let arriving = CancellationToken::new();
    let producer = {
        let enqueuer = Enqueuer::new(
            queue_pool.clone(),
            db.signer.clone(),
            &db.settings,
            db.kinds(Catalog::new()),
        );
        let arriving = arriving.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !arriving.is_cancelled() {
                enqueuer
                    .enqueue_job(a, NewJob::new("noop", json!({})))
                    .await
                    .unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            n
        })
    };
    for round in 1..=150u64 {
        let shutdown = CancellationToken::new();
        let worker = run(false, shutdown.clone());
        tokio::time::sleep(Duration::from_millis(20 + round % 7)).await;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), worker)
            .await
            .expect("worker stopped in time")
            .unwrap()
            .expect("worker ran");
        assert_eq!(
            stuck().await,
            0,
            "round {round}: a queue connection was left inside a transaction"
        );
    }
    arriving.cancel();
    let enqueued = producer.await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), run(true, CancellationToken::new()))
        .await
        .expect("worker finished in time")
        .unwrap()
        .expect("worker ran");
    let (runs, distinct): (i64, i64) =
        sqlx::query_as("select count(*), count(distinct job_id) from public.job_runs")
            .fetch_one(&admin)
            .await
            .unwrap();
    assert_eq!((runs, distinct), (enqueued as i64, enqueued as i64));
}

// ------------------------------------------------------------------------------------------
// Idempotency keys and attempts
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_idempotency_key_is_one_tenants_and_a_repeat_returns_the_existing_job() {
    // It used to be global: B's job with A's key was silently not created.
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("A").await, db.tenant("B").await);
    let enqueuer = db.enqueuer().await;
    let job = || NewJob::new("noop", json!({})).idempotency_key("k1");
    let first_a = enqueuer.enqueue_job(a, job()).await.unwrap();
    let first_b = enqueuer.enqueue_job(b, job()).await.unwrap();
    assert!(
        first_a.created && first_b.created,
        "each tenant gets its job"
    );
    assert_ne!(first_a.id, first_b.id);
    let again = enqueuer.enqueue_job(a, job()).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.id, first_a.id, "the repeat names the existing job");
    // The key with another kind, same tenant: an error naming the job that holds it.
    let err = enqueuer
        .enqueue_job(a, NewJob::new("rollup", json!({})).idempotency_key("k1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, queue::Error::KeyConflict { existing, .. } if *existing == first_a.id),
        "{err}"
    );
    // The constraint is the database's, not only the code's.
    let per_tenant: bool = sqlx::query_scalar(
        "select pg_get_indexdef(indexrelid) like '%tenant_id%' from pg_index
         where indexrelid = 'apalis.apalis_jobs_idempotency_per_tenant'::regclass",
    )
    .fetch_one(&db.admin().await)
    .await
    .unwrap();
    assert!(per_tenant);

    // The CLI prints the existing job's id for a repeat (scripts do `J=$(tenant-worker enqueue ...)`).
    let tenant = a.to_string();
    let args = [
        "enqueue",
        "noop",
        "--tenant",
        &tenant,
        "--idempotency-key",
        "k2",
    ];
    let one = db.cli(&args);
    let two = db.cli(&args);
    assert!(
        one.status.success() && two.status.success(),
        "{}",
        stderr(&two)
    );
    assert_eq!(stdout(&one).trim(), stdout(&two).trim());
    assert!(
        stderr(&two).contains("already enqueued"),
        "{}",
        stderr(&two)
    );
    let b_tenant = b.to_string();
    let other = db.cli(&[
        "enqueue",
        "noop",
        "--tenant",
        &b_tenant,
        "--idempotency-key",
        "k2",
    ]);
    assert!(other.status.success());
    assert_ne!(stdout(&other).trim(), stdout(&one).trim(), "B's own job");
    assert!(
        !stderr(&other).contains("already enqueued"),
        "{}",
        stderr(&other)
    );
}

#[tokio::test]
async fn a_jobs_attempts_are_fixed_at_enqueue_whatever_the_workers_setting() {
    // A job enqueued with 5 attempts and run by a worker set to 2 used to go straight back to
    // runnable after each "last" attempt, with no backoff, until 5/5.
    let db = TestDb::new().await;
    let tenant = db.tenant("A").await;
    let enqueuer = db.enqueuer().await;
    let job = enqueuer
        .enqueue_job(
            tenant,
            NewJob::new("noop", json!({ "fail": "on purpose" })).max_attempts(3),
        )
        .await
        .unwrap()
        .id;
    let mut vars = db.env();
    vars.push(("TENANT_WORKER__WORKER__MAX_ATTEMPTS".into(), "1".into()));
    vars.push((
        "TENANT_WORKER__WORKER__BACKOFF_BASE_MS".into(),
        "300".into(),
    ));
    vars.push(("TENANT_WORKER__WORKER__BACKOFF_MAX_MS".into(), "300".into()));
    let mut runs = Vec::new();
    for _ in 0..6 {
        let out = helpers::cli_with_env(&["run", "--until-idle"], &vars);
        assert!(out.status.success(), "{}", stderr(&out));
        let info = helpers::job_info(&db.queue().await, job).await;
        runs.push((info.attempts, info.state.to_string(), info.run_at));
        if info.attempts >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let (attempts, state, _) = runs.last().unwrap().clone();
    assert_eq!(attempts, 3, "{runs:?}");
    assert_eq!(state, "dead", "{runs:?}");
    let info = helpers::job_info(&db.queue().await, job).await;
    assert_eq!(
        info.max_attempts, 3,
        "the job's own number, shown by jobs show"
    );
    // Every retry waited out a backoff: each run_at after a failure is later than the last.
    for w in runs.windows(2) {
        assert!(w[1].2 > w[0].2, "{runs:?}");
    }
}

#[test]
fn the_development_key_is_trusted_only_when_no_verifying_key_is_configured() {
    // On the local default the dev key used to be trusted whatever the config listed, so a
    // key-rotation rehearsal there said "runs" for a job the real deployment would reject.
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("dev-keys");
    let mut settings = config::Settings::default();
    let dev_signer = client::signer(&settings, Some(dev.clone())).unwrap();
    let job = unsigned(TenantId(Uuid::new_v4()), "noop", json!({}));
    let payload = serde_json::to_vec(&dev_signer.sign(&job)).unwrap();
    let limit = settings.worker.max_payload_bytes;

    // Nothing configured: the dev key is the keyring.
    let ring = client::keyring(&settings, Some(dev.clone())).unwrap();
    assert_eq!(ring.len(), 1);
    ring.verify(&payload, limit, Some(job.job_id), unix_now())
        .expect("the dev key's job verifies when it is the only key");

    // Another key configured: exactly that key, and the dev key's job is rejected.
    helpers::add_key(&mut settings, dir.path(), "prod");
    let ring = client::keyring(&settings, Some(dev)).unwrap();
    assert_eq!(ring.len(), 1);
    let err = ring
        .verify(&payload, limit, Some(job.job_id), unix_now())
        .expect_err("the dev key is not trusted beside a configured keyring");
    assert!(err.to_string().contains("dev"), "{err}");
}

/// Leaves one of `pool`'s connections inside a transaction that sqlx does not know about: a
/// BEGIN whose future is dropped after it was sent (sqlx#4385, still in sqlx 0.9). Returns
/// when the pool's next query provably runs inside it (`now()` frozen).
async fn poison_with_a_cancelled_begin(pool: &PgPool) {
    use sqlx::Connection as _;
    for _ in 0..50 {
        let mut conn = pool.acquire().await.unwrap();
        {
            let begin = conn.begin();
            tokio::pin!(begin);
            // One poll sends the BEGIN; dropping the future then forgets it was sent.
            let _ = futures::poll!(begin.as_mut());
        }
        drop(conn);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let frozen: bool = sqlx::query_scalar("select now() <> statement_timestamp()")
            .fetch_one(pool)
            .await
            .unwrap();
        if frozen {
            return;
        }
    }
    panic!("could not reproduce a connection left inside a transaction");
}

#[tokio::test]
async fn a_cancelled_begin_on_the_applications_queue_pool_does_not_stall_the_worker() {
    // `run --until-idle` once stopped after 0.3 s without fetching its job: a queue connection
    // left inside a transaction by a cancelled BEGIN saw a frozen `now()`, so the idle check
    // found nothing runnable (and what it wrote never committed).
    let db = TestDb::new().await;
    let tenant = db.tenant("A").await;
    let app_queue_pool = tenant_worker::db::pool(
        "queue",
        &db.urls.queue,
        config::MIN_CONNECTIONS,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    poison_with_a_cancelled_begin(&app_queue_pool).await;
    let worker = Worker::builder(
        db.scope().await,
        app_queue_pool.clone(),
        db.keyring(),
        &db.settings,
    )
    .registry(&db.kinds(Catalog::new()))
    .build()
    .unwrap();
    // Enqueued after the poisoned transaction began: its `now()` is older than their run_at.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut jobs = Vec::new();
    for _ in 0..5 {
        jobs.push(db.enqueue(tenant, "noop", json!({})).await);
    }
    let summary = tokio::time::timeout(Duration::from_secs(60), worker.run_until_idle())
        .await
        .expect("the worker stops")
        .unwrap();
    assert_eq!(summary.done, 5, "{summary:?}");
    // Recorded as done for everyone, not only inside the poisoned transaction.
    let done: i64 = sqlx::query_scalar(
        "select count(*) from apalis.jobs where id = any($1) and status = 'Done'",
    )
    .bind(
        jobs.iter()
            .map(|j| j.to_ulid().to_string())
            .collect::<Vec<_>>(),
    )
    .fetch_one(&db.admin().await)
    .await
    .unwrap();
    assert_eq!(done, 5);
}

#[test]
fn the_demo_reports_on_stdout_without_log_noise_or_colour() {
    // Its log lines (coloured even into a pipe) used to interleave with its report.
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(helpers::bin());
    cmd.arg("demo")
        .current_dir(dir.path())
        .env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("TENANT_WORKER__") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().unwrap();
    let (report, logs) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "{report}{logs}");
    assert!(report.contains("demo passed"), "{report}");
    assert!(!logs.contains('\u{1b}'), "no colour into a pipe: {logs}");
    assert!(
        !logs.contains(" INFO "),
        "no info logs unless RUST_LOG asks: {logs}"
    );
    assert!(report.contains("tw_scheduler"), "{report}");
    assert!(report.contains("Northwind (scheduled)"), "{report}");
    assert!(report.contains("1 of them by a schedule"), "{report}");
}

/// Runs `openssl` with `args`; the test needs it (`apt-get install openssl`).
fn openssl(args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is needed for this test (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn signing_keys_work_both_ways_with_openssl() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let job = unsigned(TenantId(Uuid::new_v4()), "noop", json!({}));
    let limit = config::Settings::default().worker.max_payload_bytes;

    // A key from `keys generate` signs with OpenSSL (as an application in another language
    // would), and the worker verifies; OpenSSL verifies it with the public key file too.
    let out = helpers::cli_with_env(
        &["keys", "generate", "--out", &path(""), "--key-id", "ours"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let bytes = tenant_worker::envelope::signing_bytes(
        job.job_id,
        job.tenant_id,
        &job.kind,
        "{}",
        job.issued_at,
        job.expires_at,
        "ours",
    );
    std::fs::write(path("msg.bin"), &bytes).unwrap();
    let (key, public) = (path("ours.key.pem"), path("ours.pub.pem"));
    let (msg, sig) = (path("msg.bin"), path("sig.bin"));
    openssl(&["pkey", "-in", &key, "-noout"]);
    openssl(&[
        "pkeyutl", "-sign", "-inkey", &key, "-rawin", "-in", &msg, "-out", &sig,
    ]);
    openssl(&[
        "pkeyutl", "-verify", "-pubin", "-inkey", &public, "-rawin", "-in", &msg, "-sigfile", &sig,
    ]);
    let envelope = Envelope {
        v: 1,
        job_id: job.job_id,
        tenant_id: job.tenant_id,
        kind: job.kind.clone(),
        args: RawValue::from_string("{}".into()).unwrap(),
        issued_at: job.issued_at,
        expires_at: job.expires_at,
        key_id: "ours".into(),
        sig: base64::engine::general_purpose::STANDARD.encode(std::fs::read(&sig).unwrap()),
    };
    let mut ring = tenant_worker::Keyring::new();
    ring.insert(
        KeyId::parse("ours").unwrap(),
        tenant_worker::Keyring::load_public(std::path::Path::new(&public)).unwrap(),
    );
    let payload = serde_json::to_vec(&envelope).unwrap();
    let verified = ring
        .verify(&payload, limit, Some(job.job_id), unix_now())
        .expect("the OpenSSL signature verifies");
    assert_eq!(verified.tenant_id, job.tenant_id);

    // A key made by OpenSSL signs in the worker, and its public key verifies.
    let (theirs, theirs_pub) = (path("theirs.key.pem"), path("theirs.pub.pem"));
    openssl(&["genpkey", "-algorithm", "ed25519", "-out", &theirs]);
    openssl(&["pkey", "-in", &theirs, "-pubout", "-out", &theirs_pub]);
    let signer = Signer::from_file(
        KeyId::parse("theirs").unwrap(),
        std::path::Path::new(&theirs),
    )
    .expect("an openssl genpkey key loads");
    let mut ring = tenant_worker::Keyring::new();
    ring.insert(
        KeyId::parse("theirs").unwrap(),
        tenant_worker::Keyring::load_public(std::path::Path::new(&theirs_pub)).unwrap(),
    );
    let payload = serde_json::to_vec(&signer.sign(&job)).unwrap();
    ring.verify(&payload, limit, Some(job.job_id), unix_now())
        .expect("a job signed with an OpenSSL key verifies");
}
