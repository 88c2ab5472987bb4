//! `import`: loads records for the job's tenant from a file in the tenant's inbox
//! (`<imports dir>/<tenant id>/...`) or from inline records.
//!
//! The tenant comes only from the envelope: a record that names another tenant is a row error
//! and is never written. The file is parsed (JSONL or CSV) on a blocking thread that sends
//! validated rows through a bounded channel; they are `COPY`ed into a temporary table inside the
//! scoped transaction, checked there set-wise against the database's rules (unique email per
//! tenant, invoice → customer of the same tenant; within the file too), and then written with
//! at most four statements. Memory stays flat whatever the file size.
//!
//! Modes: `all-or-nothing` (default) writes nothing when any row is invalid; `skip-invalid`
//! writes exactly the valid rows. Records with an `external_id` are upserted on it, so a second
//! import of the same file inserts 0 and updates 0. The result (inserted, updated, unchanged,
//! rejected, and the first rejections with line numbers and reasons) is the run record's.

use std::io::BufRead as _;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::TenantId;
use crate::job::{JobContext, JobError, TenantJob};
use crate::scope::ScopedTx;
use crate::sql::copy_escape;

/// How many rejections the result lists (all are counted).
pub const MAX_LISTED_ERRORS: usize = 20;
/// Longest accepted line / CSV record, in bytes.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Most inline records in one job.
pub const MAX_INLINE_RECORDS: usize = 1000;
const BATCH: usize = 5000;

/// Input format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportFormat {
    /// One JSON record per line.
    #[default]
    Jsonl,
    /// CSV with a header naming `kind`, `data` (JSON text) and optionally `external_id`,
    /// `id`, `tenant_id`.
    Csv,
}

/// What to do when some rows are invalid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Write nothing if any row is invalid.
    #[default]
    AllOrNothing,
    /// Write the valid rows, report the others.
    SkipInvalid,
}

/// The `import` kind: reads tenant inboxes under one folder.
#[derive(Debug, Clone)]
pub struct Import {
    dir: PathBuf,
}

impl Import {
    /// Reads a tenant's files from `<dir>/<tenant id>/` only.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }
}

/// Arguments of `import`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportArgs {
    /// A path inside the tenant's inbox (relative to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Inline records instead of a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<Vec<serde_json::Value>>,
    /// jsonl or csv; when absent, csv for a file named `*.csv`, else jsonl.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ImportFormat>,
    /// all-or-nothing (default) or skip-invalid.
    #[serde(default)]
    pub mode: Mode,
}

impl ImportArgs {
    /// The format the file is read in: the one given, else inferred from the file's name
    /// (`*.csv` is CSV; anything else, and inline records, JSONL).
    pub fn effective_format(&self) -> ImportFormat {
        self.format.unwrap_or_else(|| match &self.file {
            Some(f) if f.to_ascii_lowercase().ends_with(".csv") => ImportFormat::Csv,
            _ => ImportFormat::Jsonl,
        })
    }
}

/// One record of an import file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InRecord {
    kind: String,
    data: serde_json::Value,
    #[serde(default)]
    external_id: Option<String>,
    #[serde(default)]
    id: Option<Uuid>,
    #[serde(default)]
    tenant_id: Option<String>,
}

/// A validated row, ready for the temporary table.
#[derive(Debug)]
struct Row {
    line: u64,
    id: Option<Uuid>,
    kind: String,
    external_id: Option<String>,
    data: String,
}

/// A rejected row.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RowError {
    /// 1-based line (JSONL) or record (CSV, header = line 1) number; inline: index + 1.
    pub line: u64,
    /// Why.
    pub reason: String,
}

enum Item {
    Row(Row),
    Error(RowError),
}

/// The import's result.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImportResult {
    /// Mode used.
    pub mode: String,
    /// Whether anything was written (false: all-or-nothing refused the file).
    pub written: bool,
    /// New records.
    pub inserted: u64,
    /// Existing records (same external id) whose data changed.
    pub updated: u64,
    /// Existing records that already had this data.
    pub unchanged: u64,
    /// Invalid rows.
    pub rejected: u64,
    /// The first invalid rows.
    pub errors: Vec<RowError>,
}

