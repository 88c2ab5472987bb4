//! The data layer's guarantees, proven at the database as the locked-down app role.

use serde_json::json;
use sqlx::{Executor, PgPool};
use tenant_worker::TenantId;
use tenant_worker::{Scope, ScopedTx};
use uuid::Uuid;

use crate::helpers::{self, TestDb, stderr, stdout};

const VIEWS: &[&str] = &["v_property", "v_customer", "v_invoice"];

/// Deliberately colliding data: both tenants get the same names, emails and invoice numbers.
/// Returns the number of records written.
async fn seed(app: &Scope, tenant: TenantId, extra: usize) -> i64 {
    let mut tx = app.begin(tenant).await.unwrap();
    let customer = Uuid::new_v4();
    sqlx::query("insert into records (tenant_id, id, kind, data) values ($1, $2, 'customer', $3)")
        .bind(tenant)
        .bind(customer)
        .bind(json!({"name": "Acme", "email": "ops@acme.test"}))
        .execute(tx.conn().await.unwrap())
        .await
        .unwrap();
    for i in 0..(2 + extra) {
        sqlx::query("insert into records (tenant_id, kind, data) values ($1, 'property', $2)")
            .bind(tenant)
            .bind(json!({"name": format!("Tower {i}"), "address": "1 Main St", "city": "Springfield", "units": 10 + i}))
            .execute(tx.conn().await.unwrap())
            .await
            .unwrap();
    }
    sqlx::query("insert into records (tenant_id, kind, data) values ($1, 'invoice', $2)")
        .bind(tenant)
        .bind(
            json!({"customer_id": customer, "number": "INV-1", "amount": 100.5, "currency": "EUR",
                     "status": "open", "issued_on": "2026-01-01", "due_on": "2026-02-01"}),
        )
        .execute(tx.conn().await.unwrap())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    (1 + 2 + extra + 1) as i64
}

async fn count(tx: &mut ScopedTx, relation: &str) -> (i64, i64) {
    // (rows visible, rows of any other tenant visible)
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select count(*), count(*) filter (where tenant_id <> $1) from {relation}"
    )))
    .bind(tx.tenant_id())
    .fetch_one(tx.conn().await.unwrap())
    .await
    .unwrap()
}

#[tokio::test]
async fn each_tenant_sees_exactly_its_rows_through_table_and_views() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("Northwind").await, db.tenant("Helios").await);
    let app = db.scope().await;
    let n_a = seed(&app, a, 3).await;
    let n_b = seed(&app, b, 0).await;
    assert_ne!(
        n_a, n_b,
        "different sizes make a leak visible in the counts"
    );

    // Ground truth, read as the superuser (which bypasses RLS).
    let admin = db.admin().await;
    let truth: Vec<(Uuid, i64)> =
        sqlx::query_as("select tenant_id, count(*) from records group by 1")
            .fetch_all(&admin)
            .await
            .unwrap();
    assert_eq!(truth.len(), 2);

    for (tenant, expected) in [(a, n_a), (b, n_b)] {
        let mut tx = db.scoped(&app, tenant).await;
        assert_eq!(count(&mut tx, "records").await, (expected, 0));
        for view in VIEWS {
            let (rows, foreign) = count(&mut tx, view).await;
            assert_eq!(foreign, 0, "{view} leaked another tenant's rows");
            assert!(rows > 0, "{view} shows nothing for its own tenant");
        }
        let props: i64 = sqlx::query_scalar("select count(*) from v_property")
            .fetch_one(tx.conn().await.unwrap())
            .await
            .unwrap();
        assert_eq!(props, expected - 2);
        tx.rollback().await.unwrap();
    }

    // No tenant context: nothing, through the table and through every view.
    let mut conn = app.pool().acquire().await.unwrap();
    for rel in [
        "records",
        "v_property",
        "v_customer",
        "v_invoice",
        "job_runs",
        "tenants",
    ] {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select count(*) from {rel}")))
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(n, 0, "{rel} visible without a tenant context");
    }
}

