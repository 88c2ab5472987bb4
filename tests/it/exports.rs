//! Exports and schedules, proven end to end: the real worker writes real files, which are
//! decoded and compared with ground truth read as the superuser with plain SQL; schedules are
//! ticked with an injected clock, raced, and run on the real clock.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use tenant_worker::Scope;
use tenant_worker::db;
use tenant_worker::jobs::declared::{self, Catalog, Declared, DeclaredKind};
use tenant_worker::jobs::export::{Format, Manifest};
use tenant_worker::queue::{Enqueuer, NewJob};
use tenant_worker::schedule::{self, Scheduler, store};
use tenant_worker::worker::RunOptions;
use tenant_worker::{JobId, TenantId};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{self, TestDb, stderr, stdout};
use crate::helpers::{insert_signed, job_info, run_worker, shipped_catalog, shipped_jobs_dir};

// ------------------------------------------------------------------------------------------
// Harness
// ------------------------------------------------------------------------------------------

/// A test database whose exports go to a private temporary folder (kept alive by the caller).
async fn export_db() -> (TestDb, tempfile::TempDir) {
    let mut db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("tempdir");
    db.settings.exports.dir = dir.path().to_path_buf();
    (db, dir)
}

/// An enqueuer that validates named sources against `catalog`.
async fn enqueuer_with(db: &TestDb, catalog: &Catalog) -> Enqueuer {
    db.enqueuer_with(catalog.clone()).await
}

async fn enqueue_export(enqueuer: &Enqueuer, tenant: TenantId, args: Value) -> JobId {
    enqueuer
        .enqueue_job(tenant, NewJob::new("export", args))
        .await
        .expect("enqueue")
        .id
}

/// Run records of a job, read as the superuser: (tenant, result).
async fn runs_of(admin: &PgPool, job: JobId) -> Vec<(TenantId, Option<Value>)> {
    sqlx::query_as("select tenant_id, result from job_runs where job_id = $1")
        .bind(job)
        .fetch_all(admin)
        .await
        .unwrap()
}

/// Every file (not folder) under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn temp_files_in(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".tmp-"))
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The file's content, gunzipped when its name ends in `.gz`.
fn decode(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    if path.extension().is_some_and(|x| x == "gz") {
        let mut text = String::new();
        flate2::read::GzDecoder::new(bytes.as_slice())
            .read_to_string(&mut text)
            .expect("valid gzip of UTF-8 text");
        text
    } else {
        String::from_utf8(bytes).expect("UTF-8")
    }
}

/// `<exports>/<tenant>/<source>/<job>.<ext>[.gz]`.
fn export_path(
    root: &Path,
    tenant: TenantId,
    source: &str,
    job: JobId,
    format: Format,
    gzip: bool,
) -> PathBuf {
    let ext = match format {
        Format::Csv => "csv",
        Format::Jsonl => "jsonl",
    };
    root.join(tenant.to_string())
        .join(source)
        .join(format!("{job}.{ext}{}", if gzip { ".gz" } else { "" }))
}

fn manifest_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap().to_os_string();
    name.push(".manifest.json");
    file.with_file_name(name)
}

fn read_manifest(file: &Path) -> Manifest {
    let text = std::fs::read_to_string(manifest_path(file)).expect("manifest exists");
    serde_json::from_str(&text).expect("manifest parses")
}

/// Checks everything an export promises about one finished job against `truth_rows`, and
/// returns the decoded file content.
#[allow(clippy::too_many_arguments)]
async fn check_export(
    db: &TestDb,
    admin: &PgPool,
    queue_pool: &PgPool,
    tenant: TenantId,
    source: &str,
    job: JobId,
    format: Format,
    gzip: bool,
    truth_rows: usize,
) -> String {
    let what = format!("{source} {format:?} gzip={gzip} tenant {tenant}");
    let info = job_info(queue_pool, job).await;
    assert_eq!(info.state, "done", "{what}: {:?}", info.error());
    let root = &db.settings.exports.dir;
    let file = export_path(root, tenant, source, job, format, gzip);
    let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("{what}: {}: {e}", file.display()));
    let m = read_manifest(&file);
    assert_eq!(m.tenant_id, tenant.to_string(), "{what}");
    assert_eq!(m.job_id, job.to_string(), "{what}");
    assert_eq!(m.source, source, "{what}");
    assert_eq!(m.format, format, "{what}");
    assert_eq!(m.gzip, gzip, "{what}");
    assert_eq!(m.rows, truth_rows as u64, "{what}: manifest rows");
    assert_eq!(m.bytes, bytes.len() as u64, "{what}: manifest bytes");
    assert_eq!(m.sha256, sha256_hex(&bytes), "{what}: manifest sha256");
    assert_eq!(
        m.file,
        file.file_name().unwrap().to_string_lossy(),
        "{what}"
    );
    assert!(m.started_at <= m.finished_at, "{what}");
    // The run record holds the manifest plus the path.
    let runs = runs_of(admin, job).await;
    assert_eq!(runs.len(), 1, "{what}: one run record");
    assert_eq!(runs[0].0, tenant, "{what}");
    let result = runs[0].1.clone().expect("a result");
    assert_eq!(result["path"], json!(file.display().to_string()), "{what}");
    let recorded: Manifest = serde_json::from_value(result).expect("the result is a manifest");
    assert_eq!(recorded, m, "{what}: run record vs manifest file");
    assert!(
        temp_files_in(file.parent().unwrap()).is_empty(),
        "{what}: temp files left"
    );
    decode(&file)
}

/// A CSV parser for PostgreSQL's CSV output (RFC 4180: quoted fields, doubled quotes,
/// separators and newlines inside quotes). NULL and empty both come back as "".
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut in_quotes = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quotes {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    field.push('"');
                    chars.next();
                } else {
                    in_quotes = false;
                }
            } else {
                field.push(c);
            }
            continue;
        }
        match c {
            '"' => in_quotes = true,
            ',' => row.push(std::mem::take(&mut field)),
            '\n' => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            _ => field.push(c),
        }
    }
    assert!(!in_quotes, "unterminated quoted field");
    assert!(
        field.is_empty() && row.is_empty(),
        "last line without newline"
    );
    rows
}

/// CSV as header + rows of `column -> value`.
fn csv_records(text: &str) -> (Vec<String>, Vec<BTreeMap<String, String>>) {
    let mut rows = parse_csv(text).into_iter();
    let header = rows.next().expect("a header line");
    let records = rows
        .map(|r| {
            assert_eq!(r.len(), header.len(), "row width: {r:?}");
            header.iter().cloned().zip(r).collect()
        })
        .collect();
    (header, records)
}

fn jsonl_records(text: &str) -> Vec<serde_json::Map<String, Value>> {
    text.lines()
        .map(|l| match serde_json::from_str(l) {
            Ok(Value::Object(o)) => o,
            other => panic!("not a JSON object line: {l:?} ({other:?})"),
        })
        .collect()
}

