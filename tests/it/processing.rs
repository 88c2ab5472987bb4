//! Imports, rollups and declared processing, proven end to end: the real worker reads real
//! inbox files and writes through the tenant-scoped transaction; every expectation is ground
//! truth read as the superuser with plain SQL, for two tenants whose data collides on purpose.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, TimeZone as _, Utc};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use serde_json::{Value, json};
use sqlx::PgPool;
use tenant_worker::RunOptions;
use tenant_worker::jobs::declared::{self, Catalog, Declared, DeclaredKind};
use tenant_worker::jobs::import::{ImportResult, MAX_INLINE_RECORDS};
use tenant_worker::jobs::rollup;
use tenant_worker::queue::{self, Enqueuer, NewJob};
use tenant_worker::{JobId, TenantId};
use tenant_worker::{Scope, ScopedTx};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{self, TestDb, stderr, stdout};
use crate::helpers::{insert_signed, job_info, run_worker, shipped_catalog, shipped_jobs_dir};

// ------------------------------------------------------------------------------------------
// Harness
// ------------------------------------------------------------------------------------------

/// A test database whose import inboxes live under a private temporary folder (kept alive by
/// the caller).
async fn import_db() -> (TestDb, tempfile::TempDir) {
    let mut db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("tempdir");
    db.settings.imports.dir = dir.path().to_path_buf();
    (db, dir)
}

/// `<root>/<tenant id>/`, created.
fn inbox(root: &Path, tenant: TenantId) -> PathBuf {
    let dir = root.join(tenant.to_string());
    std::fs::create_dir_all(&dir).expect("create inbox");
    dir
}

/// Writes `bytes` to `name` in the tenant's inbox.
fn put(root: &Path, tenant: TenantId, name: &str, bytes: impl AsRef<[u8]>) {
    std::fs::write(inbox(root, tenant).join(name), bytes).expect("write inbox file");
}

/// JSON Lines text of `records`.
fn jsonl(records: &[Value]) -> String {
    records.iter().map(|r| format!("{r}\n")).collect()
}

/// An enqueuer that validates declared names against `catalog`.
async fn enqueuer(db: &TestDb, catalog: &Catalog) -> Enqueuer {
    db.enqueuer_with(catalog.clone()).await
}

async fn enqueue(enqueuer: &Enqueuer, tenant: TenantId, kind: &str, args: Value) -> JobId {
    enqueuer
        .enqueue_job(tenant, NewJob::new(kind, args))
        .await
        .expect("enqueue")
        .id
}

/// The run record of a job, read as the superuser: (tenant, result).
async fn run_record(admin: &PgPool, job: JobId) -> Option<(TenantId, Option<Value>)> {
    sqlx::query_as("select tenant_id, result from job_runs where job_id = $1")
        .bind(job)
        .fetch_optional(admin)
        .await
        .unwrap()
}

/// The result of a job that must be done, from its run record (which must belong to `tenant`).
async fn done_result(admin: &PgPool, queue_pool: &PgPool, tenant: TenantId, job: JobId) -> Value {
    let info = job_info(queue_pool, job).await;
    assert_eq!(info.state, "done", "{info:?}");
    let (owner, result) = run_record(admin, job).await.expect("a run record");
    assert_eq!(owner, tenant, "the run record belongs to the job's tenant");
    let result = result.expect("a result");
    assert_eq!(
        info.last_result.as_ref().and_then(|r| r.get("Ok")),
        Some(&result),
        "the queue's stored result is the run record's"
    );
    result
}

/// An import's result, from its run record.
async fn import_result(
    admin: &PgPool,
    queue_pool: &PgPool,
    tenant: TenantId,
    job: JobId,
) -> ImportResult {
    serde_json::from_value(done_result(admin, queue_pool, tenant, job).await)
        .expect("an import result")
}

/// A job that failed permanently: state `dead`, error containing `expected`, no run record.
async fn assert_dead(admin: &PgPool, queue_pool: &PgPool, job: JobId, what: &str, expected: &str) {
    let info = job_info(queue_pool, job).await;
    assert_eq!(info.state, "dead", "{what}: {info:?}");
    let error = info.error().unwrap_or_default();
    assert!(
        error.contains(expected),
        "{what}: error {error:?} does not say {expected:?}"
    );
    assert!(
        run_record(admin, job).await.is_none(),
        "{what}: a failed job left a run record"
    );
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `(line, reason)` of an import's listed rejections.
fn lines(result: &ImportResult) -> Vec<u64> {
    result.errors.iter().map(|e| e.line).collect()
}

fn reason(result: &ImportResult, line: u64) -> &str {
    result
        .errors
        .iter()
        .find(|e| e.line == line)
        .map(|e| e.reason.as_str())
        .unwrap_or_else(|| panic!("no rejection on line {line}: {:?}", result.errors))
}

/// One tenant's records as the superuser sees them: id -> (kind, external id, data, updated_at).
type Snapshot = BTreeMap<Uuid, (String, Option<String>, Value, DateTime<Utc>)>;
type SnapshotRow = (Uuid, String, Option<String>, Value, DateTime<Utc>);

async fn snapshot(admin: &PgPool, tenant: TenantId) -> Snapshot {
    let rows: Vec<SnapshotRow> = sqlx::query_as(
        "select id, kind, external_id, data, updated_at from records where tenant_id = $1",
    )
    .bind(tenant)
    .fetch_all(admin)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, k, e, d, u)| (id, (k, e, d, u)))
        .collect()
}

/// Every record of every tenant (id, tenant, data, updated_at), for "nothing changed anywhere".
async fn everything(admin: &PgPool) -> Vec<(Uuid, TenantId, Value, DateTime<Utc>)> {
    sqlx::query_as("select id, tenant_id, data, updated_at from records order by tenant_id, id")
        .fetch_all(admin)
        .await
        .unwrap()
}

async fn count_records(admin: &PgPool, tenant: TenantId) -> i64 {
    sqlx::query_scalar("select count(*) from records where tenant_id = $1")
        .bind(tenant)
        .fetch_one(admin)
        .await
        .unwrap()
}

/// A tenant's records with an external id: external id -> (kind, data).
async fn by_external_id(admin: &PgPool, tenant: TenantId) -> BTreeMap<String, (String, Value)> {
    let rows: Vec<(String, String, Value)> = sqlx::query_as(
        "select external_id, kind, data from records where tenant_id = $1 and external_id is not null",
    )
    .bind(tenant)
    .fetch_all(admin)
    .await
    .unwrap();
    rows.into_iter().map(|(e, k, d)| (e, (k, d))).collect()
}