#[tokio::test]
async fn with_check_refuses_writing_for_another_tenant() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("A").await, db.tenant("B").await);
    let app = db.scope().await;
    seed(&app, b, 0).await;

    let mut tx = db.scoped(&app, a).await;
    let err =
        sqlx::query("insert into records (tenant_id, kind, data) values ($1, 'property', '{}')")
            .bind(b)
            .execute(tx.conn().await.unwrap())
            .await
            .unwrap_err();
    assert!(err.to_string().contains("row-level security"), "{err}");
    tx.rollback().await.unwrap();

    seed(&app, a, 0).await;
    let mut tx = db.scoped(&app, a).await;
    let err = sqlx::query("update records set tenant_id = $1")
        .bind(b)
        .execute(tx.conn().await.unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("row-level security"), "{err}");
    tx.rollback().await.unwrap();

    // Updates and deletes of B's rows from A's context touch nothing.
    let mut tx = db.scoped(&app, a).await;
    let n = sqlx::query("delete from records where tenant_id = $1")
        .bind(b)
        .execute(tx.conn().await.unwrap())
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(n, 0);
    tx.commit().await.unwrap();
    let admin = db.admin().await;
    let left: i64 = sqlx::query_scalar("select count(*) from records where tenant_id = $1")
        .bind(b)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(left, 4);
}

#[tokio::test]
async fn views_owned_by_the_owner_still_filter_because_rls_is_forced() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("A").await, db.tenant("B").await);
    let app = db.scope().await;
    seed(&app, a, 1).await;
    seed(&app, b, 5).await;
    let admin = db.admin().await;
    for view in VIEWS {
        let owner: String = sqlx::query_scalar(
            "select pg_get_userbyid(relowner)::text from pg_class where oid = $1::regclass",
        )
        .bind(view)
        .fetch_one(&admin)
        .await
        .unwrap();
        assert_eq!(owner, db.settings.roles.owner);
    }
    // The gotcha itself: the same view definition over a copy WITHOUT force, queried as the
    // owner, shows every tenant. With FORCE (the real table) the owner sees one tenant.
    let mut conn = admin.acquire().await.unwrap();
    conn.execute(sqlx::AssertSqlSafe(format!(
        r#"create table records_noforce (like records including all);
           insert into records_noforce select tenant_id, id, kind, data, external_id, created_at, updated_at from records;
           alter table records_noforce owner to "{o}";
           alter table records_noforce enable row level security;
           create policy p on records_noforce using (tenant_id = current_tenant_id());
           create view v_property_noforce as select * from records_noforce where kind = 'property';
           alter view v_property_noforce owner to "{o}";"#,
        o = db.settings.roles.owner
    )))
    .await
    .unwrap();
    conn.execute(sqlx::AssertSqlSafe(format!(
        r#"set role "{}""#,
        db.settings.roles.owner
    )))
    .await
    .unwrap();
    // A's context, sealed for this transaction as the worker seals it.
    conn.execute("begin").await.unwrap();
    db.context_key()
        .await
        .enter(&mut conn, a, chrono::Utc::now().timestamp() + 60)
        .await
        .unwrap();
    let leaky: i64 = sqlx::query_scalar("select count(*) from v_property_noforce")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let safe: i64 = sqlx::query_scalar("select count(*) from v_property")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    conn.execute("rollback").await.unwrap();
    assert_eq!(
        leaky,
        3 + 7,
        "without FORCE the owner's view shows both tenants"
    );
    assert_eq!(safe, 3, "with FORCE the owner's view shows one tenant");
}

