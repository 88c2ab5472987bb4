//! Declared jobs: TOML files in the `jobs/` folder that name a job, its kind and one SQL
//! statement. Their SQL only ever runs inside the worker's tenant-scoped transaction as the app
//! role, so a query that forgets `where tenant_id = ...` still sees one tenant.
//!
//! At load, SQL is parsed (PostgreSQL dialect) and refused unless it is exactly one statement of
//! the expected sort that never touches the tenant context: no `SET`/`RESET`/`DISCARD`, no
//! `set_config(...)`, no locking clauses, no data-modifying CTEs in a read-only job. What runs is
//! the parsed statement printed back, so what was checked is exactly what executes.
//!
//! ```toml
//! name = "properties_by_city"
//! kind = "export"
//! description = "Properties and units per city"
//! format = "csv"
//! sql = "select city, count(*) as properties, sum(units) as units from v_property group by city"
//! ```
//!
//! A declared job has no schedule of its own: schedules are per tenant (`tenant-worker schedule
//! add --tenant ID --cron EXPR export --source properties_by_city`). A `[schedule]` block is
//! refused with that advice (it used to be accepted and never fired).

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sqlparser::ast::{Statement, visit_statements};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

/// A declared job that failed to load.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct LoadError {
    /// The file.
    pub file: PathBuf,
    /// Why it was refused.
    pub reason: String,
}

/// Kinds a declared job may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeclaredKind {
    /// A named export: one read-only SELECT.
    Export,
    /// A rollup: one read-only SELECT returning `bucket`, `dims`, `value`.
    Rollup,
    /// A processing step: one INSERT, UPDATE or DELETE.
    Process,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    name: String,
    kind: DeclaredKind,
    #[serde(default)]
    description: String,
    #[serde(default)]
    format: Option<String>,
    sql: String,
    /// Refused with advice; see the module docs.
    #[serde(default)]
    schedule: Option<serde::de::IgnoredAny>,
}

/// A validated declared job.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Declared {
    /// Unique name (`^[a-z][a-z0-9_]{0,62}$`).
    pub name: String,
    /// Kind.
    pub kind: DeclaredKind,
    /// Free text.
    pub description: String,
    /// Default output format for exports (`csv` or `jsonl`).
    pub format: Option<String>,
    /// The checked statement, printed back from its parse tree.
    pub sql: String,
    /// Where it came from.
    pub file: PathBuf,
}

/// All declared jobs, by name.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    jobs: BTreeMap<String, Declared>,
}

/// True for names safe to use as identifiers and path components.
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl Catalog {
    /// An empty catalog.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads every `*.toml` in `dir`. A missing directory is an empty catalog unless
    /// `required`.
    ///
    /// # Errors
    /// The first file that does not validate, naming the file and the reason.
    pub fn load(dir: &Path, required: bool) -> Result<Self, LoadError> {
        let mut catalog = Self::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(catalog),
            Err(e) => {
                return Err(LoadError {
                    file: dir.to_owned(),
                    reason: format!("cannot read the declared jobs folder: {e}"),
                });
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|e| LoadError {
                file: file.clone(),
                reason: e.to_string(),
            })?;
            let job = parse_declared(&file, &text)?;
            if catalog.jobs.contains_key(&job.name) {
                return Err(LoadError {
                    file,
                    reason: format!("a declared job named `{}` already exists", job.name),
                });
            }
            catalog.jobs.insert(job.name.clone(), job);
        }
        Ok(catalog)
    }

    /// Adds a job (tests and embedding applications).
    pub fn insert(&mut self, job: Declared) {
        self.jobs.insert(job.name.clone(), job);
    }

    /// A declared job by name.
    pub fn get(&self, name: &str) -> Option<&Declared> {
        self.jobs.get(name)
    }

    /// All declared jobs.
    pub fn iter(&self) -> impl Iterator<Item = &Declared> {
        self.jobs.values()
    }
}