fn set<const N: usize>(items: [&str; N]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Inserts one record through the tenant's scoped transaction (the app role).
async fn insert(
    app: &Scope,
    tenant: TenantId,
    kind: &str,
    data: Value,
    external_id: Option<&str>,
) -> Uuid {
    let mut tx = app.begin(tenant).await.unwrap();
    let id: Uuid = sqlx::query_scalar(
        "insert into records (tenant_id, kind, data, external_id) values ($1, $2, $3, $4) returning id",
    )
    .bind(tenant)
    .bind(kind)
    .bind(data)
    .bind(external_id)
    .fetch_one(tx.conn().await.unwrap())
    .await
    .unwrap();
    tx.commit().await.unwrap();
    id
}

/// Inserts one record with a given creation time inside an open scoped transaction.
async fn insert_at(tx: &mut ScopedTx, kind: &str, data: Value, created_at: DateTime<Utc>) -> Uuid {
    let tenant = tx.tenant_id();
    sqlx::query_scalar(
        "insert into records (tenant_id, kind, data, created_at) values ($1, $2, $3, $4) returning id",
    )
    .bind(tenant)
    .bind(kind)
    .bind(data)
    .bind(created_at)
    .fetch_one(tx.conn().await.unwrap())
    .await
    .unwrap()
}

// ------------------------------------------------------------------------------------------
// Imports
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_import_claiming_another_tenant_writes_nothing_there() {
    let (db, root) = import_db().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin, queue_pool) = (db.scope().await, db.admin().await, db.queue().await);
    let enq = enqueuer(&db, &Catalog::new()).await;
    // B owns records with the external ids the file uses, so a row that reached B would
    // update them; A has one record of its own.
    let b_customer = insert(
        &app,
        b,
        "customer",
        json!({"name": "Acme", "email": "ops@acme.test"}),
        Some("c-1"),
    )
    .await;
    insert(&app, b, "property", json!({"name": "Tower"}), Some("p-1")).await;
    insert(&app, a, "property", json!({"name": "Tower"}), Some("p-0")).await;
    let (b_before, b_count) = (snapshot(&admin, b).await, count_records(&admin, b).await);
    let a_before = snapshot(&admin, a).await;

    let b_text = b.to_string();
    let rows = [
        json!({"kind": "property", "external_id": "p-1", "data": {"name": "A's tower"}}),
        json!({"kind": "property", "external_id": "p-1", "tenant_id": b_text, "data": {"name": "overwritten"}}),
        json!({"kind": "customer", "external_id": "c-1", "tenant_id": a.to_string(), "data": {"name": "Acme", "email": "ops@acme.test"}}),
        json!({"kind": "customer", "external_id": "c-2", "tenant_id": b_text, "data": {"name": "Evil", "email": "evil@acme.test"}}),
        json!({"kind": "invoice", "external_id": "i-1", "tenant_id": b_text, "data": {"number": "INV-9", "amount": 5, "customer_id": b_customer}}),
        json!({"kind": "property", "external_id": "p-2", "tenant_id": "not-a-tenant", "data": {"name": "x"}}),
        json!({"kind": "property", "external_id": "p-3", "tenant_id": Uuid::new_v4().to_string(), "data": {"name": "y"}}),
        json!({"kind": "property", "external_id": "p-4", "data": {"name": "Annex"}}),
    ];
    let foreign_lines = vec![2u64, 4, 5, 6, 7];
    let mine: BTreeMap<String, Value> = rows
        .iter()
        .filter(|r| {
            r.get("tenant_id")
                .is_none_or(|t| t == &json!(a.to_string()))
        })
        .map(|r| {
            (
                r["external_id"].as_str().unwrap().to_string(),
                r["data"].clone(),
            )
        })
        .collect();
    put(root.path(), a, "mixed.jsonl", jsonl(&rows));

    // All-or-nothing: refused as a whole, each foreign row named.
    let strict = enqueue(&enq, a, "import", json!({"file": "mixed.jsonl"})).await;
    run_worker(&db, Catalog::new()).await;
    let result = import_result(&admin, &queue_pool, a, strict).await;
    assert_eq!(result.mode, "all-or-nothing");
    assert!(!result.written, "{result:?}");
    assert_eq!(
        (result.inserted, result.updated, result.rejected),
        (0, 0, 5)
    );
    assert_eq!(lines(&result), foreign_lines);
    assert_eq!(snapshot(&admin, a).await, a_before, "A changed");
    assert_eq!(snapshot(&admin, b).await, b_before, "B changed");

    // Skip-invalid: A gets exactly its own rows; B is untouched.
    let lenient = enqueue(
        &enq,
        a,
        "import",
        json!({"file": "mixed.jsonl", "mode": "skip-invalid"}),
    )
    .await;
    run_worker(&db, Catalog::new()).await;
    let result = import_result(&admin, &queue_pool, a, lenient).await;
    assert!(result.written, "{result:?}");
    assert_eq!(
        (result.inserted, result.updated, result.unchanged),
        (mine.len() as u64, 0, 0)
    );
    assert_eq!(result.rejected, foreign_lines.len() as u64);
    assert_eq!(lines(&result), foreign_lines);
    for e in &result.errors {
        assert!(
            e.reason.contains("names another tenant"),
            "line {}: {}",
            e.line,
            e.reason
        );
    }
    let a_after = by_external_id(&admin, a).await;
    let mut expected: BTreeSet<String> = mine.keys().cloned().collect();
    expected.insert("p-0".into());
    assert_eq!(a_after.keys().cloned().collect::<BTreeSet<_>>(), expected);
    for (ext, data) in &mine {
        assert_eq!(&a_after[ext].1, data, "{ext}");
    }
    assert_eq!(count_records(&admin, b).await, b_count);
    assert_eq!(snapshot(&admin, b).await, b_before, "B changed");

    // The same through CSV's tenant_id column (empty means "the job's tenant").
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["kind", "data", "external_id", "tenant_id"])
        .unwrap();
    w.write_record(["property", r#"{"name": "csv mine"}"#, "p-10", ""])
        .unwrap();
    w.write_record(["property", r#"{"name": "csv theirs"}"#, "p-1", &b_text])
        .unwrap();
    w.write_record([
        "customer",
        r#"{"name": "x", "email": "x@csv.test"}"#,
        "c-11",
        &b_text,
    ])
    .unwrap();
    put(root.path(), a, "mixed.csv", w.into_inner().unwrap());
    let csv_job = enqueue(
        &enq,
        a,
        "import",
        json!({"file": "mixed.csv", "format": "csv", "mode": "skip-invalid"}),
    )
    .await;
    run_worker(&db, Catalog::new()).await;
    let result = import_result(&admin, &queue_pool, a, csv_job).await;
    assert_eq!((result.inserted, result.rejected), (1, 2), "{result:?}");
    assert_eq!(
        lines(&result),
        vec![3, 4],
        "CSV lines count the header as 1"
    );
    assert!(by_external_id(&admin, a).await.contains_key("p-10"));
    assert_eq!(snapshot(&admin, b).await, b_before, "B changed");
    let leaked: i64 = sqlx::query_scalar(
        "select count(*) from records where tenant_id = $1 and external_id in ('p-2', 'p-3', 'p-10', 'c-2', 'c-11', 'i-1')",
    )
    .bind(b)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(leaked, 0);
}

#[tokio::test]
async fn import_rules_are_reported_per_row() {
    let (db, root) = import_db().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin, queue_pool) = (db.scope().await, db.admin().await, db.queue().await);
    let enq = enqueuer(&db, &Catalog::new()).await;
    // A's existing customers (one created by an application, without external id).
    insert(
        &app,
        a,
        "customer",
        json!({"name": "Taken", "email": "Taken@A.test"}),
        None,
    )
    .await;
    let a_known = insert(
        &app,
        a,
        "customer",
        json!({"name": "Known", "email": "known@a.test"}),
        Some("c-known"),
    )
    .await;
    // B's customer: its email must not block A, its id must not be usable by A.
    let b_customer = insert(
        &app,
        b,
        "customer",
        json!({"name": "Shared", "email": "only-in-b@shared.test"}),
        Some("c-b"),
    )
    .await;
    let (new_customer, rejected_customer) = (Uuid::new_v4(), Uuid::new_v4());
    let invoice = |ext: &str, customer: Uuid| {
        json!({"kind": "invoice", "external_id": ext,
               "data": {"number": ext, "amount": 12.5, "currency": "EUR", "customer_id": customer}})
    };
    let customer = |ext: &str, email: &str| json!({"kind": "customer", "external_id": ext, "data": {"name": ext, "email": email}});
    let with_id = |mut v: Value, id: Uuid| {
        v["id"] = json!(id);
        v
    };
    let rows = [
        customer("c1", "dup@file.test"),                             // 1 ok
        with_id(customer("c2", "DUP@File.test"), rejected_customer), // 2 duplicate in file
        customer("c3", "taken@a.TEST"),                              // 3 existing in A
        customer("c4", "Only-In-B@shared.test"),                     // 4 ok: only B has it
        invoice("i1", Uuid::new_v4()),                               // 5 random customer
        invoice("i2", b_customer),                                   // 6 B's customer
        with_id(customer("c5", "new@file.test"), new_customer),      // 7 ok
        invoice("i3", new_customer),                                 // 8 ok: added above
        invoice("i4", a_known),                                      // 9 ok: existing
        invoice("i5", rejected_customer),                            // 10 its customer is rejected
    ];
    put(root.path(), a, "rules.jsonl", jsonl(&rows));
    let expected_lines = vec![2u64, 3, 5, 6, 10];
    let valid = set(["c1", "c4", "c5", "i3", "i4"]);

    let (a_before, b_before) = (snapshot(&admin, a).await, snapshot(&admin, b).await);
    let strict = enqueue(&enq, a, "import", json!({"file": "rules.jsonl"})).await;
    run_worker(&db, Catalog::new()).await;
    let result = import_result(&admin, &queue_pool, a, strict).await;
    assert!(!result.written, "{result:?}");
    assert_eq!(result.rejected, expected_lines.len() as u64);
    assert_eq!(lines(&result), expected_lines);
    assert_eq!(snapshot(&admin, a).await, a_before, "all-or-nothing wrote");
    assert_eq!(count_records(&admin, a).await, a_before.len() as i64);

    let lenient = enqueue(
        &enq,
        a,
        "import",
        json!({"file": "rules.jsonl", "mode": "skip-invalid"}),
    )
    .await;
    run_worker(&db, Catalog::new()).await;
    let result = import_result(&admin, &queue_pool, a, lenient).await;
    assert!(result.written, "{result:?}");
    assert_eq!(lines(&result), expected_lines);
    assert_eq!(
        (result.inserted, result.updated, result.unchanged),
        (valid.len() as u64, 0, 0)
    );
    let dup = reason(&result, 2);
    assert!(
        dup.contains("duplicate email in this import") && dup.contains("first on line 1"),
        "{dup}"
    );
    assert!(
        reason(&result, 3).contains("email already used by another customer of this tenant"),
        "{}",
        reason(&result, 3)
    );
    let missing = reason(&result, 5);
    assert!(
        missing.contains("customer_id does not name a customer of this tenant"),
        "{missing}"
    );
    assert_eq!(
        reason(&result, 6),
        missing,
        "another tenant's customer must look exactly like a missing one"
    );
    assert_eq!(reason(&result, 10), missing);

    let mut expected_ext = valid.clone();
    expected_ext.insert("c-known".into());
    let after = by_external_id(&admin, a).await;
    assert_eq!(after.keys().cloned().collect::<BTreeSet<_>>(), expected_ext);
    let (id_c5, ref_i3): (Uuid, Uuid) = sqlx::query_as(
        "select (select id from records where tenant_id = $1 and external_id = 'c5'),
                (select customer_ref from records where tenant_id = $1 and external_id = 'i3')",
    )
    .bind(a)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!((id_c5, ref_i3), (new_customer, new_customer));
    assert_eq!(snapshot(&admin, b).await, b_before, "B changed");
}

/// An existing customer without external id (created by an application, or by an import row
/// without one) must block a second customer with the same email as a row error, like one with
/// an external id does.
#[tokio::test]
async fn a_duplicate_email_without_external_ids_is_a_row_error() {
    let (db, root) = import_db().await;
    let (a, _b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin, queue_pool) = (db.scope().await, db.admin().await, db.queue().await);
    let enq = enqueuer(&db, &Catalog::new()).await;
    insert(
        &app,
        a,
        "customer",
        json!({"name": "Taken", "email": "taken@a.test"}),
        None,
    )
    .await;
    let rows = [
        json!({"kind": "customer", "data": {"name": "Again", "email": "TAKEN@a.test"}}),
        json!({"kind": "property", "data": {"name": "Tower"}}),
    ];
    put(root.path(), a, "dup.jsonl", jsonl(&rows));
    let job = enqueue(
        &enq,
        a,
        "import",
        json!({"file": "dup.jsonl", "mode": "skip-invalid"}),
    )
    .await;
    run_worker(&db, Catalog::new()).await;
    let info = job_info(&queue_pool, job).await;
    assert_eq!(info.state, "done", "{:?}", info.error());
    let result = import_result(&admin, &queue_pool, a, job).await;
    assert_eq!((result.inserted, result.rejected), (1, 1), "{result:?}");
    assert!(reason(&result, 1).contains("email already used"));
}

/// A row whose `id` is already used by another of the tenant's records is a row error whether
/// or not it also has an external id.
#[tokio::test]
async fn a_taken_id_with_an_external_id_is_a_row_error() {
    let (db, root) = import_db().await;
    let (a, _b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin, queue_pool) = (db.scope().await, db.admin().await, db.queue().await);
    let enq = enqueuer(&db, &Catalog::new()).await;
    let taken = insert(&app, a, "property", json!({"name": "Tower"}), None).await;
    let rows = [
        json!({"kind": "property", "id": taken, "external_id": "p-new", "data": {"name": "Clash"}}),
        json!({"kind": "property", "external_id": "p-ok", "data": {"name": "Fine"}}),
    ];
    put(root.path(), a, "ids.jsonl", jsonl(&rows));
    let job = enqueue(
        &enq,
        a,
        "import",
        json!({"file": "ids.jsonl", "mode": "skip-invalid"}),
    )
    .await;
    run_worker(&db, Catalog::new()).await;
    let info = job_info(&queue_pool, job).await;
    assert_eq!(info.state, "done", "{:?}", info.error());
    let result = import_result(&admin, &queue_pool, a, job).await;
    assert_eq!((result.inserted, result.rejected), (1, 1), "{result:?}");
    assert!(reason(&result, 1).contains("id already used"));
}

#[tokio::test]
async fn importing_the_same_file_twice_changes_nothing() {
    let (db, root) = import_db().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin, queue_pool) = (db.scope().await, db.admin().await, db.queue().await);
    let enq = enqueuer(&db, &Catalog::new()).await;
    // B has records with the same external ids: they must never be touched.
    insert(&app, b, "property", json!({"name": "B tower"}), Some("p-0")).await;
    let b_before = snapshot(&admin, b).await;
    let customer = Uuid::new_v4();
    let mut rows = vec![
        json!({"kind": "customer", "id": customer, "external_id": "c-0",
                              "data": {"name": "Acme", "email": "ops@acme.test"}}),
    ];
    for i in 0..6 {
        rows.push(json!({"kind": "property", "external_id": format!("p-{i}"),
                         "data": {"name": format!("Tower {i}"), "units": i, "city": "Springfield"}}));
    }
    for i in 0..3 {
        rows.push(json!({"kind": "invoice", "external_id": format!("i-{i}"),
                         "data": {"number": format!("INV-{i}"), "amount": 10.25 * f64::from(i + 1),
                                  "currency": "EUR", "status": "open", "issued_on": "2026-01-15",
                                  "customer_id": customer}}));
    }
    let n = rows.len() as u64;
    put(root.path(), a, "same.jsonl", jsonl(&rows));

    let mut results = Vec::new();
    let mut snapshots = Vec::new();
    for _ in 0..2 {
        let job = enqueue(&enq, a, "import", json!({"file": "same.jsonl"})).await;
        run_worker(&db, Catalog::new()).await;
        results.push(import_result(&admin, &queue_pool, a, job).await);
        snapshots.push(snapshot(&admin, a).await);
    }
    assert_eq!(
        (
            results[0].inserted,
            results[0].updated,
            results[0].unchanged
        ),
        (n, 0, 0),
        "{:?}",
        results[0]
    );
    assert_eq!(
        (
            results[1].inserted,
            results[1].updated,
            results[1].unchanged
        ),
        (0, 0, n),
        "{:?}",
        results[1]
    );
    assert!(results[1].written && results[1].errors.is_empty());
    assert_eq!(
        snapshots[0], snapshots[1],
        "the second import wrote (ids, data or updated_at changed)"
    );

    // One record's data changes (another only has its keys reordered: same JSON value).
    rows[3]["data"]["units"] = json!(99);
    let reordered: Value =
        serde_json::from_str(r#"{"city": "Springfield", "units": 1, "name": "Tower 1"}"#).unwrap();
    assert_eq!(rows[2]["data"], reordered);
    let mut text = jsonl(&rows);
    text = text.replacen(
        &rows[2]["data"].to_string(),
        r#"{"city":"Springfield","units":1,"name":"Tower 1"}"#,
        1,
    );
    put(root.path(), a, "same.jsonl", text);
    let job = enqueue(&enq, a, "import", json!({"file": "same.jsonl"})).await;
    run_worker(&db, Catalog::new()).await;
    let third = import_result(&admin, &queue_pool, a, job).await;
    assert_eq!(
        (third.inserted, third.updated, third.unchanged),
        (0, 1, n - 1),
        "{third:?}"
    );
    let after = snapshot(&admin, a).await;
    let changed: Vec<&Uuid> = after
        .iter()
        .filter(|(id, row)| snapshots[1].get(*id) != Some(*row))
        .map(|(id, _)| id)
        .collect();
    assert_eq!(changed.len(), 1, "{changed:?}");
    let (_, ext, data, _) = &after[changed[0]];
    assert_eq!(ext.as_deref(), Some("p-2"));
    assert_eq!(data["units"], json!(99));
    assert_eq!(after.len(), snapshots[1].len());
    assert_eq!(snapshot(&admin, b).await, b_before, "B changed");
}

/// What one bad file must produce.
enum Expect {
    /// The job fails permanently with this text.
    Dead(&'static str),
    /// The job completes, writes nothing, and lists exactly these (line, reason) rejections.
    Refused(Vec<(u64, &'static str)>),
}

#[tokio::test]
async fn bad_files_give_clear_errors_and_write_nothing() {
    let (db, root) = import_db().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin, queue_pool) = (db.scope().await, db.admin().await, db.queue().await);
    let enq = enqueuer(&db, &Catalog::new()).await;
    insert(
        &app,
        a,
        "customer",
        json!({"name": "Acme", "email": "ops@acme.test"}),
        Some("c-0"),
    )
    .await;
    insert(&app, b, "property", json!({"name": "Secret"}), Some("p-b")).await;
    put(
        root.path(),
        b,
        "theirs.jsonl",
        jsonl(&[json!({"kind": "property", "data": {"name": "B's"}})]),
    );
    let before = everything(&admin).await;
    let good = r#"{"kind": "property", "data": {"name": "ok"}}"#;
    let customer = Uuid::new_v4();

    let mut malformed = format!("{good}\n");
    malformed.push_str("{\"kind\": \"property\", \"data\": {\"name\": \"x\"}\n");
    malformed.push_str(&format!("{good}\n"));

    let types = jsonl(&[
        json!({"kind": "property", "data": {"name": "t", "units": "ten"}}),
        json!({"kind": "invoice", "data": {"number": "1", "amount": "12.50", "customer_id": customer}}),
        json!({"kind": "customer", "data": {"name": "c", "email": 42}}),
        json!({"kind": "customer", "data": {"name": "c", "email": "nobody"}}),
        json!({"kind": "invoice", "data": {"number": "1", "amount": 1, "issued_on": "2026-13-01", "customer_id": customer}}),
        json!({"kind": "property", "data": []}),
        json!({"kind": "spaceship", "data": {"name": "x"}}),
        json!({"kind": "property", "data": {"name": "x"}, "owner": "me"}),
        json!({"kind": "property", "data": {"name": "x", "units": -1}}),
        json!({"kind": "invoice", "data": {"number": "1", "amount": 1, "customer_id": "x"}}),
        json!({"kind": "property", "data": {"units": 3}}),
        json!({"kind": "property", "data": {"name": "x", "units": 2.5}}),
    ]);

    let mut utf8 = format!("{good}\n").into_bytes();
    utf8.extend_from_slice(b"{\"kind\": \"property\", \"data\": {\"name\": \"caf\xe9\"}}\n");
    utf8.extend_from_slice(format!("{good}\n").as_bytes());

    let mut nul = Vec::new();
    nul.extend_from_slice(b"{\"kind\": \"property\", \"data\": {\"name\": \"a\0b\"}}\n");
    nul.extend_from_slice(b"\0{\"kind\": \"property\", \"data\": {\"name\": \"c\"}}\n");
    nul.extend_from_slice(format!("{good}\n").as_bytes());

    let mut bad_utf8_csv = b"kind,data\nproperty,\"{\"\"name\"\": \"\"ok\"\"}\"\n".to_vec();
    bad_utf8_csv.extend_from_slice(b"property,\"{\"\"name\"\": \"\"caf\xe9\"\"}\"\n");

    let ragged_csv = "kind,data\nproperty,\"{\"\"name\"\": \"\"ok\"\"}\"\nproperty,\"{\"\"name\"\": \"\"x\"\"}\",extra\n";
    let bad_json_csv = "kind,data\nproperty,{name: x}\nproperty,\n";

    put(root.path(), a, "malformed.jsonl", malformed);
    put(root.path(), a, "types.jsonl", types);
    put(root.path(), a, "utf8.jsonl", utf8);
    put(root.path(), a, "nul.jsonl", nul);
    put(
        root.path(),
        a,
        "no_data.csv",
        "kind,external_id\nproperty,p-1\n",
    );
    put(root.path(), a, "bad_utf8.csv", bad_utf8_csv);
    put(root.path(), a, "ragged.csv", ragged_csv);
    put(root.path(), a, "bad_json.csv", bad_json_csv);
    put(root.path(), a, "empty.jsonl", "");
    put(root.path(), a, "blank.jsonl", "\n  \n\n");
    std::fs::create_dir_all(inbox(root.path(), a).join("folder")).unwrap();
    let a_inbox = inbox(root.path(), a);
    std::os::unix::fs::symlink("/etc/hostname", a_inbox.join("hostname.jsonl")).unwrap();
    std::os::unix::fs::symlink(
        inbox(root.path(), b).join("theirs.jsonl"),
        a_inbox.join("theirs.jsonl"),
    )
    .unwrap();
    std::os::unix::fs::symlink("../../..", a_inbox.join("up")).unwrap();

    let cases: Vec<(&str, &str, Expect)> = vec![
        (
            "malformed.jsonl",
            "jsonl",
            Expect::Refused(vec![(2, "not valid JSON")]),
        ),
        (
            "types.jsonl",
            "jsonl",
            Expect::Refused(vec![
                (1, "`units` must be a whole number from 0"),
                (2, "`amount` must be a number"),
                (3, "`email` must be a string"),
                (4, "`email` is not an email address"),
                (5, "`issued_on` must be a date YYYY-MM-DD"),
                (6, "`data` must be a JSON object"),
                (7, "unknown kind `spaceship`"),
                (8, "unknown field `owner`"),
                (9, "`units` must be a whole number from 0"),
                (10, "invoice requires `customer_id`, a customer's id (UUID)"),
                (11, "property requires `name`"),
                (12, "`units` must be a whole number from 0"),
            ]),
        ),
        (
            "utf8.jsonl",
            "jsonl",
            Expect::Refused(vec![(2, "line is not valid UTF-8")]),
        ),
        (
            "nul.jsonl",
            "jsonl",
            Expect::Refused(vec![(1, "not valid JSON"), (2, "not valid JSON")]),
        ),
        (
            "no_data.csv",
            "csv",
            Expect::Dead("the CSV header must name at least `kind` and `data`"),
        ),
        (
            "bad_utf8.csv",
            "csv",
            Expect::Refused(vec![(3, "a field is not valid UTF-8")]),
        ),
        (
            "ragged.csv",
            "csv",
            Expect::Refused(vec![(3, "malformed CSV record")]),
        ),
        (
            "bad_json.csv",
            "csv",
            Expect::Refused(vec![
                (2, "`data` is not valid JSON"),
                (3, "`data` is empty"),
            ]),
        ),
        ("empty.jsonl", "jsonl", Expect::Dead("is empty (0 bytes)")),
        (
            "blank.jsonl",
            "jsonl",
            Expect::Dead("the import contains no records"),
        ),
        ("folder", "jsonl", Expect::Dead("is not a regular file")),
        (
            "hostname.jsonl",
            "jsonl",
            Expect::Dead("resolves outside the tenant's inbox"),
        ),
        (
            "theirs.jsonl",
            "jsonl",
            Expect::Dead("resolves outside the tenant's inbox"),
        ),
        (
            "up/etc/hostname",
            "jsonl",
            Expect::Dead("resolves outside the tenant's inbox"),
        ),
        (
            "missing.jsonl",
            "jsonl",
            Expect::Dead("cannot open `missing.jsonl` in the tenant's inbox"),
        ),
    ];
    let mut jobs = Vec::new();
    for (file, format, expect) in cases {
        let job = enqueue(
            &enq,
            a,
            "import",
            json!({"file": file, "format": format, "mode": "all-or-nothing"}),
        )
        .await;
        jobs.push((job, file, expect));
    }

    // Paths that leave the inbox are refused at enqueue ...
    for file in [
        "../x",
        "../../etc/hostname",
        "/etc/hostname",
        "a/../../x",
        "",
    ] {
        let err = enq
            .enqueue_job(a, NewJob::new("import", json!({"file": file})))
            .await
            .expect_err(file);
        let text = error_chain(&err);
        assert!(text.contains("inside the tenant's inbox"), "{file}: {text}");
    }
    // ... and rejected by the worker when crafted past the enqueuer.
    let crafted = insert_signed(&db, &admin, a, "import", json!({"file": "../x"})).await;
    // A file of that name exists, so only the path check stands in the way.
    std::fs::write(root.path().join("x"), format!("{good}\n")).unwrap();

    let summary = run_worker(&db, Catalog::new()).await;
    assert_eq!(summary.rejected, 1, "{summary:?}");
    let info = job_info(&queue_pool, crafted).await;
    assert_eq!(info.state, "rejected", "{info:?}");
    assert!(
        info.error()
            .unwrap_or_default()
            .contains("must stay inside the tenant's inbox"),
        "{:?}",
        info.error()
    );
    assert!(run_record(&admin, crafted).await.is_none());

    for (job, file, expect) in jobs {
        match expect {
            Expect::Dead(text) => assert_dead(&admin, &queue_pool, job, file, text).await,
            Expect::Refused(expected) => {
                let result = import_result(&admin, &queue_pool, a, job).await;
                assert!(!result.written, "{file}: {result:?}");
                assert_eq!(
                    (result.inserted, result.updated, result.unchanged),
                    (0, 0, 0),
                    "{file}"
                );
                assert_eq!(result.rejected, expected.len() as u64, "{file}: {result:?}");
                let got: Vec<u64> = lines(&result);
                let want: Vec<u64> = expected.iter().map(|(l, _)| *l).collect();
                assert_eq!(got, want, "{file}: {:?}", result.errors);
                for (line, text) in expected {
                    let r = reason(&result, line);
                    assert!(r.contains(text), "{file} line {line}: {r:?} lacks {text:?}");
                }
            }
        }
    }
    assert_eq!(everything(&admin).await, before, "a refused import wrote");

    // The same files in skip-invalid mode write exactly their valid rows.
    let mut lenient = Vec::new();
    for (file, format, valid) in [
        ("malformed.jsonl", "jsonl", 2),
        ("utf8.jsonl", "jsonl", 2),
        ("nul.jsonl", "jsonl", 1),
        ("bad_utf8.csv", "csv", 1),
        ("ragged.csv", "csv", 1),
    ] {
        let job = enqueue(
            &enq,
            a,
            "import",
            json!({"file": file, "format": format, "mode": "skip-invalid"}),
        )
        .await;
        lenient.push((job, file, valid));
    }
    run_worker(&db, Catalog::new()).await;
    let mut total = 0;
    for (job, file, valid) in lenient {
        let result = import_result(&admin, &queue_pool, a, job).await;
        assert!(result.written, "{file}: {result:?}");
        assert_eq!(result.inserted, valid, "{file}: {result:?}");
        total += valid as i64;
    }
    assert_eq!(
        count_records(&admin, a).await,
        before.iter().filter(|r| r.1 == a).count() as i64 + total
    );
    assert_eq!(
        snapshot(&admin, b).await.len(),
        before.iter().filter(|r| r.1 == b).count()
    );
}

/// A JSON string escape for U+0000 is valid JSON but cannot be stored in jsonb; it is one bad
/// row like any other, not the end of the whole import.
#[tokio::test]
async fn an_escaped_nul_is_a_row_error() {
    let (db, root) = import_db().await;
    let (a, _b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (admin, queue_pool) = (db.admin().await, db.queue().await);
    let enq = enqueuer(&db, &Catalog::new()).await;
    let text = "{\"kind\": \"property\", \"data\": {\"name\": \"ok\"}}\n\
                {\"kind\": \"property\", \"data\": {\"name\": \"a\\u0000b\"}}\n";
    put(root.path(), a, "escaped.jsonl", text);
    let job = enqueue(
        &enq,
        a,
        "import",
        json!({"file": "escaped.jsonl", "mode": "skip-invalid"}),
    )
    .await;
    run_worker(&db, Catalog::new()).await;
    let info = job_info(&queue_pool, job).await;
    assert_eq!(info.state, "done", "{:?}", info.error());
    let result = import_result(&admin, &queue_pool, a, job).await;
    assert_eq!((result.inserted, result.rejected), (1, 1), "{result:?}");
    assert_eq!(lines(&result), vec![2]);
}

#[tokio::test]
async fn csv_import_works_with_quoted_json() {
    let (db, root) = import_db().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin, queue_pool) = (db.scope().await, db.admin().await, db.queue().await);
    let enq = enqueuer(&db, &Catalog::new()).await;
    insert(&app, b, "property", json!({"name": "B"}), Some("p-1")).await;
    let b_before = snapshot(&admin, b).await;
    let customer = Uuid::new_v4();
    let records: Vec<(&str, Value, &str, Option<Uuid>)> = vec![
        (
            "customer",
            json!({"name": "Smith, \"Jo\" & Co", "email": "jo,\"smith\"@example.test"}),
            "c-1",
            Some(customer),
        ),
        (
            "property",
            json!({"name": "Tower \"A\", East", "address": "1, Main St\nSuite \"5\"",
                   "city": "Zürich, \u{1F3E0}", "units": 12}),
            "p-1",
            None,
        ),
        (
            "invoice",
            json!({"number": "INV,1", "amount": 1234.56, "currency": "EUR", "status": "open",
                   "issued_on": "2026-02-28", "due_on": "2026-03-31", "customer_id": customer,
                   "note": "quotes \" and commas , and \\ backslashes"}),
            "i-1",
            None,
        ),
    ];
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["kind", "data", "external_id", "id"])
        .unwrap();
    for (i, (kind, data, ext, id)) in records.iter().enumerate() {
        // One record pretty-printed: a quoted field spanning lines.
        let text = if i == 1 {
            serde_json::to_string_pretty(data).unwrap()
        } else {
            data.to_string()
        };
        let id = id.map(|u| u.to_string()).unwrap_or_default();
        w.write_record([*kind, text.as_str(), ext, id.as_str()])
            .unwrap();
    }
    let bytes = w.into_inner().unwrap();
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(
        text.contains("\"\"name\"\"") && text.contains(",\"{"),
        "the file is quoted CSV: {text}"
    );
    put(root.path(), a, "quoted.csv", bytes);
    let job = enqueue(
        &enq,
        a,
        "import",
        json!({"file": "quoted.csv", "format": "csv"}),
    )
    .await;
    run_worker(&db, Catalog::new()).await;
    let result = import_result(&admin, &queue_pool, a, job).await;
    assert!(result.written && result.errors.is_empty(), "{result:?}");
    assert_eq!(result.inserted, records.len() as u64);
    let stored = by_external_id(&admin, a).await;
    assert_eq!(stored.len(), records.len());
    for (kind, data, ext, _) in &records {
        assert_eq!(&stored[*ext], &(kind.to_string(), data.clone()), "{ext}");
    }
    let (id, customer_ref): (Uuid, Uuid) = sqlx::query_as(
        "select (select id from records where tenant_id = $1 and external_id = 'c-1'),
                (select customer_ref from records where tenant_id = $1 and external_id = 'i-1')",
    )
    .bind(a)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!((id, customer_ref), (customer, customer));
    assert_eq!(snapshot(&admin, b).await, b_before);
}

#[tokio::test]
async fn import_of_inline_records() {
    let (db, _root) = import_db().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (admin, queue_pool) = (db.admin().await, db.queue().await);
    let enq = enqueuer(&db, &Catalog::new()).await;
    let b_before = snapshot(&admin, b).await;
    let customer = Uuid::new_v4();
    let records = vec![
        json!({"kind": "customer", "id": customer, "external_id": "c-1",
               "data": {"name": "Acme", "email": "ops@acme.test"}}),
        json!({"kind": "invoice", "external_id": "i-1",
               "data": {"number": "1", "amount": 10, "customer_id": customer}}),
        json!({"kind": "property", "data": {"units": 1}}),
        json!({"kind": "property", "tenant_id": b.to_string(), "data": {"name": "x"}}),
        json!({"kind": "property", "external_id": "p-1", "data": {"name": "Tower"}}),
    ];
    let job = enqueue(
        &enq,
        a,
        "import",
        json!({"records": records, "mode": "skip-invalid"}),
    )
    .await;
    let strict = enqueue(&enq, a, "import", json!({"records": records})).await;
    let full: Vec<Value> = (0..MAX_INLINE_RECORDS)
        .map(|i| json!({"kind": "property", "data": {"name": format!("P{i}")}}))
        .collect();
    let at_limit = enqueue(&enq, b, "import", json!({"records": full})).await;

    for (args, expected) in [
        (
            json!({"records": vec![json!({"kind": "property", "data": {"name": "x"}}); MAX_INLINE_RECORDS + 1]}),
            "at most 1000 inline records",
        ),
        (json!({"records": []}), "`records` is empty"),
        (
            json!({"records": [{"kind": "property", "data": {"name": "x"}}], "file": "f.jsonl"}),
            "exactly one of `file` or `records`",
        ),
        (json!({}), "exactly one of `file` or `records`"),
    ] {
        let err = enq
            .enqueue_job(a, NewJob::new("import", args.clone()))
            .await
            .expect_err("refused at enqueue");
        assert!(matches!(err, queue::Error::Invalid(_)), "{args}: {err:?}");
        let text = error_chain(&err);
        assert!(text.contains(expected), "{text}");
    }
    // Crafted past the enqueuer: rejected by the worker.
    let too_many = vec![json!({"kind": "property", "data": {"name": "x"}}); MAX_INLINE_RECORDS + 1];
    let crafted = insert_signed(&db, &admin, a, "import", json!({"records": too_many})).await;

    let a_before = count_records(&admin, a).await;
    let summary = run_worker(&db, Catalog::new()).await;
    assert_eq!(summary.rejected, 1, "{summary:?}");
    let info = job_info(&queue_pool, crafted).await;
    assert_eq!(info.state, "rejected");
    assert!(
        info.error()
            .unwrap_or_default()
            .contains("at most 1000 inline records")
    );

    let strict = import_result(&admin, &queue_pool, a, strict).await;
    let lenient = import_result(&admin, &queue_pool, a, job).await;
    // The two jobs may have run in either order: whichever wrote, the other one saw its rows.
    assert!(!strict.written, "{strict:?}");
    assert_eq!(lines(&strict), vec![3, 4], "inline lines are index + 1");
    assert_eq!(lines(&lenient), vec![3, 4]);
    assert!(reason(&lenient, 3).contains("property requires `name`"));
    assert!(reason(&lenient, 4).contains("names another tenant"));
    assert_eq!(lenient.inserted, 3, "{lenient:?}");
    assert_eq!(count_records(&admin, a).await, a_before + 3);
    assert_eq!(
        by_external_id(&admin, a)
            .await
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>(),
        set(["c-1", "i-1", "p-1"])
    );
    let limit = import_result(&admin, &queue_pool, b, at_limit).await;
    assert_eq!(limit.inserted, MAX_INLINE_RECORDS as u64);
    assert_eq!(
        count_records(&admin, b).await,
        b_before.len() as i64 + MAX_INLINE_RECORDS as i64
    );
}

// ------------------------------------------------------------------------------------------
// Rollups
// ------------------------------------------------------------------------------------------

/// (name, bucket, dims as text, count, sum as text).
type RollupRow = (String, NaiveDate, String, Option<i64>, Option<String>);

/// A tenant's rollup rows, read as the superuser.
async fn rollups_of(admin: &PgPool, tenant: TenantId, name: Option<&str>) -> Vec<RollupRow> {
    sqlx::query_as(
        "select name, bucket, dims::text, count, sum::text from rollups
         where tenant_id = $1 and ($2::text is null or name = $2)
         order by name, bucket, dims::text",
    )
    .bind(tenant)
    .bind(name)
    .fetch_all(admin)
    .await
    .unwrap()
}

/// The built-in rollups of a tenant computed from scratch with independent SQL: creation day
/// from `created_at` in UTC, issue month from the JSON date.
async fn builtin_truth(admin: &PgPool, tenant: TenantId) -> Vec<RollupRow> {
    sqlx::query_as(
        "select name, bucket, dims, count, sum from (
             select 'records_per_kind_per_day'::text as name,
                    (created_at at time zone 'UTC')::date as bucket,
                    jsonb_build_object('kind', kind)::text as dims,
                    count(*) as count, null::text as sum
             from records where tenant_id = $1
             group by 2, kind
             union all
             select 'invoices_per_month',
                    date_trunc('month', (data ->> 'issued_on')::timestamp)::date,
                    jsonb_build_object('status', coalesce(data ->> 'status', ''),
                                       'currency', coalesce(data ->> 'currency', ''))::text,
                    count(*), sum((data ->> 'amount')::numeric)::text
             from records where tenant_id = $1 and kind = 'invoice' and data ? 'issued_on'
             group by 2, 3
         ) t order by name, bucket, dims",
    )
    .bind(tenant)
    .fetch_all(admin)
    .await
    .unwrap()
}

/// All of a tenant's rollup rows including `updated_at` (to prove nobody rewrote them).
async fn rollups_exact(admin: &PgPool, tenant: TenantId) -> Vec<(RollupRow, DateTime<Utc>)> {
    type Exact = (
        String,
        NaiveDate,
        String,
        Option<i64>,
        Option<String>,
        DateTime<Utc>,
    );
    let rows: Vec<Exact> = sqlx::query_as(
        "select name, bucket, dims::text, count, sum::text, updated_at from rollups
             where tenant_id = $1 order by name, bucket, dims::text",
    )
    .bind(tenant)
    .fetch_all(admin)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(n, b, d, c, s, u)| ((n, b, d, c, s), u))
        .collect()
}

fn day(d: u32, h: u32, m: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, d, h, m, s).unwrap()
}

