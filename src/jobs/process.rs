//! `process`: runs a declared processing step (one INSERT, UPDATE or DELETE from `jobs/`) in
//! the tenant-scoped transaction; rows affected go in the result.

use serde::{Deserialize, Serialize};

use super::declared::{Catalog, DeclaredKind, is_valid_name};
use super::{Job, JobContext, JobError};
use crate::tenant::TenantTx;

/// Arguments of `process`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Process {
    /// The declared processing job.
    pub name: String,
}

impl Job for Process {
    const KIND: &'static str = "process";
}

impl Process {
    pub(super) fn validate(&self, catalog: &Catalog) -> Result<(), String> {
        if is_valid_name(&self.name)
            && catalog
                .get(&self.name)
                .is_some_and(|d| d.kind == DeclaredKind::Process)
        {
            Ok(())
        } else {
            Err(format!(
                "unknown processing job `{}`: declare it in jobs/ with kind = \"process\"",
                self.name.chars().take(80).collect::<String>()
            ))
        }
    }

    pub(super) async fn run(
        &self,
        tx: &mut TenantTx,
        ctx: &JobContext,
    ) -> Result<serde_json::Value, JobError> {
        let declared = ctx
            .catalog
            .get(&self.name)
            .filter(|d| d.kind == DeclaredKind::Process)
            .ok_or_else(|| JobError::Fatal(format!("unknown processing job `{}`", self.name)))?;
        let affected = sqlx::query(sqlx::AssertSqlSafe(declared.sql.clone()))
            .execute(tx.conn().await?)
            .await?
            .rows_affected();
        Ok(serde_json::json!({ "name": self.name, "rows_affected": affected }))
    }
}