/// Parses and validates one declared job file's text.
///
/// # Errors
/// [`LoadError`] naming `file` and the reason.
pub fn parse_declared(file: &Path, text: &str) -> Result<Declared, LoadError> {
    let err = |reason: String| LoadError {
        file: file.to_owned(),
        reason,
    };
    let raw: File = toml_from_str(text).map_err(err)?;
    if !is_valid_name(&raw.name) {
        return Err(err(format!(
            "name `{}` must match ^[a-z][a-z0-9_]{{0,62}}$",
            raw.name.chars().take(80).collect::<String>()
        )));
    }
    if let Some(f) = &raw.format
        && f != "csv"
        && f != "jsonl"
    {
        return Err(err(format!("format `{f}` must be csv or jsonl")));
    }
    let sql = match raw.kind {
        DeclaredKind::Export | DeclaredKind::Rollup => {
            check_read_only_query(&raw.sql).map_err(err)?
        }
        DeclaredKind::Process => check_data_statement(&raw.sql).map_err(err)?,
    };
    if raw.schedule.is_some() {
        return Err(err(format!(
            "a declared job has no `[schedule]`: schedules are per tenant; remove the block and \
             run `tenant-worker schedule add --tenant ID --cron EXPR {} ...` for each tenant",
            match raw.kind {
                DeclaredKind::Export => format!("export --source {}", raw.name),
                DeclaredKind::Rollup => format!("rollup --name {}", raw.name),
                DeclaredKind::Process => format!("process --name {}", raw.name),
            }
        )));
    }
    Ok(Declared {
        name: raw.name,
        kind: raw.kind,
        description: raw.description,
        format: raw.format,
        sql,
        file: file.to_owned(),
    })
}

fn toml_from_str(text: &str) -> Result<File, String> {
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize::<File>())
        .map_err(|e| e.to_string())
}

/// Functions a declared statement may not call: they change the tenant context or session
/// state, or reach outside the database.
const FORBIDDEN_FUNCTIONS: &[&str] = &[
    "set_config",
    "pg_advisory_lock",
    "pg_advisory_xact_lock",
    "pg_try_advisory_lock",
    "dblink",
    "dblink_exec",
    "lo_import",
    "lo_export",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_notify",
    "pg_sleep",
];

/// Parses `sql` (PostgreSQL dialect) and requires exactly one statement.
fn parse_one(sql: &str) -> Result<Statement, String> {
    let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, sql)
        .map_err(|e| format!("SQL does not parse: {e}"))?;
    if statements.len() != 1 {
        return Err(format!(
            "SQL must be exactly one statement, found {}",
            statements.len()
        ));
    }
    Ok(statements.remove(0))
}

/// Checks that `sql` is exactly one read-only SELECT that never touches the tenant context and
/// returns it printed back from its parse tree.
///
/// # Errors
/// A human-readable reason.
pub fn check_read_only_query(sql: &str) -> Result<String, String> {
    let statement = parse_one(sql)?;
    let statement = &statement;
    let Statement::Query(query) = statement else {
        return Err(format!(
            "SQL must be a read-only SELECT, found: {}",
            first_words(&statement.to_string())
        ));
    };
    if !query.locks.is_empty() {
        return Err("SQL must not lock rows (FOR UPDATE/SHARE)".into());
    }
    // Nested statements (data-modifying CTEs) are visited as statements too.
    if let ControlFlow::Break(found) = visit_statements(statement, |s| match s {
        Statement::Query(_) => ControlFlow::Continue(()),
        other => ControlFlow::Break(first_words(&other.to_string())),
    }) {
        return Err(format!("SQL must only read, but it contains: {found}"));
    }
    check_functions(statement)?;
    Ok(statement.to_string())
}