/// Records for the built-in rollups; both tenants get the same kinds, days, months, statuses
/// and currencies, with amounts and counts scaled by `scale` (so a leak shows in every sum).
async fn seed_rollup_data(app: &Scope, tenant: TenantId, scale: u32) {
    let mut tx = app.begin(tenant).await.unwrap();
    let times = [
        day(1, 0, 0, 0),
        day(1, 23, 59, 59),
        day(2, 0, 0, 0),
        day(2, 12, 30, 0),
        day(4, 23, 59, 59),
    ];
    let mut customers = Vec::new();
    for (i, t) in times.iter().enumerate() {
        customers.push(
            insert_at(
                &mut tx,
                "customer",
                json!({"name": format!("C{i}"), "email": format!("c{i}@x.test")}),
                *t,
            )
            .await,
        );
    }
    for i in 0..(3 * scale) {
        insert_at(
            &mut tx,
            "property",
            json!({"name": format!("P{i}"), "units": i}),
            times[i as usize % times.len()],
        )
        .await;
    }
    let invoices = [
        (Some("2026-01-31"), Some("open"), Some("EUR"), 10.5),
        (Some("2026-01-01"), Some("open"), Some("EUR"), 0.25),
        (Some("2026-01-15"), Some("paid"), Some("EUR"), 100.0),
        (Some("2026-02-01"), Some("paid"), Some("USD"), 33.33),
        (Some("2026-02-28"), None, Some("USD"), 7.0),
        (Some("2026-03-10"), Some("void"), None, 1.1),
        (None, Some("open"), Some("EUR"), 999.0),
    ];
    for round in 0..scale {
        for (i, (issued, status, currency, amount)) in invoices.iter().enumerate() {
            let mut data = json!({"number": format!("INV-{round}-{i}"),
                                  "amount": amount * f64::from(scale) + f64::from(round),
                                  "customer_id": customers[i % customers.len()]});
            if let Some(v) = issued {
                data["issued_on"] = json!(v);
            }
            if let Some(v) = status {
                data["status"] = json!(v);
            }
            if let Some(v) = currency {
                data["currency"] = json!(v);
            }
            insert_at(
                &mut tx,
                "invoice",
                data,
                times[(i + round as usize) % times.len()],
            )
            .await;
        }
    }
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn rollup_values_equal_sql_ground_truth() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin, queue_pool) = (db.scope().await, db.admin().await, db.queue().await);
    let enq = enqueuer(&db, &Catalog::new()).await;
    seed_rollup_data(&app, a, 1).await;
    seed_rollup_data(&app, b, 2).await;

    let b_job = enqueue(&enq, b, "rollup", json!({})).await;
    run_worker(&db, Catalog::new()).await;
    let b_result = done_result(&admin, &queue_pool, b, b_job).await;
    assert_eq!(b_result["records_per_kind_per_day"]["mode"], "full");
    let b_rollups = rollups_exact(&admin, b).await;
    assert_eq!(
        b_rollups.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
        builtin_truth(&admin, b).await
    );

    let first = enqueue(&enq, a, "rollup", json!({})).await;
    run_worker(&db, Catalog::new()).await;
    let result = done_result(&admin, &queue_pool, a, first).await;
    for name in rollup::BUILTINS {
        assert_eq!(
            result[name]["mode"], "full",
            "the first run is full: {result}"
        );
    }
    let truth = builtin_truth(&admin, a).await;
    let a_rows = rollups_of(&admin, a, None).await;
    assert_eq!(a_rows, truth);
    // The truth is not trivial: several buckets per rollup, empty-string dims, sums.
    let per_day = truth.iter().filter(|r| r.0 == "records_per_kind_per_day");
    assert!(per_day.count() >= 8, "{truth:?}");
    assert!(truth.iter().any(|r| r.2.contains(r#""status": """#)));
    assert!(truth.iter().any(|r| r.2.contains(r#""currency": """#)));
    // Day buckets are UTC days: 23:59:59 and 00:00:00 land on different days.
    let a_days: BTreeSet<NaiveDate> = a_rows
        .iter()
        .filter(|r| r.0 == "records_per_kind_per_day")
        .map(|r| r.1)
        .collect();
    assert_eq!(
        a_days,
        [1, 2, 4]
            .iter()
            .map(|d| NaiveDate::from_ymd_opt(2026, 3, *d).unwrap())
            .collect()
    );
    assert_eq!(
        rollups_exact(&admin, b).await,
        b_rollups,
        "A's job touched B's rollups"
    );

    // What the app role sees through `show` in A's scope is exactly A's rows.
    let mut tx = app.begin(a).await.unwrap();
    let shown = rollup::show(&mut tx, None).await.unwrap();
    tx.rollback().await.unwrap();
    let shown: Vec<RollupRow> = shown
        .into_iter()
        .map(|r| (r.name, r.bucket, r.dims.to_string(), r.count, r.sum))
        .collect();
    let normalised: Vec<RollupRow> = a_rows
        .iter()
        .map(|(n, b, d, c, s)| {
            let dims: Value = serde_json::from_str(d).unwrap();
            (n.clone(), *b, dims.to_string(), *c, s.clone())
        })
        .collect();
    let (mut shown, mut normalised) = (shown, normalised);
    shown.sort();
    normalised.sort();
    assert_eq!(shown, normalised);

    // Re-running, incrementally (nothing changed) and fully, gives the identical table.
    let again = enqueue(&enq, a, "rollup", json!({})).await;
    run_worker(&db, Catalog::new()).await;
    let result = done_result(&admin, &queue_pool, a, again).await;
    for name in rollup::BUILTINS {
        assert_eq!(result[name]["mode"], "incremental", "{result}");
        assert_eq!(result[name]["buckets_touched"], 0, "{result}");
    }
    assert_eq!(rollups_of(&admin, a, None).await, truth);
    let full = enqueue(&enq, a, "rollup", json!({"full": true})).await;
    run_worker(&db, Catalog::new()).await;
    let result = done_result(&admin, &queue_pool, a, full).await;
    assert_eq!(result["invoices_per_month"]["mode"], "full");
    assert_eq!(rollups_of(&admin, a, None).await, truth);
    let one = enqueue(
        &enq,
        a,
        "rollup",
        json!({"name": "invoices_per_month", "full": true}),
    )
    .await;
    run_worker(&db, Catalog::new()).await;
    let result = done_result(&admin, &queue_pool, a, one).await;
    assert_eq!(
        result.as_object().unwrap().keys().collect::<Vec<_>>(),
        vec!["invoices_per_month"]
    );
    assert_eq!(rollups_of(&admin, a, None).await, truth);
    assert_eq!(
        rollups_exact(&admin, b).await,
        b_rollups,
        "A's jobs touched B's rollups"
    );

    // Unknown names are refused at enqueue.
    let err = enq
        .enqueue_job(
            a,
            NewJob::new("rollup", json!({"name": "revenue_by_month"})),
        )
        .await
        .expect_err("a declared rollup the enqueuer does not know");
    assert!(error_chain(&err).contains("unknown rollup"), "{err:?}");
}

/// Paid revenue per month and currency for `tenant`, from the records table.
async fn revenue_truth(admin: &PgPool, tenant: TenantId) -> Vec<RollupRow> {
    sqlx::query_as(
        "select 'revenue_by_month'::text,
                date_trunc('month', (data ->> 'issued_on')::timestamp)::date as bucket,
                jsonb_build_object('currency', data ->> 'currency')::text as dims,
                null::bigint, sum((data ->> 'amount')::numeric)::text
         from records
         where tenant_id = $1 and kind = 'invoice' and data ->> 'status' = 'paid'
           and data ? 'issued_on'
         group by 2, 3 order by 2, 3",
    )
    .bind(tenant)
    .fetch_all(admin)
    .await
    .unwrap()
}

async fn seed_revenue(app: &Scope, tenant: TenantId, scale: f64, issued_always: bool) {
    let customer = insert(
        app,
        tenant,
        "customer",
        json!({"name": "Acme", "email": "ops@acme.test"}),
        None,
    )
    .await;
    let mut tx = app.begin(tenant).await.unwrap();
    for (i, (issued, status, currency, amount)) in [
        ("2026-01-03", "paid", "EUR", 100.0),
        ("2026-01-31", "paid", "EUR", 0.5),
        ("2026-01-20", "paid", "USD", 40.0),
        ("2026-01-20", "open", "EUR", 5000.0),
        ("2026-02-01", "paid", "EUR", 12.34),
        ("2026-03-15", "void", "USD", 77.0),
    ]
    .into_iter()
    .enumerate()
    {
        insert_at(
            &mut tx,
            "invoice",
            json!({"number": format!("INV-{i}"), "amount": amount * scale, "status": status,
                   "currency": currency, "issued_on": issued, "customer_id": customer}),
            Utc::now(),
        )
        .await;
    }
    if !issued_always {
        insert_at(
            &mut tx,
            "invoice",
            json!({"number": "INV-x", "amount": 1, "status": "paid", "currency": "EUR",
                   "customer_id": customer}),
            Utc::now(),
        )
        .await;
    }
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn a_declared_rollup_without_tenant_filter_counts_only_its_tenant() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin, queue_pool) = (db.scope().await, db.admin().await, db.queue().await);
    let catalog = shipped_catalog();
    let declared = catalog.get("revenue_by_month").expect("shipped");
    assert_eq!(declared.kind, DeclaredKind::Rollup);
    assert!(
        !declared.sql.contains("tenant"),
        "the shipped SQL has no tenant filter: {}",
        declared.sql
    );
    let enq = enqueuer(&db, &catalog).await;
    seed_revenue(&app, a, 1.0, true).await;
    seed_revenue(&app, b, 3.0, true).await;

    let job = enqueue(&enq, a, "rollup", json!({"name": "revenue_by_month"})).await;
    run_worker(&db, catalog.clone()).await;
    let result = done_result(&admin, &queue_pool, a, job).await;
    let truth_a = revenue_truth(&admin, a).await;
    assert_eq!(
        result["revenue_by_month"]["rows_written"],
        json!(truth_a.len())
    );
    assert_eq!(
        rollups_of(&admin, a, Some("revenue_by_month")).await,
        truth_a
    );
    assert!(truth_a.len() >= 3, "{truth_a:?}");
    assert!(rollups_of(&admin, b, None).await.is_empty(), "B got rows");
    let everything: i64 = sqlx::query_scalar("select count(*) from rollups")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(everything, truth_a.len() as i64);

    let job = enqueue(&enq, b, "rollup", json!({"name": "revenue_by_month"})).await;
    run_worker(&db, catalog.clone()).await;
    done_result(&admin, &queue_pool, b, job).await;
    assert_eq!(
        rollups_of(&admin, b, Some("revenue_by_month")).await,
        revenue_truth(&admin, b).await
    );
    assert_eq!(
        rollups_of(&admin, a, None).await,
        truth_a,
        "B's run changed A"
    );

    // A worker that does not know the declared rollup rejects a crafted job for it.
    let crafted = insert_signed(
        &db,
        &admin,
        a,
        "rollup",
        json!({"name": "revenue_by_month"}),
    )
    .await;
    run_worker(&db, Catalog::new()).await;
    let info = job_info(&queue_pool, crafted).await;
    assert_eq!(info.state, "rejected", "{info:?}");
    assert!(info.error().unwrap_or_default().contains("unknown rollup"));
}

/// `issued_on` is optional for invoices (imports accept them without it); a paid invoice
/// without one must not stop the shipped revenue rollup.
#[tokio::test]
async fn revenue_by_month_survives_an_invoice_without_issue_date() {
    let db = TestDb::new().await;
    let (a, _b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin, queue_pool) = (db.scope().await, db.admin().await, db.queue().await);
    let catalog = shipped_catalog();
    let enq = enqueuer(&db, &catalog).await;
    seed_revenue(&app, a, 1.0, false).await;
    let job = enqueue(&enq, a, "rollup", json!({"name": "revenue_by_month"})).await;
    run_worker(&db, catalog).await;
    let info = job_info(&queue_pool, job).await;
    assert_eq!(info.state, "done", "{:?}", info.error());
    // Expected once fixed: the undated invoice is left out (it has no month).
    assert_eq!(
        rollups_of(&admin, a, Some("revenue_by_month")).await,
        revenue_truth(&admin, a).await
    );
}

// ------------------------------------------------------------------------------------------
// Declared processing
// ------------------------------------------------------------------------------------------

/// Customers with colliding mixed-case emails for a tenant, plus other records.
async fn seed_emails(app: &Scope, tenant: TenantId, extra: &[&str]) {
    let mut emails = vec![
        "Ops@Acme.Test",
        "already@lower.test",
        "MIXED@Example.TEST",
        "x@y.test",
    ];
    emails.extend_from_slice(extra);
    for (i, email) in emails.iter().enumerate() {
        insert(
            app,
            tenant,
            "customer",
            json!({"name": format!("C{i}"), "email": email}),
            None,
        )
        .await;
    }
    insert(
        app,
        tenant,
        "property",
        json!({"name": "Tower", "address": "UPPER Case St"}),
        None,
    )
    .await;
}

#[tokio::test]
async fn declared_processing_runs_in_one_tenant() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin, queue_pool) = (db.scope().await, db.admin().await, db.queue().await);
    let catalog = shipped_catalog();
    let declared = catalog.get("normalise_customer_emails").expect("shipped");
    assert_eq!(declared.kind, DeclaredKind::Process);
    assert!(!declared.sql.contains("tenant"), "{}", declared.sql);
    let enq = enqueuer(&db, &catalog).await;
    seed_emails(&app, a, &["Second@A.test"]).await;
    seed_emails(&app, b, &["Only@B.TEST", "another@b.test"]).await;
    let (a_before, b_before) = (snapshot(&admin, a).await, snapshot(&admin, b).await);
    let truth: i64 = sqlx::query_scalar(
        "select count(*) from records
         where tenant_id = $1 and kind = 'customer' and data ->> 'email' <> lower(data ->> 'email')",
    )
    .bind(a)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert!(truth >= 3);

    let job = enqueue(
        &enq,
        a,
        "process",
        json!({"name": "normalise_customer_emails"}),
    )
    .await;
    run_worker(&db, catalog.clone()).await;
    let result = done_result(&admin, &queue_pool, a, job).await;
    assert_eq!(
        result,
        json!({"name": "normalise_customer_emails", "rows_affected": truth})
    );
    let a_after = snapshot(&admin, a).await;
    assert_eq!(a_after.len(), a_before.len());
    let mut changed = 0;
    for (id, (kind, ext, data, updated)) in &a_before {
        let after = &a_after[id];
        let email = data.get("email").and_then(Value::as_str);
        match email {
            Some(e) if kind == "customer" && e != e.to_lowercase() => {
                changed += 1;
                let mut expected = data.clone();
                expected["email"] = json!(e.to_lowercase());
                assert_eq!((&after.0, &after.1, &after.2), (kind, ext, &expected));
            }
            _ => assert_eq!(after, &(kind.clone(), ext.clone(), data.clone(), *updated)),
        }
    }
    assert_eq!(changed, truth);
    assert_eq!(
        snapshot(&admin, b).await,
        b_before,
        "A's processing touched B"
    );
    let b_mixed: i64 = sqlx::query_scalar(
        "select count(*) from records
         where tenant_id = $1 and kind = 'customer' and data ->> 'email' <> lower(data ->> 'email')",
    )
    .bind(b)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(b_mixed, 3, "B's mixed-case emails stay");

    // Idempotent: a second run affects nothing.
    let again = enqueue(
        &enq,
        a,
        "process",
        json!({"name": "normalise_customer_emails"}),
    )
    .await;
    run_worker(&db, catalog.clone()).await;
    let result = done_result(&admin, &queue_pool, a, again).await;
    assert_eq!(result["rows_affected"], 0);

    // Unknown or non-process names are refused at enqueue.
    for name in ["nope", "revenue_by_month", "properties_by_city", "Bad Name"] {
        let err = enq
            .enqueue_job(a, NewJob::new("process", json!({"name": name})))
            .await
            .expect_err(name);
        assert!(
            error_chain(&err).contains("unknown processing job"),
            "{name}: {err:?}"
        );
    }

    // Declared process SQL that is not one data statement, or touches the tenant, is refused
    // at load, naming the file.
    let other = b.to_string();
    for (sql, expected) in [
        ("select id from records", "INSERT, UPDATE or DELETE"),
        (
            "select set_config('app.tenant_id', 'x', true)",
            "INSERT, UPDATE or DELETE",
        ),
        (
            &format!("set app.tenant_id = '{other}'") as &str,
            "INSERT, UPDATE or DELETE",
        ),
        ("reset app.tenant_id", "INSERT, UPDATE or DELETE"),
        (
            &format!(
                "update records set data = data where set_config('app.tenant_id', '{other}', true) is not null"
            ),
            "tenant context",
        ),
        (
            &format!(
                "with s as (select set_config('app.tenant_id', '{other}', true) as v) update records set data = data from s"
            ),
            // Refused either way: as not a plain data statement, or for the tenant context.
            "",
        ),
        (
            "update records set data = data; delete from records",
            "exactly one statement",
        ),
        (
            &format!("update records set data = data; set app.tenant_id = '{other}'"),
            "exactly one statement",
        ),
        ("delete from records; select 1", "exactly one statement"),
    ] {
        let path = Path::new("jobs/evil_process.toml");
        let text = format!(
            "name = \"evil\"\nkind = \"process\"\nsql = {}\n",
            json!(sql)
        );
        let err = declared::parse_declared(path, &text)
            .expect_err(sql)
            .to_string();
        assert!(err.contains("evil_process.toml"), "{sql}: {err}");
        if expected.is_empty() {
            assert!(
                err.contains("tenant context") || err.contains("INSERT, UPDATE or DELETE"),
                "{sql}: {err}"
            );
        } else {
            assert!(err.contains(expected), "{sql}: {err}");
        }
    }
    // The shipped statement itself passes the same check.
    let shipped =
        std::fs::read_to_string(shipped_jobs_dir().join("normalise_customer_emails.toml")).unwrap();
    declared::parse_declared(Path::new("x.toml"), &shipped).expect("the shipped file loads");
}

#[test]
fn a_declared_schedule_block_is_refused_with_the_command_that_schedules_it() {
    // It used to be parsed, validated and never fired.
    let text = "name = \"weekly\"\nkind = \"export\"\nsql = \"select 1\"\n\n[schedule]\ncron = \"0 6 * * 1\"\n";
    let err = declared::parse_declared(Path::new("jobs/weekly.toml"), text)
        .expect_err("a [schedule] block")
        .to_string();
    assert!(err.contains("jobs/weekly.toml"), "{err}");
    assert!(
        err.contains("schedule add --tenant ID --cron EXPR export --source weekly"),
        "{err}"
    );
    // Every shipped file loads.
    declared::Catalog::load(&shipped_jobs_dir(), true).expect("the shipped jobs load");
}

/// Even a process statement that reaches the worker (built directly, as `Catalog::insert`
/// allows) and switches the tenant mid-statement has its work rolled back.
#[tokio::test]
async fn a_process_that_switches_tenant_is_rolled_back() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin, queue_pool) = (db.scope().await, db.admin().await, db.queue().await);
    seed_emails(&app, a, &[]).await;
    seed_emails(&app, b, &[]).await;
    let (a_before, b_before) = (snapshot(&admin, a).await, snapshot(&admin, b).await);
    let mut catalog = Catalog::new();
    catalog.insert(Declared {
        name: "sneaky".into(),
        kind: DeclaredKind::Process,
        description: String::new(),
        format: None,
        sql: format!(
            "update records r set data = jsonb_set(r.data, '{{email}}', '\"pwned@evil.test\"') \
             from (select set_config('app.tenant_id', '{b}', true) as s offset 0) x \
             where x.s is not null and r.kind = 'customer'"
        ),
        file: PathBuf::from("sneaky.toml"),
    });
    let job = enqueue(
        &enqueuer(&db, &catalog).await,
        a,
        "process",
        json!({"name": "sneaky"}),
    )
    .await;
    run_worker(&db, catalog).await;
    let info = job_info(&queue_pool, job).await;
    assert_ne!(info.state, "done", "{info:?}");
    assert!(run_record(&admin, job).await.is_none());
    assert_eq!(snapshot(&admin, a).await, a_before);
    assert_eq!(snapshot(&admin, b).await, b_before);
}