fn uuid_of(v: &str) -> Uuid {
    Uuid::parse_str(v).unwrap_or_else(|e| panic!("{v:?} is not a UUID: {e}"))
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

/// The binary's environment for this database plus `extra`.
fn env_with(db: &TestDb, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = db.env();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

// ------------------------------------------------------------------------------------------
// Data
// ------------------------------------------------------------------------------------------

/// `n` properties through the tenant's scoped transaction. Names, addresses and cities repeat
/// across tenants on purpose.
async fn seed_properties(app: &Scope, tenant: TenantId, n: i64) {
    let mut tx = app.begin(tenant).await.unwrap();
    sqlx::query(
        "insert into records (tenant_id, kind, data)
         select $1, 'property', jsonb_build_object(
             'name', 'Tower ' || g,
             'address', g || ' Main St',
             'city', (array['Springfield', 'Shelbyville', 'Ogdenville', 'North Haverbrook'])[1 + g % 4],
             'units', 1 + g % 17)
         from generate_series(1, $2) g",
    )
    .bind(tenant)
    .bind(n)
    .execute(tx.conn().await.unwrap())
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

async fn insert_record(app: &Scope, tenant: TenantId, kind: &str, data: Value) -> Uuid {
    let mut tx = app.begin(tenant).await.unwrap();
    let id = sqlx::query_scalar(
        "insert into records (tenant_id, kind, data) values ($1, $2, $3) returning id",
    )
    .bind(tenant)
    .bind(kind)
    .bind(data)
    .fetch_one(tx.conn().await.unwrap())
    .await
    .unwrap();
    tx.commit().await.unwrap();
    id
}

/// `n` customers named `<prefix> <g>` (same names and emails in every tenant).
async fn seed_customers(app: &Scope, tenant: TenantId, prefix: &str, n: i64) {
    let mut tx = app.begin(tenant).await.unwrap();
    sqlx::query(
        "insert into records (tenant_id, kind, data)
         select $1, 'customer', jsonb_build_object(
             'name', $2 || ' ' || g, 'email', lower($2) || g || '@example.test')
         from generate_series(1, $3) g",
    )
    .bind(tenant)
    .bind(prefix)
    .bind(n)
    .execute(tx.conn().await.unwrap())
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// `n` invoices spread over the tenant's customers: statuses cycle open/paid/sent, due dates
/// run from 20 days ago into the future. Invoice numbers repeat across tenants on purpose.
async fn seed_invoices(app: &Scope, tenant: TenantId, n: i64) {
    let mut tx = app.begin(tenant).await.unwrap();
    sqlx::query(
        "with c as (select id, row_number() over (order by data ->> 'name') - 1 as i,
                           count(*) over () as n
                    from records where tenant_id = $1 and kind = 'customer')
         insert into records (tenant_id, kind, data)
         select $1, 'invoice', jsonb_build_object(
             'customer_id', c.id,
             'number', 'INV-' || lpad(g::text, 4, '0'),
             'amount', g * 10.5,
             'currency', 'EUR',
             'status', (array['open', 'paid', 'sent'])[1 + g % 3],
             'issued_on', to_char(current_date - 60 + g::int, 'YYYY-MM-DD'),
             'due_on', to_char(current_date - 20 + 3 * g::int, 'YYYY-MM-DD'))
         from generate_series(1, $2) g join c on c.i = g % c.n",
    )
    .bind(tenant)
    .bind(n)
    .execute(tx.conn().await.unwrap())
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// Ground truth: a tenant's properties, id -> (name, city, units).
async fn truth_properties(
    admin: &PgPool,
    tenant: TenantId,
) -> BTreeMap<Uuid, (String, String, i64)> {
    sqlx::query_as::<_, (Uuid, String, String, i64)>(
        "select id, data ->> 'name', data ->> 'city', (data ->> 'units')::bigint
         from records where tenant_id = $1 and kind = 'property'",
    )
    .bind(tenant)
    .fetch_all(admin)
    .await
    .unwrap()
    .into_iter()
    .map(|(id, n, c, u)| (id, (n, c, u)))
    .collect()
}

async fn truth_ids(
    admin: &PgPool,
    tenant: TenantId,
    kind: &str,
    since: Option<DateTime<Utc>>,
) -> BTreeSet<Uuid> {
    sqlx::query_scalar(
        "select id from records where tenant_id = $1 and kind = $2
           and ($3::timestamptz is null or updated_at >= $3)",
    )
    .bind(tenant)
    .bind(kind)
    .bind(since)
    .fetch_all(admin)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

async fn all_record_ids(admin: &PgPool, tenant: TenantId) -> Vec<Uuid> {
    sqlx::query_scalar("select id from records where tenant_id = $1")
        .bind(tenant)
        .fetch_all(admin)
        .await
        .unwrap()
}

/// Nothing of `other` (its id or any of its record ids) appears in `text`.
async fn assert_nothing_of(admin: &PgPool, other: TenantId, text: &str, what: &str) {
    assert!(
        !text.contains(&other.to_string()),
        "{what}: another tenant's id in the file"
    );
    for id in all_record_ids(admin, other).await {
        assert!(
            !text.contains(&id.to_string()),
            "{what}: another tenant's record {id} in the file"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Exports
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn each_tenants_export_holds_exactly_its_rows_in_every_format() {
    let (db, _exports) = export_db().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin, queue_pool) = (db.scope().await, db.admin().await, db.queue().await);
    seed_properties(&app, a, 40).await;
    seed_properties(&app, b, 25).await;
    // Separators, quotes and a newline inside values: proper quoting and row counting.
    let tricky = insert_record(
        &app,
        a,
        "property",
        json!({"name": "Tricky, \"quoted\"\nname", "address": "1, \"Main\" St", "city": "Springfield", "units": 3}),
    )
    .await;
    // Other kinds must not show up in a property export.
    seed_customers(&app, a, "Acme", 3).await;
    seed_customers(&app, b, "Acme", 2).await;

    let enqueuer = db.enqueuer().await;
    let mut jobs = Vec::new();
    for format in [Format::Csv, Format::Jsonl] {
        for gzip in [false, true] {
            for tenant in [a, b] {
                let job = enqueue_export(
                    &enqueuer,
                    tenant,
                    json!({"source": "v_property", "format": format, "gzip": gzip}),
                )
                .await;
                jobs.push((tenant, format, gzip, job));
            }
        }
    }
    let summary = run_worker(&db, Catalog::new()).await;
    assert_eq!(summary.done, 8, "{summary:?}");

    for (tenant, format, gzip, job) in jobs {
        let other = if tenant == a { b } else { a };
        let what = format!("{format:?} gzip={gzip} tenant {tenant}");
        let truth = truth_properties(&admin, tenant).await;
        assert_eq!(truth.len(), if tenant == a { 41 } else { 25 });
        let text = check_export(
            &db,
            &admin,
            &queue_pool,
            tenant,
            "v_property",
            job,
            format,
            gzip,
            truth.len(),
        )
        .await;
        // (id, tenant_id, name, city, units) per row, however the format spells them.
        let rows: Vec<(Uuid, String, String, String, i64)> = match format {
            Format::Csv => {
                let (header, records) = csv_records(&text);
                assert_eq!(
                    header,
                    [
                        "id",
                        "tenant_id",
                        "external_id",
                        "name",
                        "address",
                        "city",
                        "units",
                        "created_at",
                        "updated_at"
                    ],
                    "{what}"
                );
                records
                    .iter()
                    .map(|r| {
                        (
                            uuid_of(&r["id"]),
                            r["tenant_id"].clone(),
                            r["name"].clone(),
                            r["city"].clone(),
                            r["units"].parse().unwrap(),
                        )
                    })
                    .collect()
            }
            Format::Jsonl => jsonl_records(&text)
                .iter()
                .map(|r| {
                    (
                        uuid_of(r["id"].as_str().unwrap()),
                        r["tenant_id"].as_str().unwrap().to_string(),
                        r["name"].as_str().unwrap().to_string(),
                        r["city"].as_str().unwrap().to_string(),
                        r["units"].as_i64().unwrap(),
                    )
                })
                .collect(),
        };
        assert_eq!(rows.len(), truth.len(), "{what}: rows in the file");
        let ids: BTreeSet<Uuid> = rows.iter().map(|r| r.0).collect();
        assert_eq!(ids.len(), rows.len(), "{what}: duplicate rows");
        assert_eq!(ids, truth.keys().copied().collect(), "{what}: ids");
        for (id, t, name, city, units) in &rows {
            assert_eq!(t, &tenant.to_string(), "{what}");
            assert_eq!(
                &(name.clone(), city.clone(), *units),
                &truth[id],
                "{what}: row {id}"
            );
        }
        if tenant == a {
            let row = rows.iter().find(|r| r.0 == tricky).expect("the tricky row");
            assert_eq!(row.2, "Tricky, \"quoted\"\nname", "{what}");
        }
        assert_nothing_of(&admin, other, &text, &what).await;
    }
}

#[tokio::test]
async fn record_kind_export_and_since_filter() {
    let (db, _exports) = export_db().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin, queue_pool) = (db.scope().await, db.admin().await, db.queue().await);
    seed_customers(&app, a, "Early", 6).await;
    seed_customers(&app, b, "Early", 4).await;
    seed_properties(&app, a, 5).await;
    seed_properties(&app, b, 3).await;
    // The first batch was last updated two hours ago (the touch trigger is bypassed, so the
    // time is exactly what we set).
    {
        let mut tx = admin.begin().await.unwrap();
        sqlx::query("set local session_replication_role = replica")
            .execute(&mut *tx)
            .await
            .unwrap();
        let n = sqlx::query("update records set updated_at = now() - interval '2 hours'")
            .execute(&mut *tx)
            .await
            .unwrap()
            .rows_affected();
        assert_eq!(n, 6 + 4 + 5 + 3);
        tx.commit().await.unwrap();
    }
    let since = Utc::now() - chrono::Duration::hours(1);
    seed_customers(&app, a, "Late", 3).await;
    seed_customers(&app, b, "Late", 2).await;
    seed_properties(&app, a, 2).await;

    let enqueuer = db.enqueuer().await;
    let since_text = since.to_rfc3339();
    let cases = [
        (a, "customer", Format::Csv, None),
        (b, "customer", Format::Csv, None),
        (a, "customer", Format::Jsonl, Some(since)),
        (b, "customer", Format::Csv, Some(since)),
        (a, "v_customer", Format::Jsonl, Some(since)),
        (b, "property", Format::Jsonl, Some(since)),
    ];
    let mut jobs = Vec::new();
    for (tenant, source, format, since) in cases {
        let mut args = json!({"source": source, "format": format});
        if since.is_some() {
            args["since"] = json!(since_text);
        }
        jobs.push(enqueue_export(&enqueuer, tenant, args).await);
    }
    let summary = run_worker(&db, Catalog::new()).await;
    assert_eq!(summary.done, cases.len() as u64, "{summary:?}");

    for ((tenant, source, format, since), job) in cases.into_iter().zip(jobs) {
        let other = if tenant == a { b } else { a };
        let what = format!("{source} {format:?} since={since:?} tenant {tenant}");
        let kind = source.trim_start_matches("v_");
        let truth = truth_ids(&admin, tenant, kind, since).await;
        let text = check_export(
            &db,
            &admin,
            &queue_pool,
            tenant,
            source,
            job,
            format,
            false,
            truth.len(),
        )
        .await;
        // (id, kind, name, email); kind only for record exports.
        let rows: Vec<(Uuid, Option<String>, Option<String>)> = match format {
            Format::Csv => {
                let (header, records) = csv_records(&text);
                assert_eq!(
                    header,
                    [
                        "id",
                        "kind",
                        "external_id",
                        "data",
                        "created_at",
                        "updated_at"
                    ],
                    "{what}"
                );
                records
                    .iter()
                    .map(|r| {
                        let data: Value = serde_json::from_str(&r["data"]).expect("data is JSON");
                        (
                            uuid_of(&r["id"]),
                            Some(r["kind"].clone()),
                            data["name"].as_str().map(str::to_string),
                        )
                    })
                    .collect()
            }
            Format::Jsonl => jsonl_records(&text)
                .iter()
                .map(|r| {
                    let name = if source.starts_with("v_") {
                        &r["name"]
                    } else {
                        &r["data"]["name"]
                    };
                    (
                        uuid_of(r["id"].as_str().unwrap()),
                        r.get("kind").map(|k| k.as_str().unwrap().to_string()),
                        name.as_str().map(str::to_string),
                    )
                })
                .collect(),
        };
        let ids: BTreeSet<Uuid> = rows.iter().map(|r| r.0).collect();
        assert_eq!(rows.len(), truth.len(), "{what}");
        assert_eq!(ids, truth, "{what}");
        for (_, k, name) in &rows {
            if !source.starts_with("v_") {
                assert_eq!(k.as_deref(), Some(kind), "{what}: other kinds exported");
            }
            if kind == "customer" && since.is_some() {
                assert!(
                    name.as_deref().unwrap().starts_with("Late "),
                    "{what}: {name:?} is older than since"
                );
            }
        }
        assert_nothing_of(&admin, other, &text, &what).await;
    }
}

#[tokio::test]
async fn a_named_export_without_a_tenant_filter_still_exports_one_tenant() {
    let (db, _exports) = export_db().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin, queue_pool) = (db.scope().await, db.admin().await, db.queue().await);
    seed_properties(&app, a, 30).await;
    seed_properties(&app, b, 17).await;
    // A property without a city: its group is the NULL city.
    insert_record(&app, a, "property", json!({"name": "Nowhere", "units": 4})).await;
    seed_customers(&app, a, "Acme", 3).await;
    seed_customers(&app, b, "Acme", 2).await;
    seed_invoices(&app, a, 14).await;
    seed_invoices(&app, b, 5).await;

    let catalog = shipped_catalog();
    let enqueuer = enqueuer_with(&db, &catalog).await;
    let mut by_city = Vec::new();
    let mut overdue = Vec::new();
    for tenant in [a, b] {
        by_city.push((
            tenant,
            enqueue_export(&enqueuer, tenant, json!({"source": "properties_by_city"})).await,
        ));
        overdue.push((
            tenant,
            enqueue_export(&enqueuer, tenant, json!({"source": "overdue_invoices"})).await,
        ));
    }
    let summary = run_worker(&db, catalog).await;
    assert_eq!(summary.done, 4, "{summary:?}");

    for (tenant, job) in by_city {
        let truth: Vec<Vec<String>> = sqlx::query_as::<_, (Option<String>, i64, Option<i64>)>(
            "select data ->> 'city' as city, count(*), sum((data ->> 'units')::int)
             from records where tenant_id = $1 and kind = 'property'
             group by 1 order by 1",
        )
        .bind(tenant)
        .fetch_all(&admin)
        .await
        .unwrap()
        .into_iter()
        .map(|(c, n, u)| {
            vec![
                c.unwrap_or_default(),
                n.to_string(),
                u.map(|u| u.to_string()).unwrap_or_default(),
            ]
        })
        .collect();
        assert_eq!(truth.len(), if tenant == a { 5 } else { 4 });
        // CSV is the declared default format.
        let text = check_export(
            &db,
            &admin,
            &queue_pool,
            tenant,
            "properties_by_city",
            job,
            Format::Csv,
            false,
            truth.len(),
        )
        .await;
        let mut rows = parse_csv(&text);
        assert_eq!(rows.remove(0), ["city", "properties", "units"]);
        assert_eq!(rows, truth, "properties_by_city for {tenant}");
    }

    for (tenant, job) in overdue {
        let truth: Vec<(String, String, String)> = sqlx::query_as(
            "select i.data ->> 'number', c.data ->> 'name', c.data ->> 'email'
             from records i join records c on c.tenant_id = i.tenant_id and c.id = i.customer_ref
             where i.tenant_id = $1 and i.kind = 'invoice'
               and i.data ->> 'status' <> 'paid' and (i.data ->> 'due_on')::date < current_date
             order by (i.data ->> 'due_on')::date, i.data ->> 'number'",
        )
        .bind(tenant)
        .fetch_all(&admin)
        .await
        .unwrap();
        assert!(!truth.is_empty());
        // JSONL is the declared default format.
        let text = check_export(
            &db,
            &admin,
            &queue_pool,
            tenant,
            "overdue_invoices",
            job,
            Format::Jsonl,
            false,
            truth.len(),
        )
        .await;
        let rows: Vec<(String, String, String)> = jsonl_records(&text)
            .iter()
            .map(|r| {
                (
                    r["number"].as_str().unwrap().to_string(),
                    r["customer"].as_str().unwrap().to_string(),
                    r["email"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            text.lines().count(),
            truth.len(),
            "overdue_invoices lines for {tenant}"
        );
        assert_eq!(rows, truth, "overdue_invoices for {tenant}");
    }
    // The tenants' overdue counts differ, so a leak would show in the counts above.
    let count = |t| {
        let admin = admin.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "select count(*) from records where tenant_id = $1 and kind = 'invoice'
                   and data ->> 'status' <> 'paid' and (data ->> 'due_on')::date < current_date",
            )
            .bind(t)
            .fetch_one(&admin)
            .await
            .unwrap()
        }
    };
    assert_ne!(count(a).await, count(b).await);
}

const SETS_TENANT: &str = r#"name = "sneaky"
kind = "export"
sql = "select set_config('app.tenant_id', '00000000-0000-0000-0000-000000000000', true)"
"#;

#[tokio::test]
async fn rejected_exports_write_nothing() {
    let (db, exports) = export_db().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin, queue_pool) = (db.scope().await, db.admin().await, db.queue().await);
    seed_properties(&app, a, 5).await;
    seed_properties(&app, b, 3).await;

    // Declared SQL is refused at load, naming the file.
    for (sql, expected) in [
        (
            "select set_config('app.tenant_id', 'x', true)",
            "tenant context",
        ),
        (
            "select * from v_property; select * from v_customer",
            "exactly one statement",
        ),
        ("delete from records", "read-only SELECT"),
        ("v_property; drop table records", "does not parse"),
    ] {
        let path = Path::new("jobs/evil_export.toml");
        let text = format!("name = \"evil\"\nkind = \"export\"\nsql = {}\n", json!(sql));
        let err = declared::parse_declared(path, &text)
            .expect_err(sql)
            .to_string();
        assert!(
            err.contains("evil_export.toml") && err.contains(expected),
            "{sql}: {err}"
        );
    }

    // The CLI refuses to enqueue, with the reason, and enqueues nothing.
    let jobs_dir = shipped_jobs_dir().display().to_string();
    let env = env_with(&db, &[("TENANT_WORKER__JOBS__DIR", &jobs_dir)]);
    let (a_text, since) = (a.to_string(), "2026-01-01T00:00:00Z");
    for (extra, expected) in [
        (vec!["--source", "v_nothing"], "unknown source `v_nothing`"),
        (
            vec!["--source", "v_property; drop table records"],
            "is not a valid name",
        ),
        (vec!["--source", "../../etc"], "is not a valid name"),
        (
            vec!["--source", "v_property/../../x"],
            "is not a valid name",
        ),
        (
            vec!["--source", "properties_by_city", "--since", since],
            "`since` applies to views",
        ),
    ] {
        let mut args = vec!["enqueue", "export", "--tenant", &a_text];
        args.extend(extra.iter().copied());
        let out = helpers::cli_with_env(&args, &env);
        assert!(
            !out.status.success(),
            "{extra:?} was enqueued: {}",
            stdout(&out)
        );
        assert!(
            stderr(&out).contains(expected),
            "{extra:?}: {}",
            stderr(&out)
        );
    }
    // A jobs folder with a file that sets the tenant: the CLI names the file.
    let bad_jobs = tempfile::tempdir().unwrap();
    std::fs::write(bad_jobs.path().join("sneaky.toml"), SETS_TENANT).unwrap();
    let bad_dir = bad_jobs.path().display().to_string();
    let out = helpers::cli_with_env(
        &[
            "enqueue",
            "export",
            "--tenant",
            &a_text,
            "--source",
            "v_property",
        ],
        &env_with(&db, &[("TENANT_WORKER__JOBS__DIR", &bad_dir)]),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("sneaky.toml") && stderr(&out).contains("tenant context"),
        "{}",
        stderr(&out)
    );
    let queued: i64 = sqlx::query_scalar("select count(*) from apalis.jobs")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(queued, 0, "a refused enqueue left a job");

    // Jobs that bypass the enqueuer's check are rejected by the worker before any work.
    let mut crafted = Vec::new();
    for (args, expected) in [
        (json!({"source": "v_nothing"}), "unknown source `v_nothing`"),
        (
            json!({"source": "v_property; drop table records"}),
            "is not a valid name",
        ),
        (json!({"source": "../../etc"}), "is not a valid name"),
        (
            json!({"source": "v_property/../../x"}),
            "is not a valid name",
        ),
        (
            json!({"source": "properties_by_city", "since": since}),
            "`since` applies to views",
        ),
        (
            json!({"source": "v_property", "format": "xml"}),
            "unknown variant `xml`",
        ),
        (
            json!({"source": "v_property", "path": "/etc"}),
            "unknown field `path`",
        ),
    ] {
        crafted.push((
            insert_signed(&db, &admin, a, "export", args.clone()).await,
            args,
            expected,
        ));
    }
    // Valid for an enqueuer that knows the named export, unknown to a worker that does not.
    let mut enqueuer_catalog = shipped_catalog();
    enqueuer_catalog.insert(
        declared::parse_declared(
            Path::new("elsewhere/extra_export.toml"),
            "name = \"extra_export\"\nkind = \"export\"\nsql = \"select name from v_property\"\n",
        )
        .unwrap(),
    );
    let enqueuer = enqueuer_with(&db, &enqueuer_catalog).await;
    let unknown_named = enqueue_export(&enqueuer, b, json!({"source": "extra_export"})).await;
    crafted.push((
        unknown_named,
        json!({"source": "extra_export"}),
        "unknown source `extra_export`",
    ));

    // The worker knows the shipped named exports (so `since` on one is refused for what it is).
    let summary = run_worker(&db, shipped_catalog()).await;
    assert_eq!(summary.rejected, crafted.len() as u64, "{summary:?}");
    assert_eq!(summary.done, 0, "{summary:?}");
    for (job, args, expected) in crafted {
        let info = job_info(&queue_pool, job).await;
        assert_eq!(info.state, "rejected", "{args}: {info:?}");
        let error = info.error().unwrap_or_default();
        assert!(error.contains(expected), "{args}: {error}");
        assert!(
            runs_of(&admin, job).await.is_empty(),
            "{args}: a run record exists"
        );
    }
    let written: Vec<_> = std::fs::read_dir(exports.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(written.is_empty(), "rejected exports wrote {written:?}");
}

/// A named export must not be able to switch the tenant context: the check before the file
/// gets its final name has to see the switch. Built directly (as `Catalog::insert` allows) so
/// the load-time check does not stop it first.
#[tokio::test]
async fn a_tenant_switch_inside_a_named_export_is_caught() {
    let (db, exports) = export_db().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin, queue_pool) = (db.scope().await, db.admin().await, db.queue().await);
    seed_properties(&app, a, 3).await;
    seed_properties(&app, b, 7).await;
    let mut catalog = Catalog::new();
    catalog.insert(Declared {
        name: "sneaky".into(),
        kind: DeclaredKind::Export,
        description: String::new(),
        format: Some("csv".into()),
        sql: format!(
            "select r.id, r.tenant_id from (select set_config('app.tenant_id', '{b}', true) as s offset 0) x, \
             lateral (select id, tenant_id from records where x.s is not null) r"
        ),
        file: PathBuf::from("sneaky.toml"),
    });
    let job = enqueue_export(
        &enqueuer_with(&db, &catalog).await,
        a,
        json!({"source": "sneaky"}),
    )
    .await;
    run_worker(&db, catalog).await;
    let info = job_info(&queue_pool, job).await;
    let leaked: Vec<String> = files_under(exports.path())
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .filter(|t| t.contains(&b.to_string()))
        .collect();
    assert!(
        leaked.is_empty(),
        "B's rows were exported as A's (job {}): {leaked:?}",
        info.state
    );
    assert_ne!(info.state, "done", "the tenant switch went unnoticed");
    assert!(runs_of(&admin, job).await.is_empty());
}

/// End to end: a declared job file, loaded like the worker loads `jobs/`, cannot make A's export
/// contain B's rows (either the load refuses it, naming the file, or the run catches the switch).
#[tokio::test]
async fn a_declared_job_file_cannot_export_another_tenants_rows() {
    let (db, exports) = export_db().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin, queue_pool) = (db.scope().await, db.admin().await, db.queue().await);
    seed_properties(&app, a, 3).await;
    seed_properties(&app, b, 7).await;
    let jobs = tempfile::tempdir().unwrap();
    let sql = format!(
        "select r.id, r.tenant_id from set_config('app.tenant_id', '{b}', true) s, \
         lateral (select id, tenant_id from records where s is not null) r"
    );
    std::fs::write(
        jobs.path().join("sneaky.toml"),
        format!(
            "name = \"sneaky\"\nkind = \"export\"\nsql = {}\n",
            json!(sql)
        ),
    )
    .unwrap();
    let catalog = match Catalog::load(jobs.path(), true) {
        Ok(c) => c,
        Err(e) => {
            assert!(e.to_string().contains("sneaky.toml"), "{e}");
            return;
        }
    };
    let job = enqueue_export(
        &enqueuer_with(&db, &catalog).await,
        a,
        json!({"source": "sneaky"}),
    )
    .await;
    run_worker(&db, catalog).await;
    let info = job_info(&queue_pool, job).await;
    let leaked = files_under(exports.path()).iter().any(|p| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .contains(&b.to_string())
    });
    assert!(
        !leaked,
        "B's rows were exported into A's folder (job {})",
        info.state
    );
    assert_ne!(info.state, "done");
    assert!(runs_of(&admin, job).await.is_empty());
}

/// The load-time check must see `set_config` wherever the statement calls it, including as a
/// table function in FROM.
#[tokio::test]
async fn set_config_in_from_is_refused_at_load() {
    for sql in [
        "select s from set_config('app.tenant_id', '00000000-0000-0000-0000-000000000000', true) as s",
        "select r.id from pg_catalog.set_config('app.tenant_id', 'x', true) s, records r",
        "select * from pg_sleep(10)",
    ] {
        let text = format!("name = \"evil\"\nkind = \"export\"\nsql = {}\n", json!(sql));
        let res = declared::parse_declared(Path::new("jobs/evil.toml"), &text);
        assert!(res.is_err(), "accepted: {sql}");
    }
}

/// The manifest's row count is the number of JSON lines, whatever the values contain.
#[tokio::test]
async fn jsonl_row_count_is_right_when_a_value_holds_a_double_quote() {
    let (db, _exports) = export_db().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin, queue_pool) = (db.scope().await, db.admin().await, db.queue().await);
    insert_record(
        &app,
        a,
        "property",
        json!({"name": "The \"Oak", "city": "Springfield", "units": 1}),
    )
    .await;
    seed_properties(&app, a, 10).await;
    seed_properties(&app, b, 4).await;
    let enqueuer = db.enqueuer().await;
    let csv = enqueue_export(
        &enqueuer,
        a,
        json!({"source": "v_property", "format": "csv"}),
    )
    .await;
    let jsonl = enqueue_export(
        &enqueuer,
        a,
        json!({"source": "v_property", "format": "jsonl"}),
    )
    .await;
    run_worker(&db, Catalog::new()).await;
    let truth = truth_properties(&admin, a).await.len();
    check_export(
        &db,
        &admin,
        &queue_pool,
        a,
        "v_property",
        csv,
        Format::Csv,
        false,
        truth,
    )
    .await;
    let text = check_export(
        &db,
        &admin,
        &queue_pool,
        a,
        "v_property",
        jsonl,
        Format::Jsonl,
        false,
        truth,
    )
    .await;
    assert_eq!(text.lines().count(), truth);
}

// ------------------------------------------------------------------------------------------
// Schedules
// ------------------------------------------------------------------------------------------

async fn scheduler_pool(db: &TestDb) -> PgPool {
    db::scheduler_pool(&db.settings, &db.urls)
        .await
        .expect("scheduler pool")
}

async fn new_scheduler(db: &TestDb) -> Scheduler {
    Scheduler::new(scheduler_pool(db).await, db.enqueuer().await)
}

async fn add_schedule(
    db: &TestDb,
    app: &Scope,
    tenant: TenantId,
    cron: &str,
    kind: &str,
    args: Value,
) -> schedule::Schedule {
    let id = store::add(
        app,
        &db.kinds(Catalog::new()),
        tenant,
        cron,
        "UTC",
        kind,
        &args,
    )
    .await
    .expect("add schedule");
    store::list_all(&scheduler_pool(db).await)
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.id == id)
        .expect("the new schedule is listed")
}

/// (idempotency key, run_at, status) of the jobs a schedule enqueued, oldest first.
async fn jobs_of_schedule(admin: &PgPool, schedule: Uuid) -> Vec<(String, DateTime<Utc>, String)> {
    sqlx::query_as(
        "select idempotency_key, run_at, status from apalis.jobs
         where idempotency_key like $1 order by run_at, idempotency_key",
    )
    .bind(format!("schedule:{schedule}:%"))
    .fetch_all(admin)
    .await
    .unwrap()
}

fn fire_of_key(key: &str) -> DateTime<Utc> {
    let secs: i64 = key.rsplit(':').next().unwrap().parse().unwrap();
    DateTime::from_timestamp(secs, 0).unwrap()
}

fn expected_key(schedule: &schedule::Schedule, now: DateTime<Utc>) -> String {
    let cron = schedule::cron::parse_cron(&schedule.cron).unwrap();
    let tz = schedule::cron::parse_tz(&schedule.timezone).unwrap();
    let fire = schedule::cron::latest_fire_before(&cron, tz, now).unwrap();
    format!("schedule:{}:{}", schedule.id, fire.timestamp())
}

#[tokio::test]
async fn schedules_are_validated_and_tenant_scoped() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, sched) = (db.scope().await, scheduler_pool(&db).await);
    let catalog = shipped_catalog();
    let export = json!({"source": "v_property", "format": "csv"});

    for (cron, tz, kind, args, expected) in [
        (
            "bogus",
            "UTC",
            "export",
            export.clone(),
            "invalid cron expression `bogus`",
        ),
        (
            "61 * * * *",
            "UTC",
            "export",
            export.clone(),
            "invalid cron expression `61 * * * *`",
        ),
        (
            "0 3 * * *",
            "Mars/Olympus",
            "export",
            export.clone(),
            "unknown time zone `Mars/Olympus`",
        ),
        (
            "0 3 * * *",
            "UTC",
            "explode",
            json!({}),
            "unknown job kind `explode`",
        ),
        (
            "0 3 * * *",
            "UTC",
            "export",
            json!({"source": "v_nothing"}),
            "unknown source `v_nothing`",
        ),
        (
            "0 3 * * *",
            "UTC",
            "export",
            json!({"source": "properties_by_city", "since": "2026-01-01T00:00:00Z"}),
            "`since`",
        ),
        (
            "0 3 * * *",
            "UTC",
            "noop",
            json!({"sleep_ms": "x"}),
            "invalid arguments for `noop`",
        ),
    ] {
        let err = store::add(&app, &db.kinds(catalog.clone()), a, cron, tz, kind, &args)
            .await
            .expect_err(cron);
        let text = error_chain(&err);
        assert!(text.contains(expected), "{cron} {tz} {kind} {args}: {text}");
        assert!(
            matches!(err, schedule::Error::Job(_) | schedule::Error::Parse(_)),
            "{err:?}"
        );
    }
    // An unknown tenant and a suspended one: named, not a raw foreign-key error.
    let stranger = TenantId(Uuid::new_v4());
    let err = store::add(
        &app,
        &db.kinds(catalog.clone()),
        stranger,
        "0 3 * * *",
        "UTC",
        "noop",
        &json!({}),
    )
    .await
    .expect_err("unknown tenant");
    assert_eq!(
        err.to_string(),
        format!("no tenant with id {stranger} (see `tenant-worker tenant list`)")
    );
    let resting = db.tenant("Resting").await;
    tenant_worker::tenant::set_status(&db.admin().await, &db.settings.roles.owner, resting, false)
        .await
        .unwrap();
    let err = store::add(
        &app,
        &db.kinds(catalog.clone()),
        resting,
        "0 3 * * *",
        "UTC",
        "noop",
        &json!({}),
    )
    .await
    .expect_err("suspended tenant");
    assert!(err.to_string().contains("is suspended"), "{err}");
    let out = db.cli(&[
        "schedule",
        "add",
        "--tenant",
        &stranger.to_string(),
        "--cron",
        "0 3 * * *",
        "noop",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("no tenant with id {stranger}")),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("foreign key"), "{}", stderr(&out));
    assert!(
        store::list_all(&sched).await.unwrap().is_empty(),
        "a refused schedule was stored"
    );

    let for_a = store::add(
        &app,
        &db.kinds(catalog.clone()),
        a,
        "0 3 * * *",
        "Europe/Berlin",
        "export",
        &export,
    )
    .await
    .unwrap();
    let for_b = store::add(
        &app,
        &db.kinds(catalog.clone()),
        b,
        "0 6 * * 1",
        "UTC",
        "export",
        &json!({"source": "overdue_invoices"}),
    )
    .await
    .unwrap();
    let ids = |v: Vec<schedule::Schedule>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
    assert_eq!(ids(store::list_for_tenant(&app, a).await.unwrap()), [for_a]);
    assert_eq!(ids(store::list_for_tenant(&app, b).await.unwrap()), [for_b]);
    let all = store::list_all(&sched).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|s| (s.id, s.tenant_id.0))
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([(for_a, a.0), (for_b, b.0)])
    );
    let stored = all.iter().find(|s| s.id == for_a).unwrap();
    assert_eq!(
        (
            stored.cron.as_str(),
            stored.timezone.as_str(),
            stored.kind.as_str()
        ),
        ("0 3 * * *", "Europe/Berlin", "export")
    );
    assert_eq!(stored.args, export);

    // The scheduler role reads schedules, not tenant data.
    for rel in ["records", "v_property", "job_runs"] {
        let err = sqlx::query(sqlx::AssertSqlSafe(format!("select count(*) from {rel}")))
            .fetch_one(&sched)
            .await
            .expect_err(rel);
        assert_eq!(
            err.as_database_error().and_then(|e| e.code()).as_deref(),
            Some("42501"),
            "{rel}: {err}"
        );
    }
    // Nor can it change schedules.
    let err = sqlx::query("delete from schedules")
        .execute(&sched)
        .await
        .expect_err("delete");
    assert_eq!(
        err.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("42501")
    );

    // The app role in B's context can neither delete nor write A's schedules.
    let mut tx = app.begin(b).await.unwrap();
    let n = sqlx::query("delete from schedules where id = $1")
        .bind(for_a)
        .execute(tx.conn().await.unwrap())
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(n, 0);
    let n = sqlx::query("update schedules set enabled = false where id = $1")
        .bind(for_a)
        .execute(tx.conn().await.unwrap())
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(n, 0);
    tx.commit().await.unwrap();
    let mut tx = app.begin(b).await.unwrap();
    let err = sqlx::query(
        "insert into schedules (tenant_id, cron, kind) values ($1, '* * * * *', 'noop')",
    )
    .bind(a)
    .execute(tx.conn().await.unwrap())
    .await
    .expect_err("insert for another tenant");
    assert_eq!(
        err.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("42501"),
        "{err}"
    );
    tx.rollback().await.unwrap();
    assert_eq!(store::list_all(&sched).await.unwrap().len(), 2);
    assert!(
        store::list_all(&sched)
            .await
            .unwrap()
            .iter()
            .all(|s| s.enabled)
    );

    assert_eq!(store::remove(&sched, &app, for_a).await.unwrap(), a);
    assert!(store::list_for_tenant(&app, a).await.unwrap().is_empty());
    assert_eq!(ids(store::list_for_tenant(&app, b).await.unwrap()), [for_b]);
    assert!(
        matches!(store::remove(&sched, &app, for_a).await, Err(schedule::Error::NotFound(id)) if id == for_a)
    );

    // The same through the binary.
    let (a_text, b_text) = (a.to_string(), b.to_string());
    let out = db.cli(&[
        "schedule",
        "add",
        "--tenant",
        &a_text,
        "--cron",
        "*/5 * * * *",
        "export",
        "--source",
        "v_property",
        "--format",
        "csv",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = Uuid::parse_str(stdout(&out).trim()).expect("prints a UUID");
    let out = db.cli(&["schedule", "list", "--tenant", &a_text]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&id.to_string()) && stdout(&out).contains("v_property"),
        "{}",
        stdout(&out)
    );
    let out = db.cli(&["schedule", "list", "--tenant", &b_text]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains(&id.to_string()), "{}", stdout(&out));
    assert!(
        stdout(&out).contains(&for_b.to_string()),
        "{}",
        stdout(&out)
    );
    let out = db.cli(&["schedule", "list"]);
    assert!(
        stdout(&out).contains(&id.to_string()) && stdout(&out).contains(&for_b.to_string()),
        "{}",
        stdout(&out)
    );
    let out = db.cli(&[
        "schedule",
        "add",
        "--tenant",
        &a_text,
        "--cron",
        "61 * * * *",
        "export",
        "--source",
        "v_property",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid cron expression"),
        "{}",
        stderr(&out)
    );
    let out = db.cli(&[
        "schedule",
        "add",
        "--tenant",
        &a_text,
        "--cron",
        "0 3 * * *",
        "export",
        "--source",
        "v_nothing",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown source `v_nothing`"),
        "{}",
        stderr(&out)
    );
    let out = db.cli(&["schedule", "remove", &id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&a_text), "{}", stdout(&out));
    let out = db.cli(&["schedule", "list", "--tenant", &a_text]);
    assert!(!stdout(&out).contains(&id.to_string()), "{}", stdout(&out));
}

#[tokio::test]
async fn two_schedulers_enqueue_a_due_fire_exactly_once() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin) = (db.scope().await, db.admin().await);
    let s = add_schedule(&db, &app, a, "* * * * * *", "noop", json!({})).await;
    assert_eq!(s.tenant_id, a);
    let (one, two) = (new_scheduler(&db).await, new_scheduler(&db).await);

    let now = s.created_at + chrono::Duration::seconds(5);
    let (r1, r2) = tokio::join!(one.tick(now), two.tick(now));
    let (r1, r2) = (r1.unwrap(), r2.unwrap());
    assert_eq!(r1.len() + r2.len(), 1, "{r1:?} {r2:?}");
    let jobs = jobs_of_schedule(&admin, s.id).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].0, expected_key(&s, now));
    let enqueued = r1.into_iter().chain(r2).next().unwrap();
    let info = job_info(&db.queue().await, enqueued).await;
    assert_eq!(info.tenant_id.as_deref(), Some(a.to_string().as_str()));
    assert_eq!(info.kind.as_deref(), Some("noop"));

    // Same instant again: nothing new, from either.
    let (r1, r2) = tokio::join!(one.tick(now), two.tick(now));
    assert!(r1.unwrap().is_empty() && r2.unwrap().is_empty());
    assert_eq!(jobs_of_schedule(&admin, s.id).await.len(), 1);

    // Three seconds later: three fires were due, one job for the latest.
    let later = now + chrono::Duration::seconds(3);
    let (r1, r2) = tokio::join!(one.tick(later), two.tick(later));
    assert_eq!(r1.unwrap().len() + r2.unwrap().len(), 1);
    let jobs = jobs_of_schedule(&admin, s.id).await;
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert!(
        jobs.iter().any(|j| j.0 == expected_key(&s, later)),
        "{jobs:?}"
    );
    let last: DateTime<Utc> =
        sqlx::query_scalar("select last_fire from schedule_fires where schedule_id = $1")
            .bind(s.id)
            .fetch_one(&admin)
            .await
            .unwrap();
    assert_eq!(
        format!("schedule:{}:{}", s.id, last.timestamp()),
        expected_key(&s, later)
    );
    // Nothing for B, which has no schedule.
    let for_b: i64 =
        sqlx::query_scalar("select count(*) from apalis.jobs where metadata -> 'tenant_id' = $1")
            .bind(b.to_string())
            .fetch_one(&admin)
            .await
            .unwrap();
    assert_eq!(for_b, 0);
}