/// Checks that `sql` is exactly one INSERT, UPDATE or DELETE (a processing step) that never
/// touches the tenant context, and returns it printed back from its parse tree.
///
/// # Errors
/// A human-readable reason.
pub fn check_data_statement(sql: &str) -> Result<String, String> {
    let statement = parse_one(sql)?;
    let statement = &statement;
    if !matches!(
        statement,
        Statement::Insert(_) | Statement::Update { .. } | Statement::Delete(_)
    ) {
        return Err(format!(
            "SQL must be one INSERT, UPDATE or DELETE, found: {}",
            first_words(&statement.to_string())
        ));
    }
    if let ControlFlow::Break(found) = visit_statements(statement, |s| match s {
        Statement::Query(_)
        | Statement::Insert(_)
        | Statement::Update { .. }
        | Statement::Delete(_) => ControlFlow::Continue(()),
        other => ControlFlow::Break(first_words(&other.to_string())),
    }) {
        return Err(format!(
            "SQL contains a statement that is not data: {found}"
        ));
    }
    check_functions(statement)?;
    Ok(statement.to_string())
}

/// Refuses [`FORBIDDEN_FUNCTIONS`] anywhere in the statement: as calls in expressions, as
/// table functions in FROM (`from set_config(...) s`), quoted or schema-qualified. Every word of
/// the statement as it will run (printed back from the parse tree) is checked, so no position
/// in the grammar is missed; a column that happens to share such a name is refused too, which
/// is the safe side.
fn check_functions(statement: &Statement) -> Result<(), String> {
    let printed = statement.to_string();
    let tokens = sqlparser::tokenizer::Tokenizer::new(&PostgreSqlDialect {}, &printed)
        .tokenize()
        .map_err(|e| format!("SQL does not tokenize: {e}"))?;
    let found = tokens.iter().find_map(|t| match t {
        sqlparser::tokenizer::Token::Word(w) => {
            let name = w.value.to_ascii_lowercase();
            FORBIDDEN_FUNCTIONS.contains(&name.as_str()).then_some(name)
        }
        _ => None,
    });
    match found {
        Some(name) if name == "set_config" => {
            Err("SQL must not change the tenant context or settings (set_config)".into())
        }
        Some(name) => Err(format!("SQL must not call {name}()")),
        None => Ok(()),
    }
}

fn first_words(s: &str) -> String {
    s.split_whitespace().take(4).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_one_select() {
        let sql =
            check_read_only_query("select city, count(*) from v_property group by city;").unwrap();
        assert!(sql.to_lowercase().starts_with("select"));
        check_read_only_query("with x as (select 1 as a) select a from x").unwrap();
    }

    #[test]
    fn refuses_what_must_not_run() {
        for (sql, expected) in [
            ("select 1; select 2", "exactly one statement"),
            ("v_property; drop table records", "does not parse"),
            (
                "select * from v_property; drop table records",
                "exactly one statement",
            ),
            ("set app.tenant_id = 'x'", "read-only SELECT"),
            ("reset app.tenant_id", "read-only SELECT"),
            ("discard all", "read-only SELECT"),
            (
                "select set_config('app.tenant_id', 'x', true)",
                "tenant context",
            ),
            (
                "select * from records where pg_catalog.set_config('app.tenant_id', 'x', true) is not null",
                "tenant context",
            ),
            ("delete from records", "read-only SELECT"),
            (
                "with d as (delete from records returning *) select * from d",
                "only read",
            ),
            ("select * from records for update", "lock"),
            ("select pg_sleep(10)", "pg_sleep"),
            (
                "select s from set_config('app.tenant_id', 'x', true) s",
                "tenant context",
            ),
            (
                "select * from lateral \"set_config\"('app.tenant_id', 'x', true)",
                "tenant context",
            ),
            (
                "select * from v_property, pg_catalog.pg_sleep(1)",
                "pg_sleep",
            ),
        ] {
            let err = check_read_only_query(sql).unwrap_err();
            assert!(err.contains(expected), "{sql}: {err}");
        }
    }
}
