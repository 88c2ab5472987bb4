//! `tenant-worker audit`: checks the security posture the isolation guarantee rests on.
//! `run` performs the same audit at start and refuses to run when it fails.
//!
//! Every check reads the catalogs; each failure names the problem and the statement that fixes
//! it.

use sqlx::PgPool;

use crate::config::RoleSettings;

/// Errors running the audit (not audit failures, which are [`Check`]s).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Database error.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One audit check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Passed?
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// How to fix it (empty when ok).
    pub fix: String,
}

impl Check {
    fn pass(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok: true,
            detail: detail.into(),
            fix: String::new(),
        }
    }

    fn fail(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok: false,
            detail: detail.into(),
            fix: fix.into(),
        }
    }
}

/// The tables that hold tenant data: every ordinary table outside the system schemas with a
/// `tenant_id` column.
const TENANT_TABLES: &str = r#"
    select c.oid, n.nspname::text as schema, c.relname::text as name,
           c.relrowsecurity, c.relforcerowsecurity, pg_get_userbyid(c.relowner)::text as owner
    from pg_class c
    join pg_namespace n on n.oid = c.relnamespace
    join pg_attribute a on a.attrelid = c.oid and a.attname = 'tenant_id' and not a.attisdropped
    where c.relkind in ('r', 'p')
      and n.nspname not in ('pg_catalog', 'information_schema')
      and n.nspname not like 'pg_toast%'
    order by 2, 3"#;

/// Runs every check, as the admin connection, about the configured roles.
///
/// # Errors
/// Database errors only; problems found are failed [`Check`]s.
pub async fn run(admin: &PgPool, roles: &RoleSettings) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    role_checks(admin, roles, &mut checks).await?;
    table_checks(admin, roles, &mut checks).await?;
    view_checks(admin, &mut checks).await?;
    setting_checks(admin, &mut checks).await?;
    Ok(checks)
}

async fn role_checks(admin: &PgPool, roles: &RoleSettings, checks: &mut Vec<Check>) -> Result<()> {
    for (purpose, role) in [
        ("app", &roles.app),
        ("queue", &roles.queue),
        ("scheduler", &roles.scheduler),
        ("owner", &roles.owner),
    ] {
        let row: Option<(bool, bool)> =
            sqlx::query_as("select rolsuper, rolbypassrls from pg_roles where rolname = $1")
                .bind(role)
                .fetch_optional(admin)
                .await?;
        let Some((superuser, bypass)) = row else {
            checks.push(Check::fail(
                format!("{purpose} role `{role}` exists"),
                "role is missing",
                "run `tenant-worker setup`",
            ));
            continue;
        };
        checks.push(if superuser {
            Check::fail(
                format!("{purpose} role `{role}` is not superuser"),
                "superusers bypass RLS even with FORCE ROW LEVEL SECURITY",
                format!("alter role {role} nosuperuser"),
            )
        } else {
            Check::pass(
                format!("{purpose} role `{role}` is not superuser"),
                "nosuperuser",
            )
        });
        checks.push(if bypass {
            Check::fail(
                format!("{purpose} role `{role}` has no BYPASSRLS"),
                "BYPASSRLS skips every policy",
                format!("alter role {role} nobypassrls"),
            )
        } else {
            Check::pass(
                format!("{purpose} role `{role}` has no BYPASSRLS"),
                "nobypassrls",
            )
        });
    }
    Ok(())
}