/// The load-time check also sees `set_config` used as a table function in a processing step's
/// FROM or USING (the run-time check above is the second line of defence).
#[test]
fn a_process_with_set_config_in_from_is_refused_at_load() {
    for sql in [
        "update records r set data = r.data from set_config('app.tenant_id', 'x', true) s where s is not null",
        "update records r set data = r.data from (select 1) q, set_config('app.tenant_id', 'x', true) s where s is not null",
        "delete from records r using set_config('app.tenant_id', 'x', true) s where s is not null",
        "insert into records (tenant_id, kind, data) select r.tenant_id, r.kind, r.data from set_config('app.tenant_id', 'x', true) s, lateral (select * from records) r",
    ] {
        let text = format!(
            "name = \"evil\"\nkind = \"process\"\nsql = {}\n",
            json!(sql)
        );
        let err = declared::parse_declared(Path::new("evil.toml"), &text)
            .expect_err(sql)
            .to_string();
        assert!(err.contains("tenant context"), "{sql}: {err}");
    }
}

// ------------------------------------------------------------------------------------------
// Incremental rollups: a property test against full recomputation
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Property,
    Customer,
    Invoice,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Property => "property",
            Kind::Customer => "customer",
            Kind::Invoice => "invoice",
        }
    }
}

/// Invoice fields (indexes into the tables below; `None` leaves the field out).
#[derive(Debug, Clone)]
struct Inv {
    issued: Option<u32>,
    status: Option<usize>,
    currency: Option<usize>,
    cents: i64,
}