impl TenantJob for Import {
    const KIND: &'static str = "import";
    type Args = ImportArgs;
    type Output = serde_json::Value;

    fn validate(&self, args: &ImportArgs) -> Result<(), String> {
        match (&args.file, &args.records) {
            (Some(f), None) => check_relative_path(f),
            (None, Some(r)) if r.len() > MAX_INLINE_RECORDS => Err(format!(
                "at most {MAX_INLINE_RECORDS} inline records; put larger imports in a file"
            )),
            (None, Some(r)) if r.is_empty() => Err("`records` is empty".into()),
            (None, Some(_)) => Ok(()),
            _ => Err("give exactly one of `file` or `records`".into()),
        }
    }

    async fn run(
        &self,
        tx: &mut ScopedTx,
        _ctx: &JobContext,
        args: ImportArgs,
    ) -> Result<serde_json::Value, JobError> {
        let tenant = tx.tenant_id();
        let (sender, receiver) = tokio::sync::mpsc::channel::<Item>(BATCH);
        let producer = match (&args.file, &args.records) {
            (Some(file), _) => {
                let path = resolve_in_inbox(&self.dir, tenant, file)?;
                let format = args.effective_format();
                tokio::task::spawn_blocking(move || read_file(&path, format, tenant, &sender))
            }
            (None, Some(records)) => {
                let records = records.clone();
                tokio::task::spawn_blocking(move || {
                    for (i, r) in records.into_iter().enumerate() {
                        let item = validate_value(i as u64 + 1, r, tenant);
                        if sender.blocking_send(item).is_err() {
                            break;
                        }
                    }
                    Ok(())
                })
            }
            (None, None) => return Err(JobError::Fail("nothing to import".into())),
        };
        sqlx::query(
            "create temp table import_rows (line bigint not null, id uuid, kind text not null,
                 external_id text, data jsonb not null, error text) on commit drop",
        )
        .execute(tx.conn().await?)
        .await?;
        let mut errors = Vec::new();
        let mut shape_errors = 0u64;
        let mut rows = 0u64;
        let load = load_rows(tx, receiver, &mut errors, &mut shape_errors, &mut rows).await;
        let produced = producer.await.map_err(|e| JobError::retry(e.to_string()))?;
        load?;
        produced?;
        if rows == 0 && shape_errors == 0 {
            return Err(JobError::Fail("the import contains no records".into()));
        }
        check_rules(tx).await?;
        let db_errors: Vec<(i64, String)> = sqlx::query_as(
            "select line, error from import_rows where error is not null order by line limit $1",
        )
        .bind(MAX_LISTED_ERRORS as i64)
        .fetch_all(tx.conn().await?)
        .await?;
        let db_error_count: i64 =
            sqlx::query_scalar("select count(*) from import_rows where error is not null")
                .fetch_one(tx.conn().await?)
                .await?;
        errors.extend(db_errors.into_iter().map(|(line, reason)| RowError {
            line: line as u64,
            reason,
        }));
        errors.sort_by_key(|e| e.line);
        errors.truncate(MAX_LISTED_ERRORS);
        let rejected = shape_errors + db_error_count as u64;
        let mut result = ImportResult {
            mode: match args.mode {
                Mode::AllOrNothing => "all-or-nothing".into(),
                Mode::SkipInvalid => "skip-invalid".into(),
            },
            written: false,
            rejected,
            errors,
            ..ImportResult::default()
        };
        if rejected > 0 && args.mode == Mode::AllOrNothing {
            return serde_json::to_value(result).map_err(|e| JobError::Fail(e.to_string()));
        }
        let (inserted, updated) = write_rows(tx).await?;
        result.written = true;
        result.inserted = inserted;
        result.updated = updated;
        result.unchanged = (rows - db_error_count as u64).saturating_sub(inserted + updated);
        serde_json::to_value(result).map_err(|e| JobError::Fail(e.to_string()))
    }
}

