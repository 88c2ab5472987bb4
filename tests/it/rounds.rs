//! Rounds: short jobs of one tenant fetched together share one scoped transaction. These
//! tests show that sharing changes nothing about what a job can see or what takes effect.

use std::collections::BTreeMap;

use serde_json::json;
use tenant_worker::TenantId;
use tenant_worker::jobs::declared::Catalog;
use tenant_worker::queue::NewJob;
use tenant_worker::tenant;
use uuid::Uuid;

use crate::helpers::{TestDb, enqueue_all, insert_signed, job_info, run_worker, seed_towers};

/// Run records read as the superuser: job id -> (tenant, started_at, result).
async fn runs(
    admin: &sqlx::PgPool,
) -> BTreeMap<
    Uuid,
    (
        TenantId,
        chrono::DateTime<chrono::Utc>,
        Option<serde_json::Value>,
    ),
> {
    let rows: Vec<(
        Uuid,
        TenantId,
        chrono::DateTime<chrono::Utc>,
        Option<serde_json::Value>,
    )> = sqlx::query_as("select job_id, tenant_id, started_at, result from job_runs")
        .fetch_all(admin)
        .await
        .unwrap();
    rows.into_iter()
        .map(|(j, t, s, r)| (j, (t, s, r)))
        .collect()
}

/// `started_at` is the transaction's start: jobs that ran in one round share it.
fn largest_round(
    runs: &BTreeMap<
        Uuid,
        (
            TenantId,
            chrono::DateTime<chrono::Utc>,
            Option<serde_json::Value>,
        ),
    >,
    tenant: TenantId,
) -> usize {
    let mut by_start: BTreeMap<chrono::DateTime<chrono::Utc>, usize> = BTreeMap::new();
    for (t, started, _) in runs.values() {
        if *t == tenant {
            *by_start.entry(*started).or_default() += 1;
        }
    }
    by_start.values().copied().max().unwrap_or(0)
}

#[tokio::test]
async fn jobs_of_two_tenants_queued_together_share_rounds_and_each_sees_only_its_own_rows() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let app = db.scope().await;
    seed_towers(&app, a, 5).await;
    seed_towers(&app, b, 2).await;

    // Interleaved, as a shared queue holds them: the fetch groups them by tenant.
    let jobs: Vec<(TenantId, NewJob)> = (0..24)
        .map(|i| {
            let t = if i % 2 == 0 { a } else { b };
            (t, NewJob::new("noop", json!({"count": true})))
        })
        .collect();
    let tenants: Vec<TenantId> = jobs.iter().map(|(t, _)| *t).collect();
    let ids = enqueue_all(&db.enqueuer().await, jobs).await;
    let summary = db.run_until_idle().await;
    assert_eq!((summary.done, summary.failed, summary.rejected), (24, 0, 0));

    let admin = db.admin().await;
    let runs = runs(&admin).await;
    assert_eq!(runs.len(), 24);
    for (id, tenant) in ids.iter().zip(&tenants) {
        let (run_tenant, _, result) = &runs[&id.0];
        assert_eq!(run_tenant, tenant);
        let expected = if *tenant == a { 5 } else { 2 };
        assert_eq!(
            result.as_ref(),
            Some(&json!({ "records_visible": expected })),
            "job {id} of tenant {tenant}"
        );
        assert_eq!(job_info(&db.queue().await, *id).await.state, "done");
    }
    // They did share: several jobs of a tenant in one transaction.
    assert!(largest_round(&runs, a) >= 2, "{runs:#?}");
    assert!(largest_round(&runs, b) >= 2, "{runs:#?}");
}