#[derive(Debug, Clone)]
enum Op {
    /// A new record of A created `minute` minutes after the base time.
    Insert(Kind, u32, Inv),
    /// Changes one of A's records: creation time and/or (for invoices) issue date, status,
    /// currency and amount.
    Update {
        pick: usize,
        minute: Option<u32>,
        inv: Option<Inv>,
    },
    /// Deletes one of A's records (a customer only when no invoice references it).
    Delete(usize),
    /// One statement over many rows: shifts the creation time of every record of a kind (and
    /// for invoices, marks every open one paid).
    Bulk(Kind, i32),
    /// Commits A's transaction and begins a new one.
    Commit,
    /// A change to B's records in B's own transaction.
    Noise(u8, u32, Inv),
}

const STATUSES: [&str; 3] = ["open", "paid", "void"];
const CURRENCIES: [&str; 2] = ["EUR", "USD"];
/// Ten days of minutes.
const MINUTES: u32 = 10 * 24 * 60;

fn base_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap()
}

fn kind_strategy() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Property),
        Just(Kind::Customer),
        Just(Kind::Invoice)
    ]
}

fn inv_strategy() -> impl Strategy<Value = Inv> {
    (
        proptest::option::weighted(0.85, 0u32..100),
        proptest::option::weighted(0.8, 0..STATUSES.len()),
        proptest::option::weighted(0.8, 0..CURRENCIES.len()),
        0i64..100_000,
    )
        .prop_map(|(issued, status, currency, cents)| Inv {
            issued,
            status,
            currency,
            cents,
        })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (kind_strategy(), 0..MINUTES, inv_strategy()).prop_map(|(k, m, i)| Op::Insert(k, m, i)),
        4 => (any::<usize>(), proptest::option::of(0..MINUTES), proptest::option::of(inv_strategy()))
            .prop_map(|(pick, minute, inv)| Op::Update { pick, minute, inv }),
        2 => any::<usize>().prop_map(Op::Delete),
        1 => (kind_strategy(), -2000i32..2000).prop_map(|(k, m)| Op::Bulk(k, m)),
        2 => Just(Op::Commit),
        2 => (0u8..3, 0..MINUTES, inv_strategy()).prop_map(|(w, m, i)| Op::Noise(w, m, i)),
    ]
}

