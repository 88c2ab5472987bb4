//! `export`: streams a view, a record kind or a named export of one tenant to a file.
//!
//! Rows come from `COPY (select ...) TO STDOUT` inside the scoped transaction, so the export
//! sees exactly what RLS lets its tenant see. Bytes stream through a bounded channel to a
//! writer thread that gzips (optionally), hashes and counts them into a temporary file in the
//! destination folder; the file is fsynced and renamed to
//! `<exports dir>/<tenant id>/<source>/<job id>.<ext>[.gz]`, next to a
//! `<same>.manifest.json` (tenant, job, source, format, rows, bytes, sha256, times). Memory stays
//! flat whatever the size; a half-written file never has its final name; re-running the same
//! job id replaces the file atomically.
//!
//! Nothing from the arguments is pasted into SQL: sources come from a fixed list or the
//! declared-job catalog, and `since` is a parsed timestamp printed by us.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use futures::TryStreamExt as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use std::sync::Arc;

use super::declared::{Catalog, DeclaredKind, is_valid_name};
use crate::job::{Classify as _, JobContext, JobError, TenantJob};
use crate::scope::ScopedTx;

/// Built-in views.
pub const VIEWS: &[&str] = &["v_property", "v_customer", "v_invoice"];
/// Record kinds exportable as raw records.
pub const KINDS: &[&str] = &["property", "customer", "invoice"];

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// CSV with a header line.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

impl Format {
    fn ext(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Jsonl => "jsonl",
        }
    }
}

/// The `export` kind: writes under one folder, knows the named exports of a [`Catalog`].
#[derive(Debug, Clone)]
pub struct Export {
    catalog: Arc<Catalog>,
    dir: PathBuf,
}

impl Export {
    /// Exports into `<dir>/<tenant id>/<source>/`, with the named exports of `catalog`.
    pub fn new(catalog: Arc<Catalog>, dir: PathBuf) -> Self {
        Self { catalog, dir }
    }
}

/// Arguments of `export`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportArgs {
    /// A view (`v_property`, ...), a record kind (`property`, ...) or a named export.
    pub source: String,
    /// Output format (default: the named export's, else csv).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    /// Gzip the file.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gzip: bool,
    /// Only rows updated at or after this time (views and kinds only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
}

/// What an export wrote (also the manifest's content).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// Tenant.
    pub tenant_id: String,
    /// Job.
    pub job_id: String,
    /// Source name.
    pub source: String,
    /// csv or jsonl.
    pub format: Format,
    /// Gzipped?
    pub gzip: bool,
    /// Data rows (CSV header excluded).
    pub rows: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// File name (relative to the manifest's folder).
    pub file: String,
    /// When the export started.
    pub started_at: DateTime<Utc>,
    /// When the file was complete.
    pub finished_at: DateTime<Utc>,
}

impl ExportArgs {
    fn validate(&self, catalog: &Catalog) -> Result<(), String> {
        if !is_valid_name(&self.source) {
            return Err(format!(
                "source `{}` is not a valid name",
                self.source.chars().take(80).collect::<String>()
            ));
        }
        let named = catalog.get(&self.source);
        let known = VIEWS.contains(&self.source.as_str())
            || KINDS.contains(&self.source.as_str())
            || named.is_some_and(|d| d.kind == DeclaredKind::Export);
        if !known {
            return Err(format!(
                "unknown source `{}`: use one of {}, {} or a named export from jobs/",
                self.source,
                VIEWS.join(", "),
                KINDS.join(", ")
            ));
        }
        if named.is_some() && self.since.is_some() {
            return Err(
                "`since` applies to views and record kinds; a named export defines its own filter"
                    .into(),
            );
        }
        Ok(())
    }

    fn format(&self, catalog: &Catalog) -> Format {
        self.format.unwrap_or_else(|| {
            match catalog.get(&self.source).and_then(|d| d.format.as_deref()) {
                Some("jsonl") => Format::Jsonl,
                _ => Format::Csv,
            }
        })
    }

    /// The SELECT for the source, built only from fixed text, validated names and our own
    /// formatting of `since`.
    fn query(&self, catalog: &Catalog) -> Result<(String, bool), JobError> {
        let since = self.since.map(|t| {
            format!(
                " where updated_at >= '{}'::timestamptz",
                t.to_rfc3339_opts(SecondsFormat::Micros, true)
            )
        });
        if VIEWS.contains(&self.source.as_str()) {
            return Ok((
                format!(
                    "select * from public.{}{}",
                    self.source,
                    since.unwrap_or_default()
                ),
                false,
            ));
        }
        if KINDS.contains(&self.source.as_str()) {
            return Ok((
                format!(
                    "select id, kind, external_id, data, created_at, updated_at from public.records where kind = '{}'{}",
                    self.source,
                    since
                        .map(|s| s.replacen(" where ", " and ", 1))
                        .unwrap_or_default()
                ),
                false,
            ));
        }
        match catalog.get(&self.source) {
            Some(d) if d.kind == DeclaredKind::Export => Ok((d.sql.clone(), true)),
            _ => Err(JobError::Fail(format!("unknown source `{}`", self.source))),
        }
    }
}

