//! Tenant-fair scheduling as correctness: shares by weight, caps across workers, pause and
//! resume, bad settings, and no job ever stranded by the lanes' bookkeeping. (How fast and how
//! fair under load is `bench --scenario fairness`.)

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tenant_worker::queue::{self, JobState, NewJob};
use tenant_worker::tenant::{self, Share};
use tenant_worker::worker::{RunOptions, Summary};
use tenant_worker::{JobContext, JobError, JobId, Registry, ScopedTx, TenantId, TenantJob};
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestDb, job_info, row_id, stderr};

/// Sleeps for `ms`, alone in its transaction (so each job holds a worker slot while it runs).
struct Nap;

#[derive(Serialize, Deserialize)]
struct NapArgs {
    ms: u64,
}

impl TenantJob for Nap {
    const KIND: &'static str = "nap";
    type Args = NapArgs;
    type Output = ();

    async fn run(&self, _: &mut ScopedTx, _: &JobContext, args: NapArgs) -> Result<(), JobError> {
        tokio::time::sleep(Duration::from_millis(args.ms)).await;
        Ok(())
    }
}

fn registry() -> Arc<Registry> {
    let mut r = Registry::new();
    r.register(Nap).unwrap();
    Arc::new(r)
}

async fn naps(
    db: &TestDb,
    kinds: &Arc<Registry>,
    tenant: TenantId,
    n: usize,
    ms: u64,
) -> Vec<JobId> {
    let enqueuer = db.enqueuer_for(kinds.clone()).await;
    let jobs = (0..n)
        .map(|_| (tenant, NewJob::of::<Nap>(&NapArgs { ms }).unwrap()))
        .collect();
    enqueuer
        .enqueue_batch(jobs)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect()
}

async fn run(db: &TestDb, kinds: &Registry, name: &str) -> Summary {
    let worker = db.worker_for(kinds).await;
    let opts = RunOptions {
        until_idle: true,
        name: Some(name.into()),
    };
    tokio::time::timeout(
        Duration::from_secs(120),
        worker.run(opts, CancellationToken::new()),
    )
    .await
    .expect("worker finished in time")
    .expect("worker ran")
}

fn row_ids(ids: &[JobId]) -> Vec<String> {
    ids.iter().map(|j| row_id(*j)).collect()
}

async fn running_of(admin: &PgPool, tenant: TenantId) -> i64 {
    sqlx::query_scalar(
        "select count(*) from apalis.jobs where status = 'Running' and metadata -> 'tenant_id' = $1",
    )
    .bind(tenant.to_string())
    .fetch_one(admin)
    .await
    .unwrap()
}

#[tokio::test]
async fn tenants_with_work_share_the_worker_by_weight() {
    let mut db = TestDb::new().await;
    // One group at a time, eight jobs a group: the order of claims is the fair order itself.
    db.settings.worker.concurrency = 1;
    db.settings.worker.batch_size = 8;
    db.settings.worker.fair_quantum_ms = 1_000;
    let kinds = registry();
    let (a, b) = (db.tenant("Heavy A").await, db.tenant("Light B").await);
    let admin = db.admin().await;
    tenant::set_share(
        &admin,
        &db.settings.roles.owner,
        a,
        Share {
            weight: Some(3),
            max_running: None,
        },
    )
    .await
    .unwrap();
    let a_jobs = naps(&db, &kinds, a, 240, 3).await;
    let b_jobs = naps(&db, &kinds, b, 240, 3).await;
    let summary = run(&db, &kinds, "weights").await;
    assert_eq!(summary.done, 480, "{summary:?}");

    // While both had work (until A's last claim), B should have had a quarter of the claims.
    let b_while_both: i64 = sqlx::query_scalar(
        "select count(*) from apalis.jobs
         where id = any($1) and lock_at < (select max(lock_at) from apalis.jobs where id = any($2))",
    )
    .bind(row_ids(&b_jobs))
    .bind(row_ids(&a_jobs))
    .fetch_one(&admin)
    .await
    .unwrap();
    println!("weights 3:1: {b_while_both} of B's jobs claimed while A had work (3:1 is 80)");
    // 240 of A at weight 3 against B at weight 1: 80 of B's (3:1), within about a third.
    assert!(
        (55..=110).contains(&b_while_both),
        "B had {b_while_both} jobs claimed while A (weight 3) still had work; 3:1 is 80"
    );
}

