//! The public job API, end to end: kinds an application registers itself, run by the real
//! worker through the real queue as the locked-down app role.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgPool;
use tenant_worker::jobs::declared::Catalog;
use tenant_worker::queue::{self, JobState, NewJob};
use tenant_worker::worker::Error as WorkerError;
use tenant_worker::{
    JobContext, JobError, JobId, Progress, Registry, ScopedTx, TenantId, TenantJob, jobs,
};

use crate::helpers::{TestDb, insert_signed, job_info, seed_towers};

/// Lists the names of the records it can see, with no `where tenant_id`.
struct Census;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CensusArgs {
    /// Only names starting with this.
    prefix: String,
}

#[derive(Serialize)]
struct CensusOutput {
    tenant: TenantId,
    names: Vec<String>,
}

impl TenantJob for Census {
    const KIND: &'static str = "census";
    type Args = CensusArgs;
    type Output = CensusOutput;

    fn shares_rounds(&self, _: &CensusArgs) -> bool {
        true
    }

    async fn run(
        &self,
        tx: &mut ScopedTx,
        ctx: &JobContext,
        args: CensusArgs,
    ) -> Result<CensusOutput, JobError> {
        let names = sqlx::query_scalar(
            "select data ->> 'name' from records where data ->> 'name' like $1 || '%' order by 1",
        )
        .bind(args.prefix)
        .fetch_all(tx.conn().await?)
        .await?;
        Ok(CensusOutput {
            tenant: ctx.tenant_id(),
            names,
        })
    }
}

/// Arguments checked beyond their types.
struct Strict;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictArgs {
    n: u32,
}

impl TenantJob for Strict {
    const KIND: &'static str = "strict";
    type Args = StrictArgs;
    type Output = u32;

    fn validate(&self, args: &StrictArgs) -> Result<(), String> {
        if args.n >= 10 {
            return Err(format!("n must be below 10, not {}", args.n));
        }
        Ok(())
    }

    async fn run(
        &self,
        _: &mut ScopedTx,
        _: &JobContext,
        args: StrictArgs,
    ) -> Result<u32, JobError> {
        Ok(args.n * 2)
    }
}

/// Set once the `snooze_once` job has snoozed.
static SNOOZED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Ends each way a run can end, chosen by its arguments.
struct Outcomes;

#[derive(Serialize, Deserialize)]
struct OutcomeArgs {
    how: String,
}

impl TenantJob for Outcomes {
    const KIND: &'static str = "outcomes";
    type Args = OutcomeArgs;
    type Output = Value;

    fn timeout(&self) -> Option<Duration> {
        Some(Duration::from_millis(800))
    }

    fn max_attempts(&self) -> Option<u32> {
        Some(2)
    }

    fn backoff(&self, _attempt: u32) -> Option<Duration> {
        Some(Duration::from_millis(100))
    }

    async fn run(
        &self,
        tx: &mut ScopedTx,
        ctx: &JobContext,
        args: OutcomeArgs,
    ) -> Result<Value, JobError> {
        // Every attempt writes a record first: an attempt that does not succeed must leave none.
        sqlx::query("insert into records (tenant_id, kind, data) values ($1, 'property', $2)")
            .bind(ctx.tenant_id())
            .bind(json!({"name": format!("attempt {} of {}", ctx.attempt(), args.how)}))
            .execute(tx.conn().await?)
            .await?;
        let first = ctx.attempt() == 1;
        match args.how.as_str() {
            "retry_once" if first => {
                Err(JobError::retry_after("not yet", Duration::from_millis(200)))
            }
            "fail" => Err(JobError::fail("this will never work")),
            "cancel" => Err(JobError::cancel("nothing to do any more")),
            // A snooze does not count as an attempt, so the attempt cannot tell the runs apart.
            "snooze_once" if !SNOOZED.swap(true, std::sync::atomic::Ordering::SeqCst) => {
                Err(JobError::snooze(Duration::from_millis(300)))
            }
            "panic" => panic!("a bug in the job"),
            "hang" => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(Value::Null)
            }
            "progress" => {
                ctx.progress(5, 10);
                tokio::time::sleep(Duration::from_millis(700)).await;
                ctx.report(Progress {
                    done: 10,
                    total: Some(10),
                    message: Some("all rows".into()),
                });
                Ok(json!({"rows": 10}))
            }
            _ => Ok(json!({"attempt": ctx.attempt()})),
        }
    }
}