#[tokio::test]
async fn a_per_second_cron_fires_on_time() {
    let db = TestDb::new().await;
    let a = db.tenant("Northwind").await;
    let (app, admin) = (db.scope().await, db.admin().await);
    let s = add_schedule(&db, &app, a, "* * * * * *", "noop", json!({})).await;
    let sched = new_scheduler(&db).await;
    let (stop_scheduler, stop_worker) = (CancellationToken::new(), CancellationToken::new());
    let started = Instant::now();
    let ticking = tokio::spawn(sched.run(Duration::from_millis(200), stop_scheduler.clone()));
    let driver = {
        let admin = admin.clone();
        let stop_worker = stop_worker.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            stop_scheduler.cancel();
            ticking.await.unwrap();
            let elapsed = started.elapsed();
            // Let the worker finish what was enqueued.
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline
                && jobs_of_schedule(&admin, s.id)
                    .await
                    .iter()
                    .any(|j| j.2 != "Done")
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            stop_worker.cancel();
            elapsed
        }
    };
    let (summary, elapsed) = tokio::join!(
        db.run_with(
            RunOptions {
                until_idle: false,
                name: None
            },
            stop_worker.clone()
        ),
        driver
    );
    let jobs = jobs_of_schedule(&admin, s.id).await;
    assert!(jobs.len() >= 2, "{jobs:?}");
    assert!(
        jobs.len() as u64 <= elapsed.as_secs() + 2,
        "more fires than seconds: {jobs:?}"
    );
    assert_eq!(summary.done, jobs.len() as u64, "{summary:?}");
    let mut fires = BTreeSet::new();
    for (key, run_at, status) in &jobs {
        assert_eq!(status, "Done", "{key}");
        let fire = fire_of_key(key);
        assert!(fires.insert(fire), "fire {fire} enqueued twice");
        let late = *run_at - fire;
        assert!(
            late >= chrono::Duration::zero() && late <= chrono::Duration::milliseconds(1500),
            "{key}: enqueued {late} after its fire time"
        );
    }
}