#[tokio::test]
async fn a_cap_holds_across_two_workers_and_does_not_slow_the_other_tenant() {
    let mut db = TestDb::new().await;
    db.settings.worker.concurrency = 4;
    db.settings.worker.batch_size = 4;
    let kinds = registry();
    let (a, b) = (db.tenant("Capped A").await, db.tenant("Free B").await);
    let admin = db.admin().await;
    let owner = db.settings.roles.owner.clone();
    let t = tenant::set_share(
        &admin,
        &owner,
        a,
        Share {
            weight: None,
            max_running: Some(Some(2)),
        },
    )
    .await
    .unwrap();
    assert_eq!((t.weight, t.max_running), (1, Some(2)));
    naps(&db, &kinds, a, 16, 100).await;
    naps(&db, &kinds, b, 16, 100).await;

    let stop = CancellationToken::new();
    let sampler = {
        let (admin, stop) = (admin.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut most_a, mut most_b) = (0, 0);
            while !stop.is_cancelled() {
                most_a = most_a.max(running_of(&admin, a).await);
                most_b = most_b.max(running_of(&admin, b).await);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (most_a, most_b)
        })
    };
    let (one, two) = tokio::join!(run(&db, &kinds, "cap-1"), run(&db, &kinds, "cap-2"));
    stop.cancel();
    let (most_a, most_b) = sampler.await.unwrap();
    assert_eq!(one.done + two.done, 32, "{one:?} {two:?}");
    println!("cap 2: A had at most {most_a} running at once, B {most_b}");
    assert_eq!(
        most_a, 2,
        "A (max-running 2) had at most {most_a} running at once"
    );
    assert!(
        most_b > 2,
        "B (no cap) had at most {most_b} running at once: held to A's cap?"
    );
}

#[tokio::test]
async fn a_paused_tenants_jobs_wait_and_resume_in_order_while_others_run() {
    let mut db = TestDb::new().await;
    db.settings.worker.concurrency = 1;
    db.settings.worker.batch_size = 1;
    let kinds = registry();
    let (a, b) = (db.tenant("Paused A").await, db.tenant("Running B").await);
    let admin = db.admin().await;
    let owner = db.settings.roles.owner.clone();
    tenant::set_paused(&admin, &owner, a, true).await.unwrap();
    let a_jobs = naps(&db, &kinds, a, 5, 0).await;
    let b_jobs = naps(&db, &kinds, b, 5, 0).await;

    // Paused jobs are not runnable: the worker runs B's and goes idle.
    let summary = run(&db, &kinds, "paused").await;
    assert_eq!((summary.done, summary.rejected), (5, 0), "{summary:?}");
    let queue_pool = db.queue().await;
    for id in &b_jobs {
        assert_eq!(job_info(&queue_pool, *id).await.state, JobState::Done);
    }
    for id in &a_jobs {
        assert_eq!(job_info(&queue_pool, *id).await.state, JobState::Pending);
    }
    let loads = queue::tenant_loads(&queue_pool, &db.settings.worker.queue, 10)
        .await
        .unwrap();
    let load = loads
        .iter()
        .find(|l| l.tenant_id == a.to_string())
        .expect("A's load is shown");
    assert!(
        load.paused && load.runnable == 5 && load.running == 0,
        "{load:?}"
    );
    assert!(
        loads.iter().all(|l| l.tenant_id != b.to_string()),
        "B has nothing unfinished: {loads:?}"
    );

    tenant::set_paused(&admin, &owner, a, false).await.unwrap();
    let summary = run(&db, &kinds, "resumed").await;
    assert_eq!(summary.done, 5, "{summary:?}");
    let order: Vec<String> =
        sqlx::query_scalar("select id from apalis.jobs where id = any($1) order by lock_at, id")
            .bind(row_ids(&a_jobs))
            .fetch_all(&admin)
            .await
            .unwrap();
    assert_eq!(order, row_ids(&a_jobs), "A's jobs ran in order");
}

