//! The verified tenant context: SQL inside a scoped transaction cannot reach another tenant by
//! changing the context, and a job cannot publish what it did by ending its transaction itself.
//! Everything runs as the locked-down app role.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{Executor as _, PgPool};
use tenant_worker::jobs::declared::{self, Catalog};
use tenant_worker::queue::JobState;
use tenant_worker::{JobContext, JobError, JobId, Registry, ScopedTx, TenantId, TenantJob, jobs};

use crate::helpers::{TestDb, job_info, seed_towers};

/// Counts in a scoped transaction for A of (A's rows, B's rows) after `attack` ran.
async fn seen_after(tx: &mut ScopedTx, a: TenantId, b: TenantId) -> (i64, i64) {
    sqlx::query_as(
        "select count(*) filter (where tenant_id = $1), count(*) filter (where tenant_id = $2)
         from records",
    )
    .bind(a)
    .bind(b)
    .fetch_one(tx.conn().await.unwrap())
    .await
    .unwrap()
}

/// A pool of one app-role connection, so successive transactions share a session.
async fn pool_of_one(db: &TestDb) -> PgPool {
    tenant_worker::db::pool("app", &db.urls.app, 1, Duration::from_secs(5))
        .await
        .unwrap()
}

#[tokio::test]
async fn sql_that_forges_the_context_inside_a_scoped_transaction_sees_nothing_of_the_other_tenant()
{
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("A").await, db.tenant("B").await);
    let scope = db.scope().await;
    seed_towers(&scope, a, 3).await;
    seed_towers(&scope, b, 5).await;
    let key = db.context_key().await;

    let mut tx = scope.begin(a).await.unwrap();
    assert_eq!(
        seen_after(&mut tx, a, b).await,
        (3, 0),
        "the honest context"
    );
    tx.rollback().await.unwrap();

    let forged_mac = format!("v1.{}.{b}.9999999999.1-1.{}", key.id(), "0".repeat(64));
    let attacks: Vec<(&str, String)> = vec![
        (
            "set_config",
            format!("select set_config('app.tenant_id', '{b}', true)"),
        ),
        ("set local", format!("set local app.tenant_id = '{b}'")),
        ("reset", "reset app.tenant_id".into()),
        ("reset all", "reset all".into()),
        (
            "forged seal",
            format!(
                "select set_config('app.tenant_id', '{b}', true), set_config('app.tenant_ctx', '{forged_mac}', true)"
            ),
        ),
        (
            "a function that runs SQL text",
            format!(
                "create function pg_temp.sneak() returns bigint language plpgsql as $f$
                 declare n bigint;
                 begin
                     execute 'select set_config(''app.tenant_id'', ''{b}'', true)';
                     select count(*) into n from records where tenant_id = '{b}';
                     if n > 0 then raise exception 'saw % rows of B', n; end if;
                     return n;
                 end $f$;
                 select pg_temp.sneak()"
            ),
        ),
    ];
    for (case, attack) in attacks {
        let mut tx = scope.begin(a).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(attack))
            .execute(tx.conn().await.unwrap())
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(seen_after(&mut tx, a, b).await, (0, 0), "{case}");
        assert!(
            tx.check_context().await.is_err(),
            "{case}: the change is noticed"
        );
        tx.rollback().await.unwrap();
    }

    // A context sealed for B in an *earlier* transaction on the same connection, replayed.
    let one = db.scope_of(pool_of_one(&db).await).await;
    let mut tx = one.begin(b).await.unwrap();
    let stolen: String = sqlx::query_scalar("select current_setting('app.tenant_ctx')")
        .fetch_one(tx.conn().await.unwrap())
        .await
        .unwrap();
    assert_eq!(seen_after(&mut tx, b, a).await, (5, 0));
    tx.rollback().await.unwrap();
    let mut tx = one.begin(a).await.unwrap();
    sqlx::query(
        "select set_config('app.tenant_id', $1, true), set_config('app.tenant_ctx', $2, true)",
    )
    .bind(b.to_string())
    .bind(&stolen)
    .execute(tx.conn().await.unwrap())
    .await
    .unwrap();
    assert_eq!(
        seen_after(&mut tx, a, b).await,
        (0, 0),
        "a replayed context"
    );
    tx.rollback().await.unwrap();

    // A correctly sealed context for this very transaction, but expired.
    let mut tx = scope.begin(a).await.unwrap();
    key.enter(
        tx.conn().await.unwrap(),
        a,
        chrono::Utc::now().timestamp() - 1,
    )
    .await
    .unwrap();
    assert_eq!(
        seen_after(&mut tx, a, b).await,
        (0, 0),
        "an expired context"
    );
    tx.rollback().await.unwrap();

    // A plain connection of the app role with only `app.tenant_id` set sees nothing.
    let mut conn = db.app().await.acquire().await.unwrap();
    conn.execute(sqlx::AssertSqlSafe(format!(
        "select set_config('app.tenant_id', '{a}', false)"
    )))
    .await
    .unwrap();
    let n: i64 = sqlx::query_scalar("select count(*) from records")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(n, 0, "app.tenant_id alone grants nothing");
    conn.close_on_drop();

    // The functions that run SQL text are not the app role's to call.
    let mut tx = scope.begin(a).await.unwrap();
    let err = sqlx::query("select query_to_xml('select count(*) from records', true, false, '')")
        .execute(tx.conn().await.unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");
    drop(tx);
}