async fn table_checks(admin: &PgPool, roles: &RoleSettings, checks: &mut Vec<Check>) -> Result<()> {
    let tables: Vec<(
        sqlx::postgres::types::Oid,
        String,
        String,
        bool,
        bool,
        String,
    )> = sqlx::query_as(TENANT_TABLES).fetch_all(admin).await?;
    if tables.is_empty() {
        checks.push(Check::fail(
            "tenant tables exist",
            "no table with a tenant_id column was found",
            "run `tenant-worker setup`",
        ));
    }
    for (oid, schema, name, enabled, forced, owner) in tables {
        let t = format!("{schema}.{name}");
        checks.push(if enabled {
            Check::pass(format!("{t}: row level security enabled"), "enabled")
        } else {
            Check::fail(
                format!("{t}: row level security enabled"),
                "RLS is off: every role with SELECT sees every tenant",
                format!("alter table {t} enable row level security"),
            )
        });
        checks.push(if forced {
            Check::pass(format!("{t}: row level security forced"), "forced")
        } else {
            Check::fail(
                format!("{t}: row level security forced"),
                "not forced: the owner (and every view it owns) bypasses the policy",
                format!("alter table {t} force row level security"),
            )
        });
        let restrictive: i64 = sqlx::query_scalar(
            "select count(*) from pg_policy
             where polrelid = $1 and not polpermissive
               and (pg_get_expr(polqual, polrelid) like '%current_tenant_id()%'
                    or pg_get_expr(polqual, polrelid) like '%app.tenant_id%')
               and (polcmd = '*')",
        )
        .bind(oid)
        .fetch_one(admin)
        .await?;
        checks.push(if restrictive > 0 {
            Check::pass(format!("{t}: restrictive tenant policy"), "present")
        } else {
            Check::fail(
                format!("{t}: restrictive tenant policy"),
                "no restrictive policy on app.tenant_id for all commands",
                format!(
                    "create policy tenant_isolation on {t} as restrictive for all to public \
                     using (tenant_id = public.current_tenant_id()) \
                     with check (tenant_id = public.current_tenant_id())"
                ),
            )
        });
        checks.push(if owner == roles.app {
            Check::fail(
                format!("{t}: not owned by the app role"),
                format!("owned by `{owner}`: the app role can alter or disable its policies"),
                format!("alter table {t} owner to {}", roles.owner),
            )
        } else {
            Check::pass(
                format!("{t}: not owned by the app role"),
                format!("owner `{owner}`"),
            )
        });
        let (queue_reads, app_extra): (bool, bool) = sqlx::query_as(
            "select has_table_privilege($2, $1, 'select'),
                    has_table_privilege($3, $1, 'truncate') or has_table_privilege($3, $1, 'references')
                      or has_table_privilege($3, $1, 'trigger')",
        )
        .bind(oid)
        .bind(&roles.queue)
        .bind(&roles.app)
        .fetch_one(admin)
        .await?;
        checks.push(if queue_reads {
            Check::fail(
                format!("{t}: queue role cannot read it"),
                format!("`{}` has SELECT on tenant data", roles.queue),
                format!("revoke all on {t} from {}", roles.queue),
            )
        } else {
            Check::pass(format!("{t}: queue role cannot read it"), "no select")
        });
        checks.push(if app_extra {
            Check::fail(
                format!("{t}: app role has only DML"),
                "app role has TRUNCATE, REFERENCES or TRIGGER (TRUNCATE ignores RLS)",
                format!(
                    "revoke truncate, references, trigger on {t} from {}",
                    roles.app
                ),
            )
        } else {
            Check::pass(
                format!("{t}: app role has only DML"),
                "select/insert/update/delete at most",
            )
        });
    }
    Ok(())
}

async fn view_checks(admin: &PgPool, checks: &mut Vec<Check>) -> Result<()> {
    // Views that read a tenant table, with their owner's bypass powers. A security_invoker
    // view runs as the caller and is safe whoever owns it.
    let views: Vec<(String, String, bool, bool, bool)> = sqlx::query_as(
        r#"select distinct v.oid::regclass::text, pg_get_userbyid(v.relowner)::text,
                  r.rolsuper, r.rolbypassrls,
                  coalesce(v.reloptions::text[] && array['security_invoker=true', 'security_invoker=on'], false)
           from pg_class v
           join pg_rewrite rw on rw.ev_class = v.oid
           join pg_depend d on d.objid = rw.oid and d.classid = 'pg_rewrite'::regclass
           join pg_class t on t.oid = d.refobjid
           join pg_attribute a on a.attrelid = t.oid and a.attname = 'tenant_id' and not a.attisdropped
           join pg_roles r on r.oid = v.relowner
           where v.relkind in ('v', 'm') and t.relkind in ('r', 'p') and t.oid <> v.oid
           order by 1"#,
    )
    .fetch_all(admin)
    .await?;
    for (view, owner, superuser, bypass, invoker) in views {
        let name = format!("view {view}: owner is subject to RLS");
        checks.push(if (superuser || bypass) && !invoker {
            Check::fail(
                name,
                format!("owned by `{owner}`, which bypasses RLS: the view shows every tenant"),
                format!("alter view {view} owner to <a role without superuser/BYPASSRLS>, or alter view {view} set (security_invoker = true)"),
            )
        } else {
            Check::pass(name, format!("owner `{owner}`"))
        });
    }
    Ok(())
}

async fn setting_checks(admin: &PgPool, checks: &mut Vec<Check>) -> Result<()> {
    let defaults: Vec<(String, String)> = sqlx::query_as(
        r#"select coalesce(r.rolname::text, 'all roles') || ' in ' || coalesce(d.datname::text, 'all databases'),
                  s
           from pg_db_role_setting rs
           left join pg_roles r on r.oid = rs.setrole
           left join pg_database d on d.oid = rs.setdatabase
           cross join lateral unnest(rs.setconfig) as s
           where s like 'app.tenant_id=%'"#,
    )
    .fetch_all(admin)
    .await?;
    if defaults.is_empty() {
        checks.push(Check::pass(
            "app.tenant_id has no role or database default",
            "none",
        ));
    }
    for (scope, setting) in defaults {
        checks.push(Check::fail(
            "app.tenant_id has no role or database default",
            format!("`{setting}` is set for {scope}: a session that forgets to set a tenant gets this one"),
            "alter role <role> reset app.tenant_id / alter database <db> reset app.tenant_id",
        ));
    }
    Ok(())
}

/// Number of failed checks.
pub fn failures(checks: &[Check]) -> usize {
    checks.iter().filter(|c| !c.ok).count()
}