#[tokio::test]
async fn bad_weights_and_caps_are_refused_and_change_nothing() {
    let db = TestDb::new().await;
    let a = db.tenant("A").await;
    let admin = db.admin().await;
    let owner = db.settings.roles.owner.clone();
    tenant::set_share(
        &admin,
        &owner,
        a,
        Share {
            weight: Some(5),
            max_running: Some(Some(7)),
        },
    )
    .await
    .unwrap();
    let bad = [
        (Some(0), None, "invalid weight 0"),
        (Some(-1), None, "invalid weight -1"),
        (Some(1_001), None, "invalid weight 1001"),
        (Some(2), Some(Some(0)), "invalid max-running 0"),
        (None, Some(Some(-3)), "invalid max-running -3"),
    ];
    for (weight, max_running, expected) in bad {
        let e = tenant::set_share(
            &admin,
            &owner,
            a,
            Share {
                weight,
                max_running,
            },
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains(expected), "{e}");
    }
    let t = tenant::list(&admin, &owner).await.unwrap().remove(0);
    assert_eq!((t.weight, t.max_running, t.paused), (5, Some(7), false));
    let unknown = TenantId(uuid::Uuid::new_v4());
    let e = tenant::set_share(&admin, &owner, unknown, Share::default())
        .await
        .unwrap_err();
    assert!(matches!(e, tenant::Error::NotFound(_)), "{e}");

    // The CLI: a fraction and a zero cap are clear errors; `none` removes the cap.
    let id = a.to_string();
    for (args, expected) in [
        (vec!["--weight", "1.5"], "`1.5` is not a whole number"),
        (vec!["--max-running", "0"], "use `tenant pause`"),
        (vec!["--weight", "-2"], "invalid weight -2"),
        (vec![], "nothing to change"),
    ] {
        let mut cmd = vec!["tenant", "set", id.as_str()];
        cmd.extend(args);
        let out = db.cli(&cmd);
        assert!(!out.status.success(), "{cmd:?}");
        assert!(stderr(&out).contains(expected), "{cmd:?}: {}", stderr(&out));
    }
    let out = db.cli(&["tenant", "set", &id, "--max-running", "none"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let t = tenant::list(&admin, &owner).await.unwrap().remove(0);
    assert_eq!((t.weight, t.max_running), (5, None));
}

#[tokio::test]
async fn no_job_is_stranded_when_lanes_empty_and_refill_while_workers_run() {
    let mut db = TestDb::new().await;
    db.settings.worker.concurrency = 4;
    db.settings.worker.batch_size = 2;
    let kinds = registry();
    let mut tenants = Vec::new();
    for i in 0..6 {
        tenants.push(db.tenant(&format!("T{i}")).await);
    }
    let admin = db.admin().await;
    let stop = CancellationToken::new();
    let worker = db.worker_for(&kinds).await;
    let running = tokio::spawn(worker.run(
        RunOptions {
            until_idle: false,
            name: Some("refill".into()),
        },
        stop.clone(),
    ));
    // Single jobs, one at a time per tenant, so lanes keep running dry and refilling while
    // the worker retires them: the race the lane locking protocol exists for.
    let enqueuer = db.enqueuer_for(kinds.clone()).await;
    let mut all = Vec::new();
    for round in 0..60 {
        let t = tenants[round % tenants.len()];
        let e = enqueuer
            .enqueue::<Nap>(t, &NapArgs { ms: 0 })
            .await
            .unwrap();
        all.push(e.id);
        tokio::time::sleep(Duration::from_millis((round % 4) as u64)).await;
    }
    let ids = row_ids(&all);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let done: i64 = sqlx::query_scalar(
            "select count(*) from apalis.jobs where id = any($1) and status = 'Done'",
        )
        .bind(&ids)
        .fetch_one(&admin)
        .await
        .unwrap();
        if done == ids.len() as i64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {done} of {} jobs done after 30 s: some lane was retired with work in it",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    running.await.unwrap().unwrap();
    // Every lane that ran dry is retired, none left claiming work it does not have.
    let active: HashMap<String, bool> =
        sqlx::query_as::<_, (String, bool)>("select tenant, active from apalis.tenant_lanes")
            .fetch_all(&admin)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(active.len(), tenants.len(), "{active:?}");
}

#[tokio::test]
async fn job_sql_cannot_read_or_move_the_lanes() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("A").await, db.tenant("B").await);
    let kinds = registry();
    naps(&db, &kinds, b, 3, 0).await;
    let scope = db.scope().await;
    for sql in [
        "select count(*) from apalis.tenant_lanes",
        "update apalis.tenant_lanes set vtime = 0",
        "select count(*) from apalis.fair_fetch('x', 'tenant-jobs', 1, array['nap'], 1.0)",
    ] {
        let mut tx = db.scoped(&scope, a).await;
        let e = sqlx::query(sql)
            .execute(tx.conn().await.unwrap())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("permission denied"), "{sql}: {e}");
    }
}