type Scenario = (Vec<(Kind, u32, Inv)>, Vec<Op>);

fn scenario_strategy() -> impl Strategy<Value = Scenario> {
    (
        proptest::collection::vec((kind_strategy(), 0..MINUTES, inv_strategy()), 0..20),
        proptest::collection::vec(op_strategy(), 1..40),
    )
}

fn invoice_data(number: &str, customer: Uuid, inv: &Inv) -> Value {
    let issued = NaiveDate::from_ymd_opt(2026, 1, 15).unwrap();
    let mut data = json!({"number": number, "amount": inv.cents as f64 / 100.0,
                          "customer_id": customer});
    if let Some(d) = inv.issued {
        data["issued_on"] = json!((issued + chrono::Days::new(u64::from(d))).to_string());
    }
    if let Some(s) = inv.status {
        data["status"] = json!(STATUSES[s]);
    }
    if let Some(c) = inv.currency {
        data["currency"] = json!(CURRENCIES[c]);
    }
    data
}

/// Some customer of the transaction's tenant, created if there is none.
async fn some_customer(tx: &mut ScopedTx, pick: u32) -> Result<Uuid, sqlx::Error> {
    let customers: Vec<Uuid> =
        sqlx::query_scalar("select id from records where kind = 'customer' order by id")
            .fetch_all(tx.conn().await.unwrap())
            .await?;
    if customers.is_empty() {
        return insert_random(tx, Kind::Customer, pick, None).await;
    }
    Ok(customers[pick as usize % customers.len()])
}