/// The catalog check: every table with a tenant_id column has ENABLE, FORCE and a restrictive
/// policy on the tenant context, so a future migration cannot forget it.
#[tokio::test]
async fn every_tenant_table_has_rls_enabled_forced_and_a_restrictive_policy() {
    let db = TestDb::new().await;
    let admin = db.admin().await;
    let rows: Vec<(String, bool, bool, i64)> = sqlx::query_as(
        r#"select c.relname::text, c.relrowsecurity, c.relforcerowsecurity,
                  (select count(*) from pg_policy p where p.polrelid = c.oid and not p.polpermissive
                     and pg_get_expr(p.polqual, p.polrelid) like '%current_tenant_id()%'
                     and pg_get_expr(p.polwithcheck, p.polrelid) like '%current_tenant_id()%')
           from pg_class c join pg_namespace n on n.oid = c.relnamespace
           join pg_attribute a on a.attrelid = c.oid and a.attname = 'tenant_id'
           where c.relkind in ('r', 'p') and n.nspname = 'public'"#,
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(rows.len() >= 2, "records and job_runs at least: {rows:?}");
    for (table, enabled, forced, policies) in &rows {
        assert!(*enabled, "{table}: RLS not enabled");
        assert!(*forced, "{table}: RLS not forced");
        assert!(*policies >= 1, "{table}: no restrictive tenant policy");
    }
    // And the audit catches a table that forgot: the same check the worker runs at start.
    admin
        .execute("create table forgot (tenant_id uuid, x int)")
        .await
        .unwrap();
    let checks = tenant_worker::db::audit::run(&admin, &db.settings.roles)
        .await
        .unwrap();
    let failed: Vec<_> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.name.clone())
        .collect();
    assert!(
        failed
            .iter()
            .any(|n| n.contains("public.forgot: row level security enabled")),
        "{failed:?}"
    );
    assert!(
        failed
            .iter()
            .any(|n| n.contains("public.forgot: row level security forced")),
        "{failed:?}"
    );
    assert!(
        failed
            .iter()
            .any(|n| n.contains("public.forgot: restrictive tenant policy")),
        "{failed:?}"
    );
}

#[tokio::test]
async fn a_later_permissive_policy_cannot_widen_tenant_access() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("A").await, db.tenant("B").await);
    let app = db.scope().await;
    seed(&app, a, 0).await;
    seed(&app, b, 0).await;
    let admin = db.admin().await;
    admin
        .execute("create policy everything_is_public on records as permissive for all to public using (true) with check (true)")
        .await
        .unwrap();
    let mut tx = db.scoped(&app, a).await;
    assert_eq!(count(&mut tx, "records").await, (4, 0));
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn a_pooled_connection_carries_no_tenant_from_one_transaction_to_the_next() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("A").await, db.tenant("B").await);
    let app = db.scope().await;
    seed(&app, a, 2).await;
    seed(&app, b, 0).await;
    // One connection only: B's transaction reuses A's connection.
    let one = db
        .scope_of(
            tenant_worker::db::pool("app", &db.urls.app, 1, std::time::Duration::from_secs(5))
                .await
                .unwrap(),
        )
        .await;
    let pid_a: i32;
    {
        let mut tx = db.scoped(&one, a).await;
        pid_a = sqlx::query_scalar("select pg_backend_pid()")
            .fetch_one(tx.conn().await.unwrap())
            .await
            .unwrap();
        assert_eq!(count(&mut tx, "records").await, (6, 0));
        tx.commit().await.unwrap();
    }
    {
        let mut conn = one.pool().acquire().await.unwrap();
        let pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(pid, pid_a, "same physical connection");
        let setting: Option<String> =
            sqlx::query_scalar("select current_setting('app.tenant_id', true)")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
        assert_eq!(
            setting.as_deref(),
            Some(""),
            "the local setting ended with the transaction"
        );
        let n: i64 = sqlx::query_scalar("select count(*) from records")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(n, 0);
    }
    let mut tx = db.scoped(&one, b).await;
    assert_eq!(count(&mut tx, "records").await, (4, 0));
    tx.rollback().await.unwrap();
}

/// What the next user of a one-connection pool finds: the tenant setting, the records it
/// sees, and whether the connection is still inside an earlier transaction (then `now()`, the
/// transaction's start, lags behind the statement's own timestamp).
async fn next_user_sees(one: &PgPool) -> (Option<String>, i64, bool) {
    let mut conn = one.acquire().await.unwrap();
    let setting: Option<String> =
        sqlx::query_scalar("select current_setting('app.tenant_id', true)")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    let n: i64 = sqlx::query_scalar("select count(*) from records")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    // One simple-query message (the extended protocol's Parse and Execute get different
    // timestamps even outside a transaction).
    let row = sqlx::raw_sql("select now() <> statement_timestamp() as in_old_tx")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let in_old_tx: bool = sqlx::Row::get(&row, "in_old_tx");
    (setting.filter(|s| !s.is_empty()), n, in_old_tx)
}

