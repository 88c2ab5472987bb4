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
    /// The statement `setup` runs to repair it, when the repair is unambiguous (flags,
    /// ownership and privileges of the objects `setup` made).
    #[serde(skip)]
    pub repair: Option<String>,
}

impl Check {
    fn pass(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok: true,
            detail: detail.into(),
            fix: String::new(),
            repair: None,
        }
    }

    fn fail(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok: false,
            detail: detail.into(),
            fix: fix.into(),
            repair: None,
        }
    }

    /// A failure whose fix is a statement `setup` may run as it is.
    fn repairable(name: impl Into<String>, detail: impl Into<String>, fix: String) -> Self {
        let mut check = Self::fail(name, detail, fix.clone());
        check.repair = Some(fix);
        check
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

/// The functions that run SQL given as text (so SQL can hide a statement in a string, where
/// no check of the statement sees it): what `setup` takes from PUBLIC and the audit
/// checks the app role cannot execute. The verified tenant context is what keeps
/// tenants apart even so; this is defence in depth.
pub(crate) const DYNAMIC_SQL_FUNCTIONS: &str = "
    select p.oid::regprocedure::text
    from pg_proc p join pg_namespace n on n.oid = p.pronamespace
    where (n.nspname = 'pg_catalog'
           and p.proname in ('query_to_xml', 'query_to_xml_and_xmlschema', 'query_to_xmlschema',
                             'cursor_to_xml', 'cursor_to_xmlschema', 'ts_stat'))
       or p.proname like 'dblink%'
    order by 1";

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
    context_checks(admin, roles, &mut checks).await?;
    key_checks(admin, &mut checks).await?;
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
            Check::repairable(
                format!("{t}: row level security enabled"),
                "RLS is off: every role with SELECT sees every tenant",
                format!("alter table {t} enable row level security"),
            )
        });
        checks.push(if forced {
            Check::pass(format!("{t}: row level security forced"), "forced")
        } else {
            Check::repairable(
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
            Check::repairable(
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
            Check::repairable(
                format!("{t}: queue role cannot read it"),
                format!("`{}` has SELECT on tenant data", roles.queue),
                format!("revoke all on {t} from {}", roles.queue),
            )
        } else {
            Check::pass(format!("{t}: queue role cannot read it"), "no select")
        });
        checks.push(if app_extra {
            Check::repairable(
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

/// The checks the verified tenant context rests on: every tenant policy requires it, only the
/// owner reads its keys, the verifier cannot be swapped or subverted, and the app role cannot
/// create objects or run the functions that execute SQL text.
async fn context_checks(
    admin: &PgPool,
    roles: &RoleSettings,
    checks: &mut Vec<Check>,
) -> Result<()> {
    // Restrictive tenant policies that do not require the sealed context.
    let unsealed: Vec<(String, String)> = sqlx::query_as(
        "select p.polrelid::regclass::text, p.polname::text from pg_policy p
         where not p.polpermissive
           and pg_get_expr(p.polqual, p.polrelid) like '%current_tenant_id()%'
           and pg_get_expr(p.polqual, p.polrelid) not like '%tenant_context_valid()%'
         order by 1, 2",
    )
    .fetch_all(admin)
    .await?;
    const SEALED: &str = "tenant policies require the sealed context";
    if unsealed.is_empty() {
        checks.push(Check::pass(
            SEALED,
            "every restrictive tenant policy calls tenant_context_valid()",
        ));
    }
    for (table, policy) in unsealed {
        checks.push(Check::fail(
            SEALED,
            format!("policy {policy} on {table} trusts app.tenant_id alone: SQL that sets it reads another tenant"),
            format!(
                "alter policy {policy} on {table} using (tenant_id = public.current_tenant_id() \
                 and (select public.tenant_context_valid()))"
            ),
        ));
    }

    // The verifier: owned by the owner, SECURITY DEFINER, a search_path of system schemas
    // only, and STABLE (IMMUTABLE would let a cached plan keep one transaction's verdict).
    const VERIFIER: &str = "public.tenant_context_valid()";
    let verifier: Option<(String, bool, String)> = sqlx::query_as(
        "select pg_get_userbyid(p.proowner)::text, p.prosecdef, p.provolatile::text
         from pg_proc p where p.oid = to_regprocedure('public.tenant_context_valid()')",
    )
    .fetch_optional(admin)
    .await?;
    match verifier {
        None => checks.push(Check::fail(
            format!("{VERIFIER} exists"),
            "the tenant context verifier is missing",
            "run `tenant-worker setup`",
        )),
        Some((owner, definer, volatility)) => {
            let name = format!("{VERIFIER}: owned by the owner role");
            checks.push(if owner == roles.owner {
                Check::pass(name, format!("owner `{owner}`"))
            } else {
                Check::repairable(
                    name,
                    format!("owned by `{owner}`: its owner can replace what it checks"),
                    format!("alter function {VERIFIER} owner to {}", roles.owner),
                )
            });
            let name = format!("{VERIFIER}: security definer");
            checks.push(if definer {
                Check::pass(name, "reads the keys as its owner")
            } else {
                Check::repairable(
                    name,
                    "SECURITY INVOKER: it runs as the caller, who must not be able to read the keys",
                    format!("alter function {VERIFIER} security definer"),
                )
            });
            let name = format!("{VERIFIER}: stable");
            checks.push(if volatility == "s" {
                Check::pass(name, "stable")
            } else {
                Check::repairable(
                    name,
                    format!(
                        "volatility `{volatility}`: immutable lets a plan keep a verdict, volatile \
                         costs a call per row"
                    ),
                    format!("alter function {VERIFIER} stable"),
                )
            });
        }
    }

    // Every SECURITY DEFINER function outside the system schemas pins its search_path (the
    // caller's, or `$user` first, would let objects the caller creates stand in for what it
    // uses; the check that no worker role may create in any schema covers the schemas named).
    let unpinned: Vec<String> = sqlx::query_scalar(
        r#"select p.oid::regprocedure::text from pg_proc p
           join pg_namespace n on n.oid = p.pronamespace
           where p.prosecdef and n.nspname not in ('pg_catalog', 'information_schema')
             and not exists (
                 select 1 from unnest(coalesce(p.proconfig, '{}')) c
                 where c like 'search_path=%' and c not like '%$user%')
           order by 1"#,
    )
    .fetch_all(admin)
    .await?;
    const PINNED: &str = "security definer functions pin their search_path";
    if unpinned.is_empty() {
        checks.push(Check::pass(PINNED, "search_path = pg_catalog, pg_temp"));
    }
    for f in unpinned {
        checks.push(Check::fail(
            PINNED,
            format!("{f} runs as its owner with a search_path the caller can influence"),
            format!("alter function {f} set search_path = pg_catalog, pg_temp"),
        ));
    }

    // Only the owner touches the keys; the guards are insert-only for the app role.
    for (purpose, role) in [
        ("app", &roles.app),
        ("queue", &roles.queue),
        ("scheduler", &roles.scheduler),
    ] {
        let name = format!("{purpose} role `{role}` cannot read the context keys");
        let reads: Option<bool> = sqlx::query_scalar(
            "select has_table_privilege($1, c.oid,
                    'select, insert, update, delete, truncate, references, trigger')
             from pg_class c where c.oid = to_regclass('public.tenant_context_keys')",
        )
        .bind(role)
        .fetch_optional(admin)
        .await?
        .flatten();
        checks.push(match reads {
            Some(false) => Check::pass(name, "no privilege"),
            Some(true) => Check::repairable(
                name,
                "it can read or change the key that seals tenant contexts: it can forge any tenant",
                format!("revoke all on public.tenant_context_keys from {role}, public"),
            ),
            None => Check::fail(
                name,
                "public.tenant_context_keys is missing",
                "run `tenant-worker setup`",
            ),
        });
    }
    let name = format!("app role `{}` can only insert scope guards", roles.app);
    let guards: Option<bool> = sqlx::query_scalar(
        "select has_table_privilege($1, c.oid, 'select, update, delete, truncate')
         from pg_class c where c.oid = to_regclass('public.scope_guards')",
    )
    .bind(&roles.app)
    .fetch_optional(admin)
    .await?
    .flatten();
    checks.push(match guards {
        Some(false) => Check::pass(name, "insert at most"),
        Some(true) => Check::repairable(
            name,
            "it can delete its transaction's guard: job SQL could commit by itself",
            format!(
                "revoke select, update, delete, truncate on public.scope_guards from {}, public",
                roles.app
            ),
        ),
        None => Check::fail(
            name,
            "public.scope_guards is missing",
            "run `tenant-worker setup`",
        ),
    });

    // No schema the app role may create objects in (a function or operator it creates could
    // stand in for one a policy or view uses).
    let creatable: Vec<String> = sqlx::query_scalar(
        "select n.nspname::text from pg_namespace n
         where has_schema_privilege($1, n.oid, 'create')
           and n.nspname not like 'pg\\_temp\\_%' and n.nspname not like 'pg\\_toast%'
         order by 1",
    )
    .bind(&roles.app)
    .fetch_all(admin)
    .await?;
    let name = format!("app role `{}` cannot create in any schema", roles.app);
    checks.push(if creatable.is_empty() {
        Check::pass(name, "no CREATE")
    } else {
        Check::repairable(
            name,
            format!("CREATE on {}", creatable.join(", ")),
            creatable
                .iter()
                .map(|s| format!("revoke create on schema {s} from {}, public", roles.app))
                .collect::<Vec<_>>()
                .join("; "),
        )
    });

    // Functions that run SQL given as text.
    let open: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select f from ({DYNAMIC_SQL_FUNCTIONS}) as d(f)
         where has_function_privilege($1, f::regprocedure, 'execute') order by 1"
    )))
    .bind(&roles.app)
    .fetch_all(admin)
    .await?;
    let name = format!(
        "app role `{}` cannot run SQL text through functions",
        roles.app
    );
    checks.push(if open.is_empty() {
        Check::pass(name, "query_to_xml and friends revoked")
    } else {
        Check::fail(
            name,
            format!("it can execute {}", open.join(", ")),
            "run `tenant-worker setup` as a superuser (it revokes EXECUTE on them from PUBLIC)",
        )
    });
    Ok(())
}

/// Keys on tenant tables: every primary, unique and foreign key (and unique index) leads with
/// `tenant_id`, so a duplicate-key or foreign-key error can never tell one tenant that a row
/// of another exists.
async fn key_checks(admin: &PgPool, checks: &mut Vec<Check>) -> Result<()> {
    let offending: Vec<(String, String)> = sqlx::query_as(
        r#"with t as (
               select c.oid, a.attnum from pg_class c
               join pg_namespace n on n.oid = c.relnamespace
               join pg_attribute a on a.attrelid = c.oid and a.attname = 'tenant_id'
                                  and not a.attisdropped
               where c.relkind in ('r', 'p')
                 and n.nspname not in ('pg_catalog', 'information_schema'))
           select k.conrelid::regclass::text, k.conname::text from pg_constraint k
           join t on t.oid = k.conrelid
           where k.contype in ('p', 'u', 'f', 'x') and k.conkey[1] <> t.attnum
           union
           select i.indrelid::regclass::text, ci.relname::text from pg_index i
           join t on t.oid = i.indrelid
           join pg_class ci on ci.oid = i.indexrelid
           where i.indisunique and i.indkey[0] <> t.attnum
           order by 1, 2"#,
    )
    .fetch_all(admin)
    .await?;
    const NAME: &str = "tenant table keys lead with tenant_id";
    if offending.is_empty() {
        checks.push(Check::pass(NAME, "every unique and foreign key"));
    }
    for (table, key) in offending {
        checks.push(Check::fail(
            NAME,
            format!(
                "{key} on {table} does not lead with tenant_id: its duplicate-key error tells \
                 one tenant that another tenant's row exists"
            ),
            format!("recreate {key} on {table} with tenant_id as its first column"),
        ));
    }
    Ok(())
}

/// Runs the audit and the repair statements of its failed [`Check`]s that have one (flags,
/// ownership and privileges that `setup` made and someone changed since). Returns the names
/// of the checks repaired; what needs a decision (a view owned by a superuser, a role
/// default) stays for `audit` to report.
///
/// # Errors
/// Database errors (a repair the admin role may not run, say).
pub async fn repair(admin: &PgPool, roles: &RoleSettings) -> Result<Vec<String>> {
    let mut repaired = Vec::new();
    for check in run(admin, roles).await? {
        if let (false, Some(sql)) = (check.ok, &check.repair) {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                .execute(admin)
                .await?;
            tracing::info!(check = %check.name, "repaired");
            repaired.push(check.name);
        }
    }
    Ok(repaired)
}

/// Number of failed checks.
pub fn failures(checks: &[Check]) -> usize {
    checks.iter().filter(|c| !c.ok).count()
}
