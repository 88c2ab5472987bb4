//! Flags that fill a job's JSON arguments.

use anyhow::{Context as _, Result, bail};
use chrono::{DateTime, Utc};

/// Flags that fill common arguments, so `enqueue export --source v_property --format csv`
/// works without hand-written JSON. They override keys of `--args`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ArgShortcuts {
    /// export: a view, record kind or named export.
    #[arg(long)]
    pub source: Option<String>,
    /// export: csv or jsonl.
    #[arg(long)]
    pub format: Option<String>,
    /// export: gzip the file.
    #[arg(long)]
    pub gzip: bool,
    /// export: only rows updated since this time (RFC 3339).
    #[arg(long)]
    pub since: Option<DateTime<Utc>>,
    /// import: a file inside the tenant's inbox (<imports.dir>/<tenant id>/), relative to it.
    #[arg(long)]
    pub file: Option<String>,
    /// import: all-or-nothing (default) or skip-invalid.
    #[arg(long)]
    pub mode: Option<String>,
    /// rollup / process: the rollup or declared job to run.
    #[arg(long)]
    pub name: Option<String>,
    /// rollup: recompute everything, not only the changed buckets.
    #[arg(long)]
    pub full: bool,
}

impl ArgShortcuts {
    /// Merges the flags into a JSON arguments object.
    ///
    /// # Errors
    /// When `args` is not a JSON object.
    pub fn apply(&self, args: &str) -> Result<serde_json::Value> {
        let mut value: serde_json::Value =
            serde_json::from_str(args).context("--args is not valid JSON")?;
        let Some(map) = value.as_object_mut() else {
            bail!("--args must be a JSON object");
        };
        if let Some(s) = &self.source {
            map.insert("source".into(), s.clone().into());
        }
        if let Some(f) = &self.format {
            map.insert("format".into(), f.clone().into());
        }
        if self.gzip {
            map.insert("gzip".into(), true.into());
        }
        if let Some(t) = &self.since {
            map.insert("since".into(), t.to_rfc3339().into());
        }
        if let Some(f) = &self.file {
            map.insert("file".into(), f.clone().into());
        }
        if let Some(m) = &self.mode {
            map.insert("mode".into(), m.clone().into());
        }
        if let Some(n) = &self.name {
            map.insert("name".into(), n.clone().into());
        }
        if self.full {
            map.insert("full".into(), true.into());
        }
        Ok(value)
    }
}
