//! `process`: runs a declared processing step (one INSERT, UPDATE or DELETE from `jobs/`) in
//! the tenant-scoped transaction; rows affected go in the result.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::declared::{Catalog, DeclaredKind, is_valid_name};
use crate::job::{JobContext, JobError, TenantJob};
use crate::scope::ScopedTx;

/// The `process` kind: the declared processing steps of a [`Catalog`].
#[derive(Debug, Clone)]
pub struct Process {
    catalog: Arc<Catalog>,
}

impl Process {
    /// Runs the processing steps declared in `catalog`.
    pub fn new(catalog: Arc<Catalog>) -> Self {
        Self { catalog }
    }
}

/// Arguments of `process`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessArgs {
    /// The declared processing job.
    pub name: String,
}

impl TenantJob for Process {
    const KIND: &'static str = "process";
    type Args = ProcessArgs;
    type Output = serde_json::Value;

    fn validate(&self, args: &ProcessArgs) -> Result<(), String> {
        if is_valid_name(&args.name)
            && self
                .catalog
                .get(&args.name)
                .is_some_and(|d| d.kind == DeclaredKind::Process)
        {
            Ok(())
        } else {
            Err(format!(
                "unknown processing job `{}`: declare it in jobs/ with kind = \"process\"",
                args.name.chars().take(80).collect::<String>()
            ))
        }
    }

    /// One declared statement: short, database-only work.
    fn shares_rounds(&self, _args: &ProcessArgs) -> bool {
        true
    }

    async fn run(
        &self,
        tx: &mut ScopedTx,
        _ctx: &JobContext,
        args: ProcessArgs,
    ) -> Result<serde_json::Value, JobError> {
        let declared = self
            .catalog
            .get(&args.name)
            .filter(|d| d.kind == DeclaredKind::Process)
            .ok_or_else(|| JobError::fail(format!("unknown processing job `{}`", args.name)))?;
        let affected = sqlx::query(sqlx::AssertSqlSafe(declared.sql.clone()))
            .execute(tx.conn().await?)
            .await?
            .rows_affected();
        Ok(serde_json::json!({ "name": args.name, "rows_affected": affected }))
    }
}