/// The kinds every test here runs: the built-ins and ours.
fn kinds(db: &TestDb) -> Arc<Registry> {
    let mut registry = jobs::builtins(&db.settings, Arc::new(Catalog::new()));
    registry
        .register(Census)
        .unwrap()
        .register(Strict)
        .unwrap()
        .register(Outcomes)
        .unwrap();
    Arc::new(registry)
}

async fn run_until_idle(db: &TestDb, kinds: &Registry) -> tenant_worker::Summary {
    tokio::time::timeout(
        Duration::from_secs(60),
        db.worker_for(kinds).await.run_until_idle(),
    )
    .await
    .expect("the worker finished in time")
    .expect("the worker ran")
}

/// The run records of a job, read as the superuser: (tenant, result).
async fn runs_of(admin: &PgPool, job: JobId) -> Vec<(TenantId, Option<Value>)> {
    sqlx::query_as("select tenant_id, result from job_runs where job_id = $1")
        .bind(job)
        .fetch_all(admin)
        .await
        .unwrap()
}

async fn count(admin: &PgPool, sql: &str, tenant: TenantId) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .bind(tenant)
        .fetch_one(admin)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_applications_own_kind_sees_one_tenant_and_keeps_its_output() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("A").await, db.tenant("B").await);
    let app = db.scope().await;
    seed_towers(&app, a, 3).await;
    seed_towers(&app, b, 5).await;
    let kinds = kinds(&db);
    let enqueuer = db.enqueuer_for(kinds.clone()).await;
    let args = CensusArgs {
        prefix: "Tower".into(),
    };
    // Several per tenant, so they share rounds too.
    let mut jobs = Vec::new();
    for _ in 0..3 {
        for t in [a, b] {
            jobs.push((t, enqueuer.enqueue::<Census>(t, &args).await.unwrap().id));
        }
    }
    let summary = run_until_idle(&db, &kinds).await;
    assert_eq!(summary.done, 6, "{summary:?}");
    let admin = db.admin().await;
    let queue_pool = db.queue().await;
    for (tenant, job) in jobs {
        let expected = if tenant == a { 3 } else { 5 };
        let runs = runs_of(&admin, job).await;
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].0, tenant);
        let output = runs[0].1.clone().unwrap();
        assert_eq!(output["tenant"], json!(tenant));
        let names = output["names"].as_array().unwrap();
        assert_eq!(names.len(), expected, "{output}");
        let info = job_info(&queue_pool, job).await;
        assert_eq!(info.state, JobState::Done);
        assert_eq!(info.result(), Some(&output), "jobs show shows the output");
    }
}

#[tokio::test]
async fn a_kind_registered_twice_or_badly_named_is_refused_when_the_worker_is_built() {
    let db = TestDb::new().await;
    let built = tenant_worker::Worker::builder(
        db.scope().await,
        db.queue().await,
        db.keyring(),
        &db.settings,
    )
    .register(Census)
    .register(Strict)
    .register(Census)
    .build();
    match built {
        Err(WorkerError::Register(e)) => {
            assert!(
                e.to_string().contains("`census` is registered twice"),
                "{e}"
            )
        }
        other => panic!("expected a duplicate kind, got {other:?}"),
    }

    struct Badly;
    impl TenantJob for Badly {
        const KIND: &'static str = "Bad-Name";
        type Args = ();
        type Output = ();
        async fn run(&self, _: &mut ScopedTx, _: &JobContext, _: ()) -> Result<(), JobError> {
            Ok(())
        }
    }
    let mut registry = Registry::new();
    let e = registry.register(Badly).unwrap_err();
    assert!(e.to_string().contains("is not a valid kind name"), "{e}");
    assert!(registry.is_empty());

    let none = tenant_worker::Worker::builder(
        db.scope().await,
        db.queue().await,
        db.keyring(),
        &db.settings,
    )
    .build();
    assert!(matches!(none, Err(WorkerError::NoKinds)), "{none:?}");
}