impl TenantJob for Export {
    const KIND: &'static str = "export";
    type Args = ExportArgs;
    type Output = serde_json::Value;

    fn validate(&self, args: &ExportArgs) -> Result<(), String> {
        args.validate(&self.catalog)
    }

    async fn run(
        &self,
        tx: &mut ScopedTx,
        ctx: &JobContext,
        args: ExportArgs,
    ) -> Result<serde_json::Value, JobError> {
        let started_at = Utc::now();
        let format = args.format(&self.catalog);
        let (query, declared) = args.query(&self.catalog)?;
        let copy = match format {
            Format::Csv => format!("copy ({query}) to stdout with (format csv, header true)"),
            // CSV with quote and delimiter characters JSON never contains unescaped: each line
            // is the JSON text exactly (text format would double every backslash).
            Format::Jsonl => format!(
                "copy (select row_to_json(t)::text from ({query}) t) to stdout \
                 with (format csv, quote e'\\x01', delimiter e'\\x02')"
            ),
        };
        let tenant = tx.tenant_id().to_string();
        let job = ctx.job_id().to_string();
        let dir = self.dir.join(&tenant).join(&args.source);
        let name = format!(
            "{job}.{}{}",
            format.ext(),
            if args.gzip { ".gz" } else { "" }
        );
        std::fs::create_dir_all(&dir).retryable()?;
        remove_stale_temps(&dir, &job);

        if declared {
            // Declared SQL runs read-only: whatever it tries to write fails. The savepoint
            // ends the read-only mode again for the run record.
            sqlx::query("savepoint declared_export")
                .execute(tx.conn().await?)
                .await?;
            sqlx::query("set local transaction_read_only = on")
                .execute(tx.conn().await?)
                .await?;
        }
        let temp = dir.join(format!(".{name}.tmp-{}", uuid::Uuid::new_v4().simple()));
        let (sender, receiver) = std::sync::mpsc::sync_channel::<bytes::Bytes>(8);
        let writer = {
            let temp = temp.clone();
            let gzip = args.gzip;
            tokio::task::spawn_blocking(move || write_file(&temp, gzip, format, receiver))
        };
        let streamed = async {
            // PostgreSQL sends one message per row: handing each to the writer thread costs
            // a channel operation (and often a wake-up) per row, so rows travel in batches.
            let mut stream = tx.conn().await?.copy_out_raw(&copy).await?;
            let mut batch = bytes::BytesMut::with_capacity(EXPORT_BATCH_BYTES);
            while let Some(chunk) = stream.try_next().await? {
                batch.extend_from_slice(&chunk);
                if batch.len() >= EXPORT_BATCH_BYTES {
                    let full = std::mem::replace(
                        &mut batch,
                        bytes::BytesMut::with_capacity(EXPORT_BATCH_BYTES),
                    );
                    if sender.send(full.freeze()).is_err() {
                        return Ok(()); // the writer failed; its error is reported below
                    }
                }
            }
            if !batch.is_empty() {
                let _ = sender.send(batch.freeze());
            }
            Ok::<(), sqlx::Error>(())
        }
        .await;
        drop(sender);
        let written = writer.await.map_err(|e| JobError::retry(e.to_string()))?;
        let cleanup = |e: JobError| {
            let _ = std::fs::remove_file(&temp);
            e
        };
        streamed.map_err(|e| cleanup(e.into()))?;
        let (rows, bytes, sha256) = written
            .map_err(|e| cleanup(JobError::retry(format!("writing {}: {e}", temp.display()))))?;
        // The file becomes visible only if the tenant context is still this job's. Checked
        // before leaving the savepoint, whose rollback would undo a change and hide it.
        tx.check_context().await.map_err(|e| cleanup(e.into()))?;
        if declared {
            sqlx::query("rollback to savepoint declared_export")
                .execute(tx.conn().await?)
                .await
                .map_err(|e| cleanup(e.into()))?;
        }
        let path = dir.join(&name);
        std::fs::rename(&temp, &path).map_err(|e| cleanup(JobError::retry(e.to_string())))?;
        sync_dir(&dir);
        let manifest = Manifest {
            tenant_id: tenant,
            job_id: job,
            source: args.source.clone(),
            format,
            gzip: args.gzip,
            rows,
            bytes,
            sha256,
            file: name.clone(),
            started_at,
            finished_at: Utc::now(),
        };
        let manifest_path = dir.join(format!("{name}.manifest.json"));
        write_atomically(
            &manifest_path,
            &serde_json::to_vec_pretty(&manifest).fatal()?,
            &manifest.job_id,
        )
        .retryable()?;
        let mut result = serde_json::to_value(&manifest).fatal()?;
        result["path"] = serde_json::Value::String(path.display().to_string());
        Ok(result)
    }
}