/// Inserts a record of `kind` into the transaction's tenant.
async fn insert_random(
    tx: &mut ScopedTx,
    kind: Kind,
    minute: u32,
    inv: Option<&Inv>,
) -> Result<Uuid, sqlx::Error> {
    let data = match kind {
        Kind::Property => json!({"name": format!("P{minute}"), "units": minute % 50}),
        Kind::Customer => {
            json!({"name": "C", "email": format!("{}@x.test", Uuid::new_v4().simple())})
        }
        Kind::Invoice => {
            let customer = Box::pin(some_customer(tx, minute)).await?;
            let fallback = Inv {
                issued: Some(minute % 100),
                status: None,
                currency: None,
                cents: 100,
            };
            invoice_data(&format!("INV-{minute}"), customer, inv.unwrap_or(&fallback))
        }
    };
    let tenant = tx.tenant_id();
    sqlx::query_scalar(
        "insert into records (tenant_id, kind, data, created_at) values ($1, $2, $3, $4) returning id",
    )
    .bind(tenant)
    .bind(kind.name())
    .bind(data)
    .bind(base_time() + chrono::Duration::minutes(i64::from(minute)))
    .fetch_one(tx.conn().await.unwrap())
    .await
}

/// The transaction tenant's records in a stable order: (id, kind, data).
async fn records_in(tx: &mut ScopedTx) -> Result<Vec<(Uuid, String, Value)>, sqlx::Error> {
    sqlx::query_as("select id, kind, data from records order by id")
        .fetch_all(tx.conn().await.unwrap())
        .await
}

async fn apply_op(tx: &mut ScopedTx, op: &Op) -> Result<(), sqlx::Error> {
    match op {
        Op::Insert(kind, minute, inv) => {
            insert_random(tx, *kind, *minute, Some(inv)).await?;
        }
        Op::Update { pick, minute, inv } => {
            let records = records_in(tx).await?;
            if records.is_empty() {
                return Ok(());
            }
            let (id, kind, data) = &records[pick % records.len()];
            let data = match (kind.as_str(), inv) {
                ("invoice", Some(inv)) => {
                    let customer: Uuid = data["customer_id"].as_str().unwrap().parse().unwrap();
                    invoice_data(data["number"].as_str().unwrap(), customer, inv)
                }
                _ => data.clone(),
            };
            let created = minute.map(|m| base_time() + chrono::Duration::minutes(i64::from(m)));
            sqlx::query(
                "update records set data = $2, created_at = coalesce($3, created_at) where id = $1",
            )
            .bind(id)
            .bind(data)
            .bind(created)
            .execute(tx.conn().await.unwrap())
            .await?;
        }
        Op::Delete(pick) => {
            let records = records_in(tx).await?;
            if records.is_empty() {
                return Ok(());
            }
            let (id, _, _) = &records[pick % records.len()];
            sqlx::query(
                "delete from records r where r.id = $1
                   and (r.kind <> 'customer' or not exists (
                        select 1 from records i where i.kind = 'invoice' and i.customer_ref = r.id))",
            )
            .bind(id)
            .execute(tx.conn().await.unwrap())
            .await?;
        }
        Op::Bulk(kind, minutes) => {
            sqlx::query(
                "update records set created_at = created_at + $2 * interval '1 minute',
                        data = case when kind = 'invoice' and data ->> 'status' = 'open'
                                    then jsonb_set(data, '{status}', '\"paid\"') else data end
                 where kind = $1",
            )
            .bind(kind.name())
            .bind(f64::from(*minutes))
            .execute(tx.conn().await.unwrap())
            .await?;
        }
        Op::Commit | Op::Noise(..) => unreachable!("handled by the caller"),
    }
    Ok(())
}

/// One change to B's records, in its own committed transaction.
async fn apply_noise(
    app: &Scope,
    b: TenantId,
    what: u8,
    minute: u32,
    inv: &Inv,
) -> Result<(), sqlx::Error> {
    let mut tx = app.begin(b).await.map_err(|e| match e {
        tenant_worker::scope::Error::Database(e) => e,
        other => sqlx::Error::Protocol(other.to_string()),
    })?;
    match what {
        0 => {
            insert_random(&mut tx, Kind::Property, minute, None).await?;
        }
        1 => {
            insert_random(&mut tx, Kind::Invoice, minute, Some(inv)).await?;
        }
        _ => {
            let records = records_in(&mut tx).await?;
            if let Some((id, _, _)) = records
                .iter()
                .filter(|r| r.1 != "customer")
                .nth(minute as usize % records.len().max(1))
            {
                sqlx::query("delete from records where id = $1")
                    .bind(id)
                    .execute(tx.conn().await.unwrap())
                    .await?;
            } else {
                sqlx::query("update records set created_at = created_at + interval '1 day'")
                    .execute(tx.conn().await.unwrap())
                    .await?;
            }
        }
    }
    tx.commit()
        .await
        .map_err(|e| sqlx::Error::Protocol(e.to_string()))
}

struct Fixture {
    db: TestDb,
    app: Scope,
    queue: PgPool,
    admin: PgPool,
    enqueuer: Enqueuer,
    a: TenantId,
    b: TenantId,
    /// Buckets the incremental runs recomputed, over all cases (the test must exercise them).
    touched: std::sync::atomic::AtomicU64,
}

/// Runs one rollup for `tenant` through the real queue and worker; returns its result.
async fn rollup_now(f: &Fixture, tenant: TenantId, full: bool) -> Value {
    let args = if full {
        json!({"full": true})
    } else {
        json!({})
    };
    let job = enqueue(&f.enqueuer, tenant, "rollup", args).await;
    let worker = f.db.worker(Catalog::new()).await;
    tokio::time::timeout(
        Duration::from_secs(60),
        worker.run(
            RunOptions {
                until_idle: true,
                name: None,
            },
            CancellationToken::new(),
        ),
    )
    .await
    .expect("worker finished in time")
    .expect("worker ran");
    done_result(&f.admin, &f.queue, tenant, job).await
}