#[tokio::test]
async fn arguments_are_checked_at_enqueue_with_their_path_and_again_before_the_transaction() {
    let db = TestDb::new().await;
    let a = db.tenant("A").await;
    let kinds = kinds(&db);
    let enqueuer = db.enqueuer_for(kinds.clone()).await;
    let admin = db.admin().await;
    let queued = || async {
        sqlx::query_scalar::<_, i64>("select count(*) from apalis.jobs")
            .fetch_one(&admin)
            .await
            .unwrap()
    };
    let refused = [
        (
            NewJob::new("strict", json!({"n": 11})),
            "n must be below 10, not 11",
        ),
        (
            NewJob::new("strict", json!({"n": "seven"})),
            "invalid arguments for `strict`: n: invalid type: string \"seven\", expected u32",
        ),
        (
            NewJob::new("strict", json!({"n": 1, "m": 2})),
            "unknown field `m`",
        ),
        (NewJob::new("strict", json!({})), "missing field `n`"),
        (
            NewJob::new("census", json!({"prefix": ["x"]})),
            "invalid arguments for `census`: prefix: invalid type: sequence",
        ),
        (NewJob::new("nope", json!({})), "unknown job kind `nope`"),
    ];
    for (job, expected) in refused {
        let err = enqueuer.enqueue_job(a, job).await.unwrap_err();
        assert!(
            matches!(err, queue::Error::Invalid(_)),
            "{err:?} should be a refusal"
        );
        let text = err.to_string();
        assert!(text.contains(expected), "expected `{expected}` in `{text}`");
    }
    let err = enqueuer
        .enqueue::<Strict>(a, &StrictArgs { n: 12 })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("n must be below 10"), "{err}");
    assert_eq!(queued().await, 0, "nothing was enqueued");

    // Stored jobs whose arguments no longer fit the kind (it changed since they were
    // enqueued): rejected with the reason, never retried; a good one runs beside them.
    let stale = insert_signed(&db, &admin, a, "strict", json!({"count": 3})).await;
    let too_big = insert_signed(&db, &admin, a, "strict", json!({"n": 99})).await;
    let good = enqueuer
        .enqueue::<Strict>(a, &StrictArgs { n: 4 })
        .await
        .unwrap()
        .id;
    let summary = run_until_idle(&db, &kinds).await;
    assert_eq!((summary.done, summary.rejected), (1, 2), "{summary:?}");
    let queue_pool = db.queue().await;
    for (job, reason) in [
        (
            stale,
            "invalid arguments for `strict`: count: unknown field `count`",
        ),
        (
            too_big,
            "invalid arguments for `strict`: n must be below 10, not 99",
        ),
    ] {
        let info = job_info(&queue_pool, job).await;
        assert_eq!(info.state, JobState::Rejected, "{info:?}");
        assert_eq!(info.attempts, 1);
        let error = info.error().unwrap_or_default();
        assert!(error.contains(reason), "expected `{reason}` in `{error}`");
        assert!(runs_of(&admin, job).await.is_empty());
    }
    assert_eq!(job_info(&queue_pool, good).await.result(), Some(&json!(8)));
}