#[tokio::test]
async fn missed_runs_fire_once_at_start() {
    let db = TestDb::new().await;
    let a = db.tenant("Northwind").await;
    let (app, admin) = (db.scope().await, db.admin().await);
    let s = add_schedule(&db, &app, a, "0 * * * * *", "noop", json!({})).await;
    sqlx::query("update schedules set created_at = now() - interval '1 hour' where id = $1")
        .bind(s.id)
        .execute(&admin)
        .await
        .unwrap();
    let sched = new_scheduler(&db).await;
    let now = Utc::now();
    let enqueued = sched.tick(now).await.unwrap();
    assert_eq!(enqueued.len(), 1, "{enqueued:?}");
    let jobs = jobs_of_schedule(&admin, s.id).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].0, expected_key(&s, now));
    assert_eq!(fire_of_key(&jobs[0].0).timestamp() % 60, 0);
    assert!(sched.tick(now).await.unwrap().is_empty());
    assert_eq!(jobs_of_schedule(&admin, s.id).await.len(), 1);
}

// ------------------------------------------------------------------------------------------
// Crash safety
// ------------------------------------------------------------------------------------------

/// Starts the real binary with this database's environment, exports going to `exports`.
fn spawn_binary(db: &TestDb, args: &[&str], exports: &Path, cwd: &Path, log: &Path) -> Child {
    let mut cmd = Command::new(helpers::bin());
    cmd.args(args).current_dir(cwd);
    for (k, _) in std::env::vars() {
        if k.starts_with("TENANT_WORKER__") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(db.env())
        .env("TENANT_WORKER__EXPORTS__DIR", exports)
        .env("TENANT_WORKER__WORKER__MISSED_HEARTBEATS", "3")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    cmd.spawn().expect("start tenant-worker")
}

#[tokio::test]
async fn an_export_killed_mid_stream_completes_once_after_restart() {
    let db = TestDb::new().await;
    let exports = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let (app, admin, queue_pool) = (db.scope().await, db.admin().await, db.queue().await);
    seed_properties(&app, a, 300_000).await;
    seed_properties(&app, b, 1_000).await;
    let truth = truth_ids(&admin, a, "property", None).await;
    assert_eq!(truth.len(), 300_000);

    let job = enqueue_export(
        &db.enqueuer().await,
        a,
        json!({"source": "v_property", "format": "csv"}),
    )
    .await;
    let folder = exports.path().join(a.to_string()).join("v_property");
    let file = export_path(exports.path(), a, "v_property", job, Format::Csv, false);

    // Kill the worker while the file is being written.
    let log = cwd.path().join("first.log");
    let mut child = spawn_binary(&db, &["run"], exports.path(), cwd.path(), &log);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut caught = None;
    while Instant::now() < deadline {
        if let Some(t) = temp_files_in(&folder).into_iter().next()
            && std::fs::metadata(&t).map(|m| m.len() > 0).unwrap_or(false)
        {
            caught = Some(t);
            break;
        }
        if file.exists() || child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let temp = caught.unwrap_or_else(|| {
        panic!(
            "never saw a partial file (final file exists: {}); log:\n{}",
            file.exists(),
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    assert!(!file.exists(), "a half-written file has its final name");
    assert!(!manifest_path(&file).exists());
    assert!(
        temp.exists(),
        "the killed worker's partial file is still there"
    );
    assert!(
        runs_of(&admin, job).await.is_empty(),
        "a run record without a file"
    );
    assert_eq!(job_info(&queue_pool, job).await.state, "running");

    // Restart until the orphaned job has been re-enqueued and run (bounded).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut restarts = 0;
    loop {
        restarts += 1;
        let log = cwd.path().join(format!("restart-{restarts}.log"));
        let mut child = spawn_binary(
            &db,
            &["run", "--until-idle"],
            exports.path(),
            cwd.path(),
            &log,
        );
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                break None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let state = job_info(&queue_pool, job).await.state;
        if state == "done" {
            assert!(
                status.is_some_and(|s| s.success()),
                "{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "job still {state} after {restarts} restarts; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    let runs = runs_of(&admin, job).await;
    assert_eq!(runs.len(), 1, "exactly one run record");
    let m = read_manifest(&file);
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(m.sha256, sha256_hex(&bytes));
    assert_eq!(m.bytes, bytes.len() as u64);
    assert_eq!(m.rows, truth.len() as u64);
    let recorded: Manifest = serde_json::from_value(runs[0].1.clone().unwrap()).unwrap();
    assert_eq!(recorded, m);
    let (_, records) = csv_records(std::str::from_utf8(&bytes).unwrap());
    assert_eq!(records.len(), truth.len());
    let ids: BTreeSet<Uuid> = records
        .iter()
        .map(|r| {
            assert_eq!(r["tenant_id"], a.to_string());
            uuid_of(&r["id"])
        })
        .collect();
    assert_eq!(ids, truth);
    assert!(
        temp_files_in(&folder).is_empty(),
        "temp files left: {:?}",
        temp_files_in(&folder)
    );
    assert_eq!(files_under(&folder), [file.clone(), manifest_path(&file)]);
}