/// A scoped transaction that ends any other way than commit or rollback (an error, a job cut
/// off by its timeout or shutdown mid-statement, a cancelled BEGIN) must never hand its tenant
/// to the next user of the pooled connection. `ScopedTx` closes such a connection instead of
/// returning it; the app pool has no release check of its own.
#[tokio::test]
async fn a_scoped_transaction_ended_early_never_leaves_its_tenant_on_a_pooled_connection() {
    let db = TestDb::new().await;
    let a = db.tenant("A").await;
    let app = db.scope().await;
    seed(&app, a, 1).await;
    let one = db
        .scope_of(
            tenant_worker::db::pool("app", &db.urls.app, 1, std::time::Duration::from_secs(5))
                .await
                .unwrap(),
        )
        .await;
    let clean = (None, 0, false);

    // Dropped after a query, without commit or rollback.
    {
        let mut tx = db.scoped(&one, a).await;
        assert_eq!(count(&mut tx, "records").await.0, 5);
    }
    assert_eq!(
        next_user_sees(one.pool()).await,
        clean,
        "dropped transaction"
    );

    // The job's statement is cut off mid-flight (a timeout drops its future).
    let mut tx = db.scoped(&one, a).await;
    let cut = tokio::time::timeout(
        std::time::Duration::from_millis(50),
        sqlx::query("select pg_sleep(2)").execute(tx.conn().await.unwrap()),
    )
    .await;
    assert!(cut.is_err(), "the statement was cut off");
    drop(tx);
    assert_eq!(next_user_sees(one.pool()).await, clean, "statement cut off");

    // BEGIN itself cancelled at every point from before sending to after the reply.
    let mut began = 0;
    for micros in (0..3000).step_by(25) {
        let r = tokio::time::timeout(std::time::Duration::from_micros(micros), one.begin(a)).await;
        if let Ok(tx) = r {
            began += 1;
            drop(tx.unwrap());
        }
        assert_eq!(
            next_user_sees(one.pool()).await,
            clean,
            "BEGIN cancelled after {micros} µs"
        );
    }
    assert!(
        began > 0,
        "some BEGINs completed, so the sweep crossed the reply"
    );
}

#[tokio::test]
async fn the_policy_fails_closed_when_unset_ended_or_garbage() {
    let db = TestDb::new().await;
    let a = db.tenant("A").await;
    let app = db.scope().await;
    seed(&app, a, 0).await;
    let mut conn = app.pool().acquire().await.unwrap();
    // 1. Never set in this session.
    let mut fresh = tenant_worker::db::connect("app", &db.urls.app)
        .await
        .unwrap();
    let never: Option<String> = sqlx::query_scalar("select current_setting('app.tenant_id', true)")
        .fetch_one(&mut fresh)
        .await
        .unwrap();
    assert_eq!(never, None);
    let n: i64 = sqlx::query_scalar("select count(*) from records")
        .fetch_one(&mut fresh)
        .await
        .unwrap();
    assert_eq!(n, 0);
    // 2. Set in an earlier transaction that ended: reads back as ''.
    conn.execute(sqlx::AssertSqlSafe(format!(
        "begin; select set_config('app.tenant_id', '{a}', true); commit;"
    )))
    .await
    .unwrap();
    let n: i64 = sqlx::query_scalar("select count(*) from v_property")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(n, 0);
    // 3. Garbage: the query errors rather than showing anything.
    conn.execute("begin").await.unwrap();
    conn.execute("select set_config('app.tenant_id', '1 or true', true)")
        .await
        .unwrap();
    let garbage = sqlx::query_scalar::<_, i64>("select count(*) from records")
        .fetch_one(&mut *conn)
        .await;
    conn.execute("rollback").await.unwrap();
    assert!(
        garbage.is_err(),
        "garbage tenant id must error, got {garbage:?}"
    );
    assert!(
        garbage
            .unwrap_err()
            .to_string()
            .contains("invalid input syntax for type uuid")
    );
}