#[tokio::test]
async fn each_way_a_run_can_end_is_recorded_as_such_and_leaves_nothing_behind() {
    let mut db = TestDb::new().await;
    // The kind's own policy (2 attempts), overridden for this kind by the settings.
    db.settings.kinds.insert(
        "outcomes".into(),
        tenant_worker::config::KindSettings {
            max_attempts: Some(3),
            ..Default::default()
        },
    );
    let a = db.tenant("A").await;
    let kinds = kinds(&db);
    let enqueuer = db.enqueuer_for(kinds.clone()).await;
    let mut jobs = Vec::new();
    for how in [
        "retry_once",
        "fail",
        "cancel",
        "snooze_once",
        "panic",
        "hang",
        "plain",
    ] {
        let args = OutcomeArgs { how: how.into() };
        jobs.push((
            how,
            enqueuer.enqueue::<Outcomes>(a, &args).await.unwrap().id,
        ));
    }
    let started = Instant::now();
    let queue_pool = db.queue().await;
    // `run --until-idle` stops while jobs wait out a delay (a retry's, a snooze's): run again
    // until none waits.
    let mut summary = run_until_idle(&db, &kinds).await;
    loop {
        let waiting = queue::list(&queue_pool, &db.settings.worker.queue, Some(a), None, 100)
            .await
            .unwrap()
            .into_iter()
            .any(|j| matches!(j.state, JobState::Scheduled | JobState::Retrying));
        if !waiting {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let more = run_until_idle(&db, &kinds).await;
        summary.done += more.done;
        summary.failed += more.failed;
        summary.cancelled += more.cancelled;
        summary.snoozed += more.snoozed;
    }
    let admin = db.admin().await;
    let mut seen = Vec::new();
    for (how, job) in &jobs {
        let info = job_info(&queue_pool, *job).await;
        assert_eq!(
            info.max_attempts, 3,
            "{how}: the settings' limit, stored at enqueue"
        );
        seen.push((
            *how,
            info.state,
            info.attempts,
            info.error().unwrap_or_default(),
        ));
    }
    let find = |how: &str| seen.iter().find(|s| s.0 == how).unwrap().clone();
    assert_eq!(find("retry_once").1, JobState::Done, "{seen:?}");
    assert_eq!(find("retry_once").2, 2, "{seen:?}");
    assert_eq!(
        (find("fail").1, find("fail").2),
        (JobState::Dead, 1),
        "failing permanently uses no further attempt: {seen:?}"
    );
    assert!(find("fail").3.contains("this will never work"), "{seen:?}");
    assert_eq!(find("cancel").1, JobState::Cancelled, "{seen:?}");
    assert!(
        find("cancel").3.contains("nothing to do any more"),
        "{seen:?}"
    );
    assert_eq!(find("snooze_once").1, JobState::Done, "{seen:?}");
    assert_eq!(
        find("snooze_once").2,
        1,
        "a snooze is not an attempt: {seen:?}"
    );
    assert_eq!(find("panic").1, JobState::Dead, "{seen:?}");
    assert!(
        find("panic").3.contains("job panicked: a bug in the job"),
        "{seen:?}"
    );
    assert_eq!(
        (find("hang").1, find("hang").2),
        (JobState::Dead, 3),
        "{seen:?}"
    );
    assert!(find("hang").3.contains("timed out"), "{seen:?}");
    assert_eq!(find("plain").1, JobState::Done, "{seen:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!((summary.cancelled, summary.snoozed), (1, 1), "{summary:?}");
    // Only the runs that succeeded left their record (one each); every other attempt was
    // rolled back with its run record.
    let records = count(
        &admin,
        "select count(*) from records where tenant_id = $1",
        a,
    )
    .await;
    assert_eq!(
        records, 3,
        "retry_once, snooze_once and plain: one record each"
    );
    for (how, job) in &jobs {
        let runs = runs_of(&admin, *job).await;
        let expected = usize::from(matches!(*how, "retry_once" | "snooze_once" | "plain"));
        assert_eq!(runs.len(), expected, "{how}");
    }
}

#[tokio::test]
async fn progress_is_visible_while_a_job_runs_and_kept_when_it_ends() {
    let db = TestDb::new().await;
    let a = db.tenant("A").await;
    let kinds = kinds(&db);
    let enqueuer = db.enqueuer_for(kinds.clone()).await;
    let job = enqueuer
        .enqueue::<Outcomes>(
            a,
            &OutcomeArgs {
                how: "progress".into(),
            },
        )
        .await
        .unwrap()
        .id;
    let queue_pool = db.queue().await;
    let worker = tokio::spawn({
        let worker = db.worker_for(&kinds).await;
        worker.run_until_idle()
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut during = None;
    while Instant::now() < deadline {
        let info = job_info(&queue_pool, job).await;
        if info.state == JobState::Running && info.progress.is_some() {
            during = info.progress;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        during,
        Some(Progress {
            done: 5,
            total: Some(10),
            message: None
        }),
        "progress while the job runs"
    );
    worker.await.unwrap().unwrap();
    let info = job_info(&queue_pool, job).await;
    assert_eq!(info.state, JobState::Done);
    assert_eq!(
        info.progress,
        Some(Progress {
            done: 10,
            total: Some(10),
            message: Some("all rows".into())
        }),
        "the last report, stored with the outcome although it came within the throttle"
    );
}

#[tokio::test]
async fn a_typed_enqueue_inside_the_callers_transaction_exists_only_if_it_commits() {
    let db = TestDb::new().await;
    let a = db.tenant("A").await;
    let kinds = kinds(&db);
    let enqueuer = db.enqueuer_for(kinds.clone()).await;
    let queue_pool = db.queue().await;
    let mut tx = queue_pool.begin().await.unwrap();
    let rolled_back = enqueuer
        .enqueue_in::<Strict>(&mut tx, a, &StrictArgs { n: 1 })
        .await
        .unwrap()
        .id;
    tx.rollback().await.unwrap();
    let mut tx = queue_pool.begin().await.unwrap();
    let committed = enqueuer
        .enqueue_in::<Strict>(&mut tx, a, &StrictArgs { n: 2 })
        .await
        .unwrap()
        .id;
    tx.commit().await.unwrap();
    assert!(matches!(
        queue::show(&queue_pool, &rolled_back.to_string()).await,
        Err(queue::Error::NotFound(_))
    ));
    run_until_idle(&db, &kinds).await;
    assert_eq!(
        job_info(&queue_pool, committed).await.result(),
        Some(&json!(4))
    );
    // The unknown-tenant refusal is the enqueuer's, not the database's.
    let err = enqueuer
        .enqueue::<Strict>(TenantId(uuid::Uuid::new_v4()), &StrictArgs { n: 1 })
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with("no tenant with id"), "{err}");
}