#[tokio::test]
async fn a_setting_left_on_the_session_is_reset_and_a_prepared_statement_closes_the_connection() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("A").await, db.tenant("B").await);
    let one = db.scope_of(pool_of_one(&db).await).await;
    let mut tx = one.begin(a).await.unwrap();
    // Session-wide: B as the tenant, and a custom setting of the job's own (a place to leave
    // data for its next run on this connection).
    sqlx::query("select set_config('app.tenant_id', $1, false), set_config('x.loot', 'A', false)")
        .bind(b.to_string())
        .execute(tx.conn().await.unwrap())
        .await
        .unwrap();
    // Set A back transaction-locally: after COMMIT the session values would remain.
    sqlx::query("select set_config('app.tenant_id', $1, true)")
        .bind(a.to_string())
        .execute(tx.conn().await.unwrap())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut conn = one.pool().acquire().await.unwrap();
    let (tenant, loot): (Option<String>, Option<String>) = sqlx::query_as(
        "select current_setting('app.tenant_id', true), current_setting('x.loot', true)",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(
        tenant.as_deref().unwrap_or(""),
        "",
        "no tenant on the session"
    );
    assert_eq!(
        loot.as_deref().unwrap_or(""),
        "",
        "no setting of the job's left"
    );
    drop(conn);

    // A statement prepared with SQL (it could stand in for one of sqlx's by name).
    let mut tx = one.begin(a).await.unwrap();
    let pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(tx.conn().await.unwrap())
        .await
        .unwrap();
    sqlx::raw_sql("prepare sneaky as select count(*) from records")
        .execute(tx.conn().await.unwrap())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut conn = one.pool().acquire().await.unwrap();
    let (next_pid, prepared): (i32, i64) = sqlx::query_as(
        "select pg_backend_pid(), (select count(*) from pg_prepared_statements where from_sql)",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_ne!(next_pid, pid, "the connection was closed, not returned");
    assert_eq!(prepared, 0);
}

/// What the hostile jobs saw of B, by attack.
static SAW: Mutex<Vec<(String, i64)>> = Mutex::new(Vec::new());

/// A job whose SQL attacks its own transaction after writing a marker record.
struct Hostile {
    other: TenantId,
}

#[derive(Serialize, Deserialize)]
struct HostileArgs {
    attack: String,
    /// Whether to share a round (then two harmless jobs of the tenant share it).
    round: bool,
}

impl TenantJob for Hostile {
    const KIND: &'static str = "hostile";
    type Args = HostileArgs;
    type Output = serde_json::Value;

    fn shares_rounds(&self, args: &HostileArgs) -> bool {
        args.round
    }

    fn max_attempts(&self) -> Option<u32> {
        Some(1)
    }

    async fn run(
        &self,
        tx: &mut ScopedTx,
        ctx: &JobContext,
        args: HostileArgs,
    ) -> Result<serde_json::Value, JobError> {
        let b = self.other;
        sqlx::query("insert into records (tenant_id, kind, data) values ($1, 'property', $2)")
            .bind(ctx.tenant_id())
            .bind(json!({"name": format!("marker {}", args.attack)}))
            .execute(tx.conn().await?)
            .await?;
        let conn = tx.conn().await?;
        match args.attack.as_str() {
            "sqlx begin and commit" => {
                use sqlx::Connection as _;
                let inner = conn.begin().await?;
                inner.commit().await?;
            }
            "rollback, then B on the session" => {
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "rollback; select set_config('app.tenant_id', '{b}', false);
                     insert into records (tenant_id, kind, data)
                     values ('{b}', 'property', '{{\"name\": \"planted\"}}')"
                )))
                .execute(&mut *conn)
                .await
                .map_err(|e| JobError::fail(e.to_string()))?;
            }
            sql => {
                let sql = sql.replace("<B>", &b.to_string());
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| JobError::fail(e.to_string()))?;
            }
        }
        let seen: i64 = sqlx::query_scalar("select count(*) from records where tenant_id = $1")
            .bind(b)
            .fetch_one(tx.conn().await?)
            .await
            .map_err(|e| JobError::fail(e.to_string()))?;
        SAW.lock().unwrap().push((args.attack.clone(), seen));
        Ok(json!({ "saw_of_b": seen }))
    }
}