/// Refuses absolute paths and any `..`, so a path can only name something below the inbox
/// (symlinks are checked again when the path is resolved).
fn check_relative_path(file: &str) -> Result<(), String> {
    let p = Path::new(file);
    if file.is_empty() || file.len() > 1024 || file.contains('\0') {
        return Err("`file` must be a non-empty relative path inside the tenant's inbox".into());
    }
    if !p
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!(
            "`file` must stay inside the tenant's inbox (no absolute paths, no ..): {}",
            file.chars().take(200).collect::<String>()
        ));
    }
    Ok(())
}

/// The inbox path of `file`, refusing anything that resolves outside it (symlinks included).
fn resolve_in_inbox(imports_dir: &Path, tenant: TenantId, file: &str) -> Result<PathBuf, JobError> {
    check_relative_path(file).map_err(JobError::Fail)?;
    let inbox = imports_dir.join(tenant.to_string());
    let inbox = inbox.canonicalize().map_err(|e| {
        JobError::Fail(format!(
            "the tenant's inbox {} is not readable: {e}",
            inbox.display()
        ))
    })?;
    let path = inbox
        .join(file)
        .canonicalize()
        .map_err(|e| JobError::Fail(format!("cannot open `{file}` in the tenant's inbox: {e}")))?;
    if !path.starts_with(&inbox) {
        return Err(JobError::Fail(format!(
            "`{file}` resolves outside the tenant's inbox"
        )));
    }
    let meta = std::fs::metadata(&path).map_err(|e| JobError::Fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(JobError::Fail(format!("`{file}` is not a regular file")));
    }
    if meta.len() == 0 {
        return Err(JobError::Fail(format!("`{file}` is empty (0 bytes)")));
    }
    Ok(path)
}

fn read_file(
    path: &Path,
    format: ImportFormat,
    tenant: TenantId,
    sender: &tokio::sync::mpsc::Sender<Item>,
) -> Result<(), JobError> {
    let file = std::fs::File::open(path).map_err(|e| JobError::Fail(e.to_string()))?;
    let reader = std::io::BufReader::with_capacity(1 << 16, file);
    match format {
        ImportFormat::Jsonl => read_jsonl(reader, tenant, sender),
        ImportFormat::Csv => read_csv(reader, tenant, sender),
    }
}

fn read_jsonl(
    mut reader: impl std::io::BufRead,
    tenant: TenantId,
    sender: &tokio::sync::mpsc::Sender<Item>,
) -> Result<(), JobError> {
    let mut buf = Vec::new();
    let mut line = 0u64;
    loop {
        buf.clear();
        let mut limited = <&mut _ as std::io::Read>::take(&mut reader, MAX_LINE_BYTES as u64 + 1);
        let n = limited
            .read_until(b'\n', &mut buf)
            .map_err(|e| JobError::retry(e.to_string()))?;
        if n == 0 {
            return Ok(());
        }
        line += 1;
        let item = if buf.len() > MAX_LINE_BYTES && !buf.ends_with(b"\n") {
            // Skip the rest of the over-long line.
            let mut rest = Vec::new();
            let _ = reader.read_until(b'\n', &mut rest);
            row_error(line, format!("line is longer than {MAX_LINE_BYTES} bytes"))
        } else {
            match std::str::from_utf8(&buf) {
                Err(_) => row_error(line, "line is not valid UTF-8".into()),
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => match serde_json::from_str::<serde_json::Value>(text) {
                    Ok(v) => validate_value(line, v, tenant),
                    Err(e) => row_error(line, format!("not valid JSON: {e}")),
                },
            }
        };
        if sender.blocking_send(item).is_err() {
            return Ok(());
        }
    }
}