#[tokio::test]
async fn customer_email_is_unique_per_tenant_case_insensitively() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("A").await, db.tenant("B").await);
    let app = db.scope().await;
    let insert = |t: TenantId, email: &'static str| {
        let app = app.clone();
        async move {
            let mut tx = app.begin(t).await.unwrap();
            let r = sqlx::query(
                "insert into records (tenant_id, kind, data) values ($1, 'customer', $2)",
            )
            .bind(t)
            .bind(json!({"name": "x", "email": email}))
            .execute(tx.conn().await.unwrap())
            .await;
            match r {
                Ok(_) => tx.commit().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    insert(b, "Same@Example.test").await.unwrap();
    // The same email in B never blocks A.
    insert(a, "same@example.test").await.unwrap();
    let err = insert(a, "SAME@example.TEST").await.unwrap_err();
    assert!(err.contains("customer_email_unique_per_tenant"), "{err}");
    // The rejection mentions only A's own data.
    assert!(
        err.contains(&a.to_string()) || !err.contains(&b.to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn invoice_must_reference_a_customer_of_the_same_tenant() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("A").await, db.tenant("B").await);
    let app = db.scope().await;
    let customer_of = |t: TenantId| {
        let app = app.clone();
        async move {
            let mut tx = app.begin(t).await.unwrap();
            let id: Uuid = sqlx::query_scalar(
                "insert into records (tenant_id, kind, data) values ($1, 'customer', '{\"name\":\"c\"}') returning id",
            )
            .bind(t)
            .fetch_one(tx.conn().await.unwrap())
            .await
            .unwrap();
            tx.commit().await.unwrap();
            id
        }
    };
    let (ca, cb) = (customer_of(a).await, customer_of(b).await);
    let invoice = |customer: Uuid| {
        let app = app.clone();
        async move {
            let mut tx = app.begin(a).await.unwrap();
            let r = sqlx::query(
                "insert into records (tenant_id, kind, data) values ($1, 'invoice', $2)",
            )
            .bind(a)
            .bind(json!({"customer_id": customer, "number": "1", "amount": 1}))
            .execute(tx.conn().await.unwrap())
            .await;
            let _ = tx.commit().await;
            r.map(|_| ()).map_err(|e| {
                let db = e.as_database_error().unwrap();
                (
                    db.constraint().map(str::to_string),
                    db.message().to_string(),
                )
            })
        }
    };
    invoice(ca).await.unwrap();
    let dangling = invoice(Uuid::new_v4()).await.unwrap_err();
    let cross = invoice(cb).await.unwrap_err();
    assert_eq!(dangling.0.as_deref(), Some("invoice_customer_must_exist"));
    // A reference to B's customer fails exactly like a reference to a random id.
    assert_eq!(cross.0, dangling.0);
    assert_eq!(cross.1, dangling.1);
    // An invoice pointing at a non-customer record of A fails the same way.
    let mut tx = db.scoped(&app, a).await;
    let prop: Uuid = sqlx::query_scalar(
        "insert into records (tenant_id, kind, data) values ($1, 'property', '{}') returning id",
    )
    .bind(a)
    .fetch_one(tx.conn().await.unwrap())
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(invoice(prop).await.unwrap_err().0, dangling.0);
    // Deleting a referenced customer is refused, naming the rule.
    let mut tx = db.scoped(&app, a).await;
    let err = sqlx::query("delete from records where id = $1")
        .bind(ca)
        .execute(tx.conn().await.unwrap())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("invoice_customer_must_exist"),
        "{err}"
    );
}

/// Every foreign key's referencing columns lead an index. PostgreSQL checks the referencing
/// side on every delete (and key change) of a referenced row; without such an index that check
/// is a sequential scan of the whole table, every tenant's rows included (the invoice ->
/// customer key once made deleting one record cost 351 ms at 2,000,000 rows).
#[tokio::test]
async fn every_foreign_key_is_backed_by_an_index_on_its_referencing_columns() {
    let db = TestDb::new().await;
    let admin = db.admin().await;
    let keys: Vec<(String, String, bool)> = sqlx::query_as(
        r#"select c.conrelid::regclass::text, c.conname::text,
                  exists (select 1 from pg_index i
                          where i.indrelid = c.conrelid
                            and (i.indkey::int2[])[0:cardinality(c.conkey) - 1] @> c.conkey
                            and (i.indkey::int2[])[0:cardinality(c.conkey) - 1] <@ c.conkey)
           from pg_constraint c join pg_namespace n on n.oid = c.connamespace
           where c.contype = 'f' and n.nspname = 'public'"#,
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(
        keys.iter().any(|k| k.1 == "invoice_customer_must_exist"),
        "{keys:?}"
    );
    let unindexed: Vec<_> = keys.iter().filter(|k| !k.2).collect();
    assert!(
        unindexed.is_empty(),
        "foreign keys without an index: {unindexed:?}"
    );
}

#[tokio::test]
async fn setup_is_idempotent_and_the_app_role_is_least_privileged() {
    let db = TestDb::empty().await;
    tenant_worker::db::setup(&db.settings, &db.urls)
        .await
        .unwrap();
    let admin = db.admin().await;
    let snapshot = |admin: PgPool| async move {
        let q: Vec<(String,)> = sqlx::query_as(
            "select format('%s %s %s', version, success, checksum) from _sqlx_migrations order by version",
        )
        .fetch_all(&admin)
        .await
        .unwrap();
        let a: i64 = sqlx::query_scalar("select count(*) from apalis._sqlx_migrations")
            .fetch_one(&admin)
            .await
            .unwrap();
        let p: i64 = sqlx::query_scalar("select count(*) from pg_policy")
            .fetch_one(&admin)
            .await
            .unwrap();
        (q, a, p)
    };
    let before = snapshot(admin.clone()).await;
    tenant_worker::db::setup(&db.settings, &db.urls)
        .await
        .unwrap();
    assert_eq!(before, snapshot(admin.clone()).await);
    assert!(
        before.1 > 0,
        "apalis migrations ran in their own history table"
    );

    let app = &db.settings.roles.app;
    let (sup, bypass): (bool, bool) =
        sqlx::query_as("select rolsuper, rolbypassrls from pg_roles where rolname = $1")
            .bind(app)
            .fetch_one(&admin)
            .await
            .unwrap();
    assert!(!sup && !bypass);
    let owned: i64 = sqlx::query_scalar("select count(*) from pg_class where relowner = (select oid from pg_roles where rolname = $1)")
        .bind(app)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(owned, 0, "the app role owns nothing");
    for privilege in ["truncate", "references", "trigger"] {
        let has: bool = sqlx::query_scalar("select has_table_privilege($1, 'public.records', $2)")
            .bind(app)
            .bind(privilege)
            .fetch_one(&admin)
            .await
            .unwrap();
        assert!(!has, "app role must not have {privilege}");
    }
    let queue_reads: bool =
        sqlx::query_scalar("select has_table_privilege($1, 'public.records', 'select')")
            .bind(&db.settings.roles.queue)
            .fetch_one(&admin)
            .await
            .unwrap();
    assert!(!queue_reads, "the queue role cannot read tenant data");
}

#[tokio::test]
async fn tenant_cli_adds_lists_suspends_and_activates() {
    let db = TestDb::new().await;
    let out = db.cli(&["tenant", "add", "--name", "Northwind Properties"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    Uuid::parse_str(&id).expect("prints the new id");
    let out = db.cli(&["tenant", "list"]);
    assert!(stdout(&out).contains(&id) && stdout(&out).contains("Northwind Properties"));
    let out = db.cli(&["tenant", "suspend", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&db.cli(&["tenant", "list"])).contains("suspended"));
    let out = db.cli(&["tenant", "activate", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = db.cli(&["tenant", "suspend", &Uuid::new_v4().to_string()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no tenant with id"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn unreachable_database_gives_a_clear_error_without_the_password() {
    let env = vec![(
        "TENANT_WORKER__DATABASE__ADMIN_URL".to_string(),
        "postgres://admin:sup3rs3cret@127.0.0.1:1/nowhere".to_string(),
    )];
    let out = helpers::cli_with_env(&["tenant", "list"], &env);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("cannot connect to the admin database"),
        "{err}"
    );
    assert!(err.contains("127.0.0.1:1"), "{err}");
    assert!(!err.contains("sup3rs3cret"), "password leaked: {err}");
}

#[tokio::test]
async fn setup_with_an_admin_lacking_createrole_says_so() {
    let db = TestDb::new().await;
    let admin = db.admin().await;
    let weak = format!("tw_weak_{}", &db.name[8..]);
    admin
        .execute(sqlx::AssertSqlSafe(format!("create role {weak} login")))
        .await
        .unwrap();
    let url = tenant_worker::config::derive_url(&db.admin_url(), &weak, None);
    let env = vec![("TENANT_WORKER__DATABASE__ADMIN_URL".to_string(), url)];
    let out = helpers::cli_with_env(&["setup"], &env);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("CREATEROLE"), "{}", stderr(&out));
    admin
        .execute(sqlx::AssertSqlSafe(format!("drop role {weak}")))
        .await
        .unwrap();
}

#[tokio::test]
async fn invalid_configuration_names_the_key() {
    let cases: &[(&str, &str, &str)] = &[
        ("TENANT_WORKER__WORKER__CONCURRENCY", "lots", "concurrency"),
        (
            "TENANT_WORKER__WORKER__CONCURRENCY",
            "0",
            "worker.concurrency",
        ),
        (
            "TENANT_WORKER__ROLES__APP",
            "Robert'); drop table",
            "roles.app",
        ),
        (
            "TENANT_WORKER__DATABASE__ADMIN_URL",
            "mysql://x:pw@h/db",
            "database.admin_url",
        ),
    ];
    for (key, value, expected) in cases {
        let out =
            helpers::cli_with_env(&["tenant", "list"], &[(key.to_string(), value.to_string())]);
        assert!(!out.status.success(), "{key}={value} accepted");
        let err = stderr(&out);
        assert!(err.contains(expected), "{key}={value}: {err}");
        assert!(!err.contains("pw@"), "{err}");
    }
    // A config file with a wrong type.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[worker]\nmax_attempts = \"five\"\n").unwrap();
    let out = helpers::cli_with_env(&["--config", file.to_str().unwrap(), "tenant", "list"], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("max_attempts"), "{}", stderr(&out));
    // A missing explicit config file.
    let out = helpers::cli_with_env(
        &["--config", "/nonexistent/worker.toml", "tenant", "list"],
        &[],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("worker.toml"), "{}", stderr(&out));
}

#[tokio::test]
async fn setup_restores_the_posture_it_made_and_says_what_it_repaired() {
    // `setup` used to leave FORCE off (and the rest) for the user to fix by hand.
    let db = TestDb::new().await;
    let admin = db.admin().await;
    let app = &db.settings.roles.app;
    for statement in [
        "alter table public.records no force row level security".to_string(),
        "alter table public.job_runs disable row level security".to_string(),
        format!("grant truncate on public.records to {app}"),
        format!("grant select on public.tenant_context_keys to {app}"),
        format!("grant create on schema public to {app}"),
        "alter function public.tenant_context_valid() immutable".to_string(),
    ] {
        admin.execute(sqlx::AssertSqlSafe(statement)).await.unwrap();
    }
    let failed = |checks: Vec<tenant_worker::db::audit::Check>| {
        checks
            .into_iter()
            .filter(|c| !c.ok)
            .map(|c| c.name)
            .collect::<Vec<_>>()
    };
    let before = failed(
        tenant_worker::db::audit::run(&admin, &db.settings.roles)
            .await
            .unwrap(),
    );
    assert_eq!(before.len(), 6, "{before:?}");

    let out = db.cli(&["setup"]);
    assert!(out.status.success(), "{}", crate::helpers::stderr(&out));
    let printed = crate::helpers::stdout(&out);
    for check in &before {
        assert!(
            printed.contains(&format!("repaired: {check}")),
            "{check}: {printed}"
        );
    }
    let after = failed(
        tenant_worker::db::audit::run(&admin, &db.settings.roles)
            .await
            .unwrap(),
    );
    assert_eq!(after, Vec::<String>::new());
    // And again: nothing left to repair.
    let out = db.cli(&["setup"]);
    assert!(
        !crate::helpers::stdout(&out).contains("repaired"),
        "{}",
        crate::helpers::stdout(&out)
    );
}