#[tokio::test]
async fn a_users_job_whose_sql_tampers_with_its_transaction_publishes_nothing() {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("A").await, db.tenant("B").await);
    let scope = db.scope().await;
    seed_towers(&scope, b, 5).await;
    let mut registry = jobs::builtins(&db.settings, Arc::new(Catalog::new()));
    registry.register(Hostile { other: b }).unwrap();
    let registry = Arc::new(registry);
    let enqueuer = db.enqueuer_for(registry.clone()).await;
    let attacks = [
        "select set_config('app.tenant_id', '<B>', true)",
        "set local app.tenant_id = '<B>'",
        "reset app.tenant_id",
        "commit",
        "commit and chain",
        "sqlx begin and commit",
        "rollback, then B on the session",
        "set role tw_owner",
        "set constraints all immediate",
    ];
    let mut hostile = Vec::new();
    let mut harmless = Vec::new();
    for round in [false, true] {
        for attack in attacks {
            let args = HostileArgs {
                attack: attack.into(),
                round,
            };
            hostile.push((
                attack,
                round,
                enqueuer.enqueue::<Hostile>(a, &args).await.unwrap().id,
            ));
            if round {
                harmless.push(db.enqueue(a, "noop", json!({"count": true})).await);
            }
        }
    }
    let worker = db.worker_for(&registry).await;
    tokio::time::timeout(Duration::from_secs(120), worker.run_until_idle())
        .await
        .unwrap()
        .unwrap();
    let admin = db.admin().await;
    let queue_pool = db.queue().await;
    for (attack, round, job) in &hostile {
        let info = job_info(&queue_pool, *job).await;
        assert_ne!(
            info.state,
            JobState::Done,
            "{attack} (round {round}): {info:?}"
        );
        assert!(
            runs_of(&admin, *job).await.is_empty(),
            "{attack}: a run record"
        );
    }
    for job in &harmless {
        assert_eq!(job_info(&queue_pool, *job).await.state, JobState::Done);
    }
    let markers: i64 =
        sqlx::query_scalar("select count(*) from records where data ->> 'name' like 'marker%'")
            .fetch_one(&admin)
            .await
            .unwrap();
    assert_eq!(markers, 0, "nothing a hostile job wrote was published");
    let planted: i64 =
        sqlx::query_scalar("select count(*) from records where data ->> 'name' = 'planted'")
            .fetch_one(&admin)
            .await
            .unwrap();
    assert_eq!(planted, 0, "nothing was written for B");
    for (attack, seen) in SAW.lock().unwrap().iter() {
        assert_eq!(*seen, 0, "{attack}: the job saw B's rows");
    }
}