fn read_csv(
    reader: impl std::io::Read,
    tenant: TenantId,
    sender: &tokio::sync::mpsc::Sender<Item>,
) -> Result<(), JobError> {
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(reader);
    let headers = csv
        .byte_headers()
        .map_err(|e| JobError::Fail(format!("the CSV header cannot be read: {e}")))?
        .clone();
    let column = |name: &str| headers.iter().position(|h| h == name.as_bytes());
    let (Some(kind_col), Some(data_col)) = (column("kind"), column("data")) else {
        return Err(JobError::Fail(
            "the CSV header must name at least `kind` and `data` (and optionally external_id, id, tenant_id)".into(),
        ));
    };
    let (ext_col, id_col, tenant_col) = (column("external_id"), column("id"), column("tenant_id"));
    let mut record = csv::ByteRecord::new();
    let mut number = 1u64; // the header is record 1
    loop {
        number += 1;
        let item = match csv.read_byte_record(&mut record) {
            Ok(false) => return Ok(()),
            Ok(true) => {
                let field = |i: Option<usize>| -> Result<Option<String>, String> {
                    match i.and_then(|i| record.get(i)) {
                        None => Ok(None),
                        Some([]) => Ok(None),
                        Some(b) => std::str::from_utf8(b)
                            .map(|s| Some(s.to_string()))
                            .map_err(|_| "a field is not valid UTF-8".to_string()),
                    }
                };
                let build = || -> Result<serde_json::Value, String> {
                    let data: serde_json::Value =
                        serde_json::from_str(&field(Some(data_col))?.ok_or("`data` is empty")?)
                            .map_err(|e| format!("`data` is not valid JSON: {e}"))?;
                    let mut obj = serde_json::json!({
                        "kind": field(Some(kind_col))?.ok_or("`kind` is empty")?,
                        "data": data,
                    });
                    for (key, col) in [
                        ("external_id", ext_col),
                        ("id", id_col),
                        ("tenant_id", tenant_col),
                    ] {
                        if let Some(v) = field(col)? {
                            obj[key] = v.into();
                        }
                    }
                    Ok(obj)
                };
                match build() {
                    Ok(v) => validate_value(number, v, tenant),
                    Err(reason) => row_error(number, reason),
                }
            }
            Err(e) => {
                if e.is_io_error() {
                    return Err(JobError::retry(e.to_string()));
                }
                row_error(number, format!("malformed CSV record: {e}"))
            }
        };
        if sender.blocking_send(item).is_err() {
            return Ok(());
        }
    }
}

fn row_error(line: u64, reason: String) -> Item {
    Item::Error(RowError { line, reason })
}

/// Shape validation of one record, per kind. Database rules are checked later, set-wise.
fn validate_value(line: u64, value: serde_json::Value, tenant: TenantId) -> Item {
    let rec: InRecord = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => {
            return row_error(
                line,
                format!("not a record {{kind, data, external_id?}}: {e}"),
            );
        }
    };
    if let Some(t) = &rec.tenant_id
        && t.parse::<Uuid>().ok() != Some(tenant.0)
    {
        return row_error(
            line,
            "the record names another tenant; an import writes only the job's tenant".into(),
        );
    }
    if let Some(e) = &rec.external_id
        && (e.is_empty() || e.len() > 200)
    {
        return row_error(line, "external_id must be 1 to 200 characters".into());
    }
    let Some(data) = rec.data.as_object() else {
        return row_error(line, "`data` must be a JSON object".into());
    };
    if contains_nul(&rec.data) || rec.external_id.as_deref().is_some_and(|e| e.contains('\0')) {
        // Valid JSON (`\u0000`), but PostgreSQL text and jsonb cannot hold it.
        return row_error(line, "a value contains a NUL character (\\u0000)".into());
    }
    let text = |k: &str, required: bool| -> Result<(), String> {
        match data.get(k) {
            None if required => Err(format!("{} requires `{k}`", rec.kind)),
            None => Ok(()),
            Some(serde_json::Value::String(s)) if required && s.trim().is_empty() => {
                Err(format!("`{k}` must not be empty"))
            }
            Some(serde_json::Value::String(_)) => Ok(()),
            Some(_) => Err(format!("`{k}` must be a string")),
        }
    };
    let number = |k: &str, required: bool| -> Result<(), String> {
        match data.get(k) {
            None if required => Err(format!("{} requires `{k}`", rec.kind)),
            None => Ok(()),
            Some(serde_json::Value::Number(_)) => Ok(()),
            Some(_) => Err(format!("`{k}` must be a number")),
        }
    };
    let date = |k: &str| -> Result<(), String> {
        match data.get(k) {
            None => Ok(()),
            Some(serde_json::Value::String(s))
                if s.len() == 10 && chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok() =>
            {
                Ok(())
            }
            Some(_) => Err(format!("`{k}` must be a date YYYY-MM-DD")),
        }
    };
    let checked = match rec.kind.as_str() {
        "property" => text("name", true)
            .and(text("address", false))
            .and(text("city", false))
            .and(match data.get("units") {
                None => Ok(()),
                Some(v)
                    if v.as_i64()
                        .is_some_and(|n| (0..=i32::MAX as i64).contains(&n)) =>
                {
                    Ok(())
                }
                Some(_) => Err("`units` must be a whole number from 0".into()),
            }),
        "customer" => text("name", true).and(text("email", true)).and(
            match data.get("email").and_then(|e| e.as_str()) {
                Some(e) if !e.contains('@') || e.len() > 320 => {
                    Err("`email` is not an email address".into())
                }
                _ => Ok(()),
            },
        ),
        "invoice" => text("number", true)
            .and(number("amount", true))
            .and(text("currency", false))
            .and(text("status", false))
            .and(date("issued_on"))
            .and(date("due_on"))
            .and(
                match data
                    .get("customer_id")
                    .and_then(|c| c.as_str())
                    .map(Uuid::parse_str)
                {
                    Some(Ok(_)) => Ok(()),
                    _ => Err("invoice requires `customer_id`, a customer's id (UUID)".into()),
                },
            ),
        other => Err(format!(
            "unknown kind `{}`: use property, customer or invoice",
            other.chars().take(40).collect::<String>()
        )),
    };
    if let Err(reason) = checked {
        return row_error(line, reason);
    }
    Item::Row(Row {
        line,
        id: rec.id,
        kind: rec.kind,
        external_id: rec.external_id,
        data: rec.data.to_string(),
    })
}