#[tokio::test]
async fn a_failing_job_in_a_round_is_rolled_back_alone_and_the_others_take_effect() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let app = db.scope().await;
    seed_towers(&app, a, 3).await;
    seed_towers(&app, b, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let declare = |name: &str, sql: &str| {
        std::fs::write(
            dir.path().join(format!("{name}.toml")),
            format!(
                "name = \"{name}\"\nkind = \"process\"\ndescription = \"test\"\nsql = \"\"\"\n{sql}\n\"\"\"\n"
            ),
        )
        .unwrap();
    };
    declare(
        "mark_first",
        "update records set data = data || '{\"first\": true}' where kind = 'property'",
    );
    // It updates rows too, then fails on its first row: its statement must be rolled back
    // without taking the round's transaction down with it.
    declare(
        "break_rows",
        "update records set data = data || jsonb_build_object('broken', 1 / (length(data ->> 'name') - length(data ->> 'name'))) where kind = 'property'",
    );
    declare(
        "mark_second",
        "update records set data = data || '{\"second\": true}' where kind = 'property'",
    );
    let catalog = Catalog::load(dir.path(), true).unwrap();
    let enqueuer = db.enqueuer_with(catalog.clone()).await;
    let jobs = ["mark_first", "break_rows", "mark_second"]
        .iter()
        .map(|n| (a, NewJob::new("process", json!({ "name": n }))))
        .collect();
    let [first, broken, second] = enqueue_all(&enqueuer, jobs).await[..] else {
        panic!("three jobs");
    };
    let summary = run_worker(&db, catalog).await;
    assert_eq!((summary.done, summary.failed), (2, 1), "{summary:?}");

    let queue = db.queue().await;
    let info = job_info(&queue, broken).await;
    assert_eq!(info.state, "dead", "{info:?}");
    assert!(
        info.error().unwrap().contains("division by zero"),
        "{info:?}"
    );
    for id in [first, second] {
        assert_eq!(job_info(&queue, id).await.state, "done");
    }

    let admin = db.admin().await;
    let runs = runs(&admin).await;
    assert!(
        !runs.contains_key(&broken.0),
        "the failed job left a run record"
    );
    let (started_first, started_second) = (runs[&first.0].1, runs[&second.0].1);
    assert_eq!(
        started_first, started_second,
        "the two good jobs ran in one round, around the failing one"
    );
    // A's rows carry both good jobs' changes and none of the failing one's; B's are untouched.
    let rows: Vec<(TenantId, serde_json::Value)> =
        sqlx::query_as("select tenant_id, data from records order by tenant_id")
            .fetch_all(&admin)
            .await
            .unwrap();
    for (tenant, data) in rows {
        if tenant == a {
            assert_eq!(data["first"], json!(true), "{data}");
            assert_eq!(data["second"], json!(true), "{data}");
            assert!(data.get("broken").is_none(), "{data}");
        } else {
            assert_eq!(tenant, b);
            assert!(
                data.get("first").is_none() && data.get("second").is_none(),
                "{data}"
            );
        }
    }
}

#[tokio::test]
async fn jobs_of_a_suspended_or_unknown_tenant_are_rejected_as_a_round_and_touch_nothing() {
    let db = TestDb::new().await;
    let (a, c) = (db.tenant("Northwind").await, db.tenant("Cobalt").await);
    let ghost = TenantId(Uuid::new_v4());
    let app = db.scope().await;
    seed_towers(&app, a, 2).await;
    seed_towers(&app, c, 2).await;
    let admin = db.admin().await;
    let mut suspended = Vec::new();
    let mut unknown = Vec::new();
    let mut fine = Vec::new();
    for _ in 0..4 {
        suspended.push(db.enqueue(c, "noop", json!({"count": true})).await);
        unknown.push(insert_signed(&db, &admin, ghost, "noop", json!({})).await);
        fine.push(db.enqueue(a, "noop", json!({"count": true})).await);
    }
    tenant::set_status(&admin, &db.settings.roles.owner, c, false)
        .await
        .unwrap();

    let summary = db.run_until_idle().await;
    assert_eq!(
        (summary.done, summary.rejected, summary.failed),
        (4, 8, 0),
        "{summary:?}"
    );
    let queue = db.queue().await;
    for (jobs, reason) in [
        (&suspended, "tenant is suspended"),
        (&unknown, "unknown tenant"),
    ] {
        for job in jobs {
            let info = job_info(&queue, *job).await;
            assert_eq!(
                (info.state.as_str(), info.attempts),
                ("rejected", 1),
                "{info:?}"
            );
            assert!(info.error().unwrap().contains(reason), "{info:?}");
        }
    }
    let runs = runs(&admin).await;
    let expected: std::collections::BTreeSet<Uuid> = fine.iter().map(|j| j.0).collect();
    assert_eq!(
        runs.keys()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        expected,
        "only the healthy tenant's jobs left run records"
    );
    for job in &fine {
        assert_eq!(runs[&job.0].2, Some(json!({ "records_visible": 2 })));
    }
}