async fn runs_of(admin: &PgPool, job: JobId) -> Vec<TenantId> {
    sqlx::query_scalar("select tenant_id from job_runs where job_id = $1")
        .bind(job)
        .fetch_all(admin)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_declared_export_that_hides_a_tenant_switch_in_sql_text_exports_nothing_of_the_other_tenant()
 {
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("A").await, db.tenant("B").await);
    let scope = db.scope().await;
    seed_towers(&scope, a, 2).await;
    seed_towers(&scope, b, 4).await;
    let exports = tempfile::tempdir().unwrap();
    let mut db = db;
    db.settings.exports.dir = exports.path().to_path_buf();
    // The attack seen on the landed main: the switch inside a string run by a function passes
    // the loader's check (its words are a string), reads B, and sets A back.
    let smuggle = format!(
        "select name from v_property, xmltable('/row' passing query_to_xml(
             'select set_config(''app.tenant_id'', ''{b}'', true) as x', true, false, '')
             columns x text) t"
    );
    let mut catalog = Catalog::new();
    for (name, sql) in [
        ("smuggle_query_to_xml", smuggle.clone()),
        (
            "smuggle_cursor",
            format!(
                "select query_to_xml_and_xmlschema('select * from records where tenant_id = ''{b}''', true, false, '')::text as leak"
            ),
        ),
    ] {
        let text = format!(
            "name = \"{name}\"\nkind = \"export\"\nformat = \"csv\"\nsql = \"\"\"{sql}\"\"\"\n"
        );
        let job = declared::parse_declared(std::path::Path::new(name), &text)
            .expect("the loader's check passes the SQL text");
        catalog.insert(job);
    }
    let registry: Registry = jobs::builtins(&db.settings, Arc::new(catalog.clone()));
    let enqueuer = db.enqueuer_for(Arc::new(registry.clone())).await;
    let mut ids = Vec::new();
    for source in ["smuggle_query_to_xml", "smuggle_cursor"] {
        let job = tenant_worker::NewJob::new("export", json!({"source": source}));
        ids.push(enqueuer.enqueue_job(a, job).await.unwrap().id);
    }
    let worker = db.worker_for(&registry).await;
    tokio::time::timeout(Duration::from_secs(60), worker.run_until_idle())
        .await
        .unwrap()
        .unwrap();
    let queue_pool = db.queue().await;
    for id in ids {
        let info = job_info(&queue_pool, id).await;
        assert_ne!(info.state, JobState::Done, "{info:?}");
        assert!(
            info.error()
                .unwrap_or_default()
                .contains("permission denied"),
            "{info:?}"
        );
    }
    // Whatever was written, none of it holds B's rows.
    for file in walk(exports.path()) {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        assert!(!text.contains(&b.to_string()), "{} holds B", file.display());
        assert!(!text.contains("Tower"), "{} holds rows", file.display());
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn a_rotated_context_key_keeps_verifying_for_its_grace_then_stops() {
    let db = TestDb::new().await;
    let a = db.tenant("A").await;
    let old_scope = db.scope().await;
    seed_towers(&old_scope, a, 2).await;
    let old = old_scope.key().id();

    let out = db.cli(&["keys", "rotate-context", "--grace-secs", "300"]);
    assert!(out.status.success(), "{}", crate::helpers::stderr(&out));
    let new = db.context_key().await.id();
    assert_ne!(new, old, "{}", crate::helpers::stdout(&out));
    assert!(
        crate::helpers::stdout(&out).contains(&format!("context key {new} is in force")),
        "{}",
        crate::helpers::stdout(&out)
    );

    // Within the grace both keys seal contexts that verify.
    let new_scope = db.scope().await;
    assert_eq!(new_scope.key().id(), new);
    for (what, scope) in [("old key", &old_scope), ("new key", &new_scope)] {
        let mut tx = scope.begin(a).await.unwrap();
        let n: i64 = sqlx::query_scalar("select count(*) from records")
            .fetch_one(tx.conn().await.unwrap())
            .await
            .unwrap();
        assert_eq!(n, 2, "{what} within the grace");
        tx.rollback().await.unwrap();
    }

    // Once the grace is over, contexts sealed with the old key grant nothing.
    db.admin()
        .await
        .execute(sqlx::AssertSqlSafe(format!(
            "update public.tenant_context_keys set valid_until = now() where id = {old}"
        )))
        .await
        .unwrap();
    let mut tx = old_scope.begin(a).await.unwrap();
    let n: i64 = sqlx::query_scalar("select count(*) from records")
        .fetch_one(tx.conn().await.unwrap())
        .await
        .unwrap();
    assert_eq!(n, 0, "a retired key's context verifies nothing");
    tx.rollback().await.unwrap();
    let mut tx = new_scope.begin(a).await.unwrap();
    let n: i64 = sqlx::query_scalar("select count(*) from records")
        .fetch_one(tx.conn().await.unwrap())
        .await
        .unwrap();
    assert_eq!(n, 2, "the new key's context");
    tx.rollback().await.unwrap();

    // Too short a grace is refused before anything changes.
    let out = db.cli(&["keys", "rotate-context", "--grace-secs", "10"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        crate::helpers::stderr(&out).contains("too short"),
        "{}",
        crate::helpers::stderr(&out)
    );
    assert_eq!(db.context_key().await.id(), new);
}

#[tokio::test]
async fn a_temporary_table_left_by_one_tenant_never_receives_the_next_tenants_rows() {
    // A temporary table comes first in name resolution: `pg_temp.records`, left on a pooled
    // connection by A's SQL, would take B's unqualified `insert into records` for A to read.
    let db = TestDb::new().await;
    let (a, b) = (db.tenant("A").await, db.tenant("B").await);
    let one = db.scope_of(pool_of_one(&db).await).await;
    let mut tx = one.begin(a).await.unwrap();
    let pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(tx.conn().await.unwrap())
        .await
        .unwrap();
    sqlx::raw_sql("create temp table records (like public.records including defaults)")
        .execute(tx.conn().await.unwrap())
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let mut tx = one.begin(b).await.unwrap();
    let (next_pid, shadow): (i32, Option<String>) =
        sqlx::query_as("select pg_backend_pid(), to_regclass('pg_temp.records')::text")
            .fetch_one(tx.conn().await.unwrap())
            .await
            .unwrap();
    assert_ne!(
        next_pid, pid,
        "the connection with A's temporary table was closed"
    );
    assert_eq!(shadow, None, "no temporary `records` in B's session");
    sqlx::query(
        "insert into records (tenant_id, kind, data) values ($1, 'property', '{\"name\": \"B\"}')",
    )
    .bind(b)
    .execute(tx.conn().await.unwrap())
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let in_table: i64 =
        sqlx::query_scalar("select count(*) from public.records where tenant_id = $1")
            .bind(b)
            .fetch_one(&db.admin().await)
            .await
            .unwrap();
    assert_eq!(in_table, 1, "B's row went to the real table");
}