fn tc<E: std::fmt::Display>(e: E) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

async fn incremental_case(f: &Fixture, (initial, ops): Scenario) -> Result<(), TestCaseError> {
    let (a, b) = (f.a, f.b);
    // Reset A (records first: deleting them logs changes, which go next).
    for sql in [
        "delete from records where tenant_id = $1",
        "delete from rollups where tenant_id = $1",
        "delete from rollup_changes where tenant_id = $1",
        "delete from rollup_runs where tenant_id = $1",
    ] {
        sqlx::query(sql)
            .bind(a)
            .execute(&f.admin)
            .await
            .map_err(tc)?;
    }
    let mut tx = f.app.begin(a).await.map_err(tc)?;
    for (kind, minute, inv) in &initial {
        insert_random(&mut tx, *kind, *minute, Some(inv))
            .await
            .map_err(tc)?;
    }
    tx.commit().await.map_err(tc)?;
    let first = rollup_now(f, a, true).await;
    prop_assert_eq!(&first["records_per_kind_per_day"]["mode"], "full");
    let b_rollups = rollups_exact(&f.admin, b).await;

    let mut tx = f.app.begin(a).await.map_err(tc)?;
    for op in &ops {
        match op {
            Op::Commit => {
                tx.commit().await.map_err(tc)?;
                tx = f.app.begin(a).await.map_err(tc)?;
            }
            Op::Noise(what, minute, inv) => {
                apply_noise(&f.app, b, *what, *minute, inv)
                    .await
                    .map_err(tc)?;
            }
            other => apply_op(&mut tx, other).await.map_err(tc)?,
        }
    }
    tx.commit().await.map_err(tc)?;
    let b_changes: i64 =
        sqlx::query_scalar("select count(*) from rollup_changes where tenant_id = $1")
            .bind(b)
            .fetch_one(&f.admin)
            .await
            .map_err(tc)?;

    let incremental = rollup_now(f, a, false).await;
    for name in rollup::BUILTINS {
        prop_assert_eq!(&incremental[name]["mode"], "incremental", "{}", incremental);
        let touched = incremental[name]["buckets_touched"]
            .as_u64()
            .unwrap_or_default();
        f.touched
            .fetch_add(touched, std::sync::atomic::Ordering::Relaxed);
    }
    let after_incremental = rollups_of(&f.admin, a, None).await;
    let full = rollup_now(f, a, true).await;
    prop_assert_eq!(&full["invoices_per_month"]["mode"], "full");
    let after_full = rollups_of(&f.admin, a, None).await;
    prop_assert_eq!(
        &after_incremental,
        &after_full,
        "incremental differs from full"
    );
    prop_assert_eq!(
        &after_full,
        &builtin_truth(&f.admin, a).await,
        "full differs from truth"
    );
    prop_assert_eq!(
        &rollups_exact(&f.admin, b).await,
        &b_rollups,
        "A's rollups touched B's"
    );
    let b_changes_after: i64 =
        sqlx::query_scalar("select count(*) from rollup_changes where tenant_id = $1")
            .bind(b)
            .fetch_one(&f.admin)
            .await
            .map_err(tc)?;
    prop_assert_eq!(
        b_changes_after,
        b_changes,
        "A's rollup consumed B's change log"
    );
    Ok(())
}

#[test]
fn incremental_equals_full_after_random_changes() {
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let fixture = rt.block_on(async {
        let db = TestDb::new().await;
        let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
        let (app, queue, admin) = (db.scope().await, db.queue().await, db.admin().await);
        let enqueuer = enqueuer(&db, &Catalog::new()).await;
        let f = Fixture {
            db,
            app,
            queue,
            admin,
            enqueuer,
            a,
            b,
            touched: Default::default(),
        };
        // B: data and rollups of its own, which nothing of A's may change.
        seed_rollup_data(&f.app, b, 2).await;
        rollup_now(&f, b, true).await;
        f
    });
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 16,
        max_shrink_iters: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let outcome = runner.run(&scenario_strategy(), |scenario| {
        rt.block_on(incremental_case(&fixture, scenario))
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
    let touched = fixture.touched.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        touched > 16,
        "the incremental runs recomputed only {touched} buckets"
    );
    eprintln!(
        "incremental_equals_full_after_random_changes: 16 cases, {touched} buckets recomputed incrementally, {:?}",
        started.elapsed()
    );
}

// ------------------------------------------------------------------------------------------
// The command line
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_cli_imports_rolls_up_processes_and_shows() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin, queue_pool) = (db.scope().await, db.admin().await, db.queue().await);
    seed_emails(&app, b, &[]).await;
    let b_before = snapshot(&admin, b).await;
    let root = tempfile::tempdir().unwrap();
    let customer = Uuid::new_v4();
    let rows = [
        json!({"kind": "customer", "id": customer, "external_id": "c-1",
               "data": {"name": "Acme", "email": "Ops@Acme.TEST"}}),
        json!({"kind": "property", "external_id": "p-1", "data": {"name": "Tower", "units": 4}}),
        json!({"kind": "property", "external_id": "p-2", "data": {"units": 4}}),
        json!({"kind": "invoice", "external_id": "i-1",
               "data": {"number": "1", "amount": 19.99, "currency": "EUR", "status": "open",
                        "issued_on": "2026-02-03", "customer_id": customer}}),
    ];
    put(root.path(), a, "f.jsonl", jsonl(&rows));
    let imports_dir = root.path().display().to_string();
    let jobs_dir = shipped_jobs_dir().display().to_string();
    let mut env = db.env();
    env.push(("TENANT_WORKER__IMPORTS__DIR".into(), imports_dir));
    env.push(("TENANT_WORKER__JOBS__DIR".into(), jobs_dir));
    let a_text = a.to_string();
    let cli = |args: &[&str]| {
        let out = helpers::cli_with_env(args, &env);
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    };
    let job_of = |text: String| -> JobId {
        JobId::parse_any(text.trim()).unwrap_or_else(|| panic!("a job id: {text}"))
    };

    let import = job_of(cli(&[
        "enqueue",
        "import",
        "--tenant",
        &a_text,
        "--file",
        "f.jsonl",
        "--mode",
        "skip-invalid",
    ]));
    cli(&["run", "--until-idle"]);
    let result = import_result(&admin, &queue_pool, a, import).await;
    assert_eq!(
        (result.mode.as_str(), result.inserted, result.rejected),
        ("skip-invalid", 3, 1),
        "{result:?}"
    );
    assert_eq!(lines(&result), vec![3]);
    let shown = cli(&["jobs", "show", &import.to_string()]);
    assert!(shown.contains("state:     done"), "{shown}");
    assert!(shown.contains("\"inserted\":3"), "{shown}");

    let empty = cli(&["rollups", "show", "--tenant", &a_text]);
    assert!(empty.contains("no rollup rows"), "{empty}");

    let rollup_job = job_of(cli(&["enqueue", "rollup", "--tenant", &a_text, "--full"]));
    let process = job_of(cli(&[
        "enqueue",
        "process",
        "--tenant",
        &a_text,
        "--name",
        "normalise_customer_emails",
    ]));
    cli(&["run", "--until-idle"]);
    let result = done_result(&admin, &queue_pool, a, rollup_job).await;
    assert_eq!(result["records_per_kind_per_day"]["mode"], "full");
    // With no name, a run covers the declared rollups too, and says so.
    assert!(result.get("revenue_by_month").is_some(), "{result}");
    let result = done_result(&admin, &queue_pool, a, process).await;
    assert_eq!(result["rows_affected"], 1);
    let email: String = sqlx::query_scalar(
        "select data ->> 'email' from records where tenant_id = $1 and external_id = 'c-1'",
    )
    .bind(a)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(email, "ops@acme.test");
    assert_eq!(snapshot(&admin, b).await, b_before, "B changed");

    let truth = builtin_truth(&admin, a).await;
    let stored = rollups_of(&admin, a, None).await;
    let builtin: Vec<_> = stored
        .iter()
        .filter(|r| tenant_worker::jobs::rollup::BUILTINS.contains(&r.0.as_str()))
        .cloned()
        .collect();
    assert_eq!(builtin, truth);
    let shown = cli(&["rollups", "show", "--tenant", &a_text]);
    let shown_lines: Vec<&str> = shown.lines().collect();
    assert_eq!(shown_lines.len(), stored.len(), "{shown}");
    for (name, bucket, dims, count, _) in &truth {
        let dims = serde_json::from_str::<Value>(dims).unwrap().to_string();
        assert!(
            shown_lines.iter().any(|l| l.starts_with(name.as_str())
                && l.contains(&bucket.to_string())
                && l.contains(&dims)
                && l.contains(&format!("count {:>8}", count.unwrap()))),
            "{name} {bucket} {dims} not in:\n{shown}"
        );
    }
    let one = cli(&[
        "rollups",
        "show",
        "--tenant",
        &a_text,
        "--name",
        "invoices_per_month",
    ]);
    assert_eq!(
        one.lines().count(),
        truth.iter().filter(|r| r.0 == "invoices_per_month").count(),
        "{one}"
    );
    assert!(one.contains("sum 19.99"), "{one}");
    let b_shown = cli(&["rollups", "show", "--tenant", &b.to_string()]);
    assert!(b_shown.contains("no rollup rows"), "{b_shown}");
    // An unknown name is an error naming the known ones; an empty one hints at its own run.
    let out = helpers::cli_with_env(
        &["rollups", "show", "--tenant", &a_text, "--name", "nope"],
        &env,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no rollup named `nope`; known: records_per_kind_per_day"),
        "{}",
        stderr(&out)
    );
    let b_one = cli(&[
        "rollups",
        "show",
        "--tenant",
        &b.to_string(),
        "--name",
        "revenue_by_month",
    ]);
    assert!(b_one.contains("--name revenue_by_month`"), "{b_one}");

    // Refusals at enqueue, with the reason, and nothing queued.
    let queued_before: i64 = sqlx::query_scalar("select count(*) from apalis.jobs")
        .fetch_one(&admin)
        .await
        .unwrap();
    for (args, expected) in [
        (
            vec![
                "enqueue",
                "import",
                "--tenant",
                &a_text,
                "--file",
                "../f.jsonl",
            ],
            "inside the tenant's inbox",
        ),
        (
            vec!["enqueue", "process", "--tenant", &a_text, "--name", "nope"],
            "unknown processing job `nope`",
        ),
        (
            vec!["enqueue", "rollup", "--tenant", &a_text, "--name", "nope"],
            "unknown rollup `nope`",
        ),
        (
            vec![
                "enqueue", "import", "--tenant", &a_text, "--file", "f.jsonl", "--mode", "yolo",
            ],
            "unknown variant `yolo`",
        ),
    ] {
        let out = helpers::cli_with_env(&args, &env);
        assert!(!out.status.success(), "{args:?}: {}", stdout(&out));
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let queued_after: i64 = sqlx::query_scalar("select count(*) from apalis.jobs")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(queued_after, queued_before);
}