/// True when any key or string in `v` holds a NUL character.
fn contains_nul(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(a) => a.iter().any(contains_nul),
        serde_json::Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

async fn load_rows(
    tx: &mut ScopedTx,
    mut receiver: tokio::sync::mpsc::Receiver<Item>,
    errors: &mut Vec<RowError>,
    shape_errors: &mut u64,
    rows: &mut u64,
) -> Result<(), JobError> {
    let mut copy = tx
        .conn()
        .await?
        .copy_in_raw("copy import_rows (line, id, kind, external_id, data) from stdin")
        .await?;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    while let Some(item) = receiver.recv().await {
        match item {
            Item::Error(e) => {
                *shape_errors += 1;
                if errors.len() < MAX_LISTED_ERRORS {
                    errors.push(e);
                }
            }
            Item::Row(r) => {
                *rows += 1;
                buf.extend_from_slice(r.line.to_string().as_bytes());
                buf.push(b'\t');
                match r.id {
                    Some(id) => buf.extend_from_slice(id.to_string().as_bytes()),
                    None => buf.extend_from_slice(b"\\N"),
                }
                buf.push(b'\t');
                copy_escape(&mut buf, &r.kind);
                buf.push(b'\t');
                match &r.external_id {
                    Some(e) => copy_escape(&mut buf, e),
                    None => buf.extend_from_slice(b"\\N"),
                }
                buf.push(b'\t');
                copy_escape(&mut buf, &r.data);
                buf.push(b'\n');
                if buf.len() >= 1 << 20 {
                    copy.send(std::mem::take(&mut buf)).await?;
                    buf.reserve(1 << 20);
                }
            }
        }
    }
    if !buf.is_empty() {
        copy.send(buf).await?;
    }
    copy.finish().await?;
    Ok(())
}

/// The database's rules, checked set-wise on the loaded rows: every reference sees only this
/// tenant's records (RLS), so another tenant's rows behave exactly like missing ones.
async fn check_rules(tx: &mut ScopedTx) -> Result<(), JobError> {
    let statements = [
        // An id given must be new, unless it is the id of the very record this row upserts
        // (same kind and external id).
        "update import_rows u set error = 'id already used by another record of this tenant'
         where u.error is null and u.id is not null
           and exists (select 1 from records r
                       where r.id = u.id
                         and not coalesce(u.external_id is not null and r.kind = u.kind
                                          and r.external_id = u.external_id, false))",
        "update import_rows u set error = 'id appears more than once in this import'
         from (select line, row_number() over (partition by id order by line) as rn
               from import_rows where id is not null and error is null) d
         where u.line = d.line and d.rn > 1",
        "update import_rows u set error = 'external_id appears more than once in this import for this kind'
         from (select line, row_number() over (partition by kind, external_id order by line) as rn
               from import_rows where external_id is not null and error is null) d
         where u.line = d.line and d.rn > 1",
        // Rule: a customer's email is unique within its tenant, case-insensitively.
        "update import_rows u set error = 'duplicate email in this import (rule customer_email_unique_per_tenant; first on line ' || d.first || ')'
         from (select line, first_value(line) over w as first, row_number() over w as rn
               from import_rows where kind = 'customer' and error is null
               window w as (partition by lower(data ->> 'email') order by line)) d
         where u.line = d.line and d.rn > 1",
        "update import_rows u set error = 'email already used by another customer of this tenant (rule customer_email_unique_per_tenant)'
         where u.error is null and u.kind = 'customer'
           and exists (select 1 from records r
                       where r.kind = 'customer' and lower(r.data ->> 'email') = lower(u.data ->> 'email')
                         -- the record this row upserts (same external id or id) is no
                         -- conflict; coalesce because a NULL comparison must not hide one
                         and not coalesce(r.external_id = u.external_id, false)
                         and not coalesce(r.id = u.id, false))",
        // Rule: an invoice's customer is an existing customer of this tenant (or one this
        // import adds, with that id).
        "update import_rows u set error = 'customer_id does not name a customer of this tenant (rule invoice_customer_must_exist)'
         where u.error is null and u.kind = 'invoice'
           and not exists (select 1 from records r
                           where r.kind = 'customer' and r.id = (u.data ->> 'customer_id')::uuid)
           and not exists (select 1 from import_rows c
                           where c.kind = 'customer' and c.error is null
                             and c.id = (u.data ->> 'customer_id')::uuid)",
    ];
    for s in statements {
        sqlx::query(s).execute(tx.conn().await?).await?;
    }
    Ok(())
}

/// Writes the valid rows: customers before the invoices that may reference them; rows with an
/// external id are upserted on it, changing nothing when the data is the same.
async fn write_rows(tx: &mut ScopedTx) -> Result<(u64, u64), JobError> {
    let mut inserted = 0u64;
    let mut updated = 0u64;
    for customers in [true, false] {
        let kind_filter = if customers {
            "kind = 'customer'"
        } else {
            "kind <> 'customer'"
        };
        let (i, u): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "with w as (
                 insert into records (tenant_id, id, kind, external_id, data)
                 select public.current_tenant_id(), coalesce(id, gen_random_uuid()), kind, external_id, data
                 from import_rows where error is null and external_id is not null and {kind_filter}
                 order by line
                 on conflict (tenant_id, kind, external_id) where external_id is not null
                 do update set data = excluded.data where records.data is distinct from excluded.data
                 returning (xmax = 0) as inserted)
             select count(*) filter (where inserted), count(*) filter (where not inserted) from w"
        )))
        .fetch_one(tx.conn().await?)
        .await?;
        let plain = sqlx::query(sqlx::AssertSqlSafe(format!(
            "insert into records (tenant_id, id, kind, external_id, data)
             select public.current_tenant_id(), coalesce(id, gen_random_uuid()), kind, null, data
             from import_rows where error is null and external_id is null and {kind_filter}
             order by line"
        )))
        .execute(tx.conn().await?)
        .await?
        .rows_affected();
        inserted += i as u64 + plain;
        updated += u as u64;
    }
    Ok((inserted, updated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_csv_file_is_read_as_csv_unless_the_format_says_otherwise() {
        let args = |json: serde_json::Value| serde_json::from_value::<ImportArgs>(json).unwrap();
        let csv = args(serde_json::json!({"file": "batch.CSV"}));
        assert_eq!(csv.effective_format(), ImportFormat::Csv);
        let jsonl = args(serde_json::json!({"file": "batch.jsonl"}));
        assert_eq!(jsonl.effective_format(), ImportFormat::Jsonl);
        let given = args(serde_json::json!({"file": "batch.csv", "format": "jsonl"}));
        assert_eq!(given.effective_format(), ImportFormat::Jsonl);
    }
}