/// How many bytes of `COPY` output the stream collects before handing them to the writer
/// thread; with the channel's 8 slots, at most about 1 MiB is in flight.
const EXPORT_BATCH_BYTES: usize = 128 * 1024;

/// Removes temporary files a crashed earlier attempt of the same job left behind.
fn remove_stale_temps(dir: &Path, job: &str) {
    let prefix = format!(".{job}.");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name.contains(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Counts data rows in PostgreSQL's CSV output: newlines outside quotes. A quote inside a
/// quoted field is doubled, which toggles the state twice and so changes nothing.
#[derive(Default)]
struct CsvRows {
    in_quotes: bool,
    rows: u64,
    lines: u64,
}

impl CsvRows {
    fn feed(&mut self, chunk: &[u8]) {
        for i in memchr::memchr2_iter(b'"', b'\n', chunk) {
            if chunk[i] == b'"' {
                self.in_quotes = !self.in_quotes;
            } else {
                self.lines += 1;
                if !self.in_quotes {
                    self.rows += 1;
                }
            }
        }
    }
}

/// Hashes and counts what reaches the file.
struct Tee {
    file: std::fs::File,
    hasher: Sha256,
    bytes: u64,
}

impl std::io::Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

fn write_file(
    path: &Path,
    gzip: bool,
    format: Format,
    chunks: std::sync::mpsc::Receiver<bytes::Bytes>,
) -> std::io::Result<(u64, u64, String)> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    let buffered = std::io::BufWriter::with_capacity(
        1 << 16,
        Tee {
            file,
            hasher: Sha256::new(),
            bytes: 0,
        },
    );
    let mut counter = CsvRows::default();
    let mut pump = |out: &mut dyn std::io::Write| -> std::io::Result<()> {
        for chunk in &chunks {
            counter.feed(&chunk);
            out.write_all(&chunk)?;
        }
        Ok(())
    };
    let buffered = if gzip {
        let mut gz = flate2::write::GzEncoder::new(buffered, flate2::Compression::fast());
        pump(&mut gz)?;
        gz.finish()?
    } else {
        let mut b = buffered;
        pump(&mut b)?;
        b
    };
    let tee = buffered.into_inner().map_err(|e| e.into_error())?;
    tee.file.sync_all()?;
    let rows = match format {
        Format::Csv => counter.rows.saturating_sub(1),
        // JSON text never holds a raw newline, and quotes inside it are escaped: count lines.
        Format::Jsonl => counter.lines,
    };
    Ok((rows, tee.bytes, hex::encode(tee.hasher.finalize())))
}

/// SHA-256 and size of a file.
pub fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let bytes = std::io::copy(&mut f, &mut hasher)?;
    Ok((bytes, hex::encode(hasher.finalize())))
}

fn write_atomically(path: &Path, data: &[u8], job: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    // Named like the data file's temporaries, so a crash here is cleaned up the same way.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{job}."))
        .suffix(".tmp-manifest")
        .tempfile_in(dir)?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir);
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The folder of one tenant's exports of one source.
pub fn export_dir(exports_dir: &Path, tenant: &str, source: &str) -> PathBuf {
    exports_dir.join(tenant).join(source)
}

#[cfg(test)]
mod tests {
    use super::CsvRows;

    fn count(chunks: &[&[u8]]) -> (u64, u64) {
        let mut c = CsvRows::default();
        for chunk in chunks {
            c.feed(chunk);
        }
        (c.rows, c.lines)
    }

    #[test]
    fn csv_rows_ignore_newlines_inside_quotes_across_chunks() {
        let csv: &[u8] = b"id,note\n1,\"two\nlines\"\n2,\"say \"\"hi\"\"\"\n3,plain\n";
        assert_eq!(count(&[csv]), (4, 5));
        // Split at every position: the quote state carries over from chunk to chunk.
        for at in 0..csv.len() {
            let (a, b) = csv.split_at(at);
            assert_eq!(count(&[a, b]), (4, 5), "split at {at}");
        }
    }
}
