//! `noop`: does no work beyond the scoped transaction and the run record. Used by checks,
//! benchmarks and the demo; its options exercise the worker's paths (slow jobs, failures,
//! read isolation) without touching anything else.

use serde::{Deserialize, Serialize};

use super::{Job, JobContext, JobError};
use crate::tenant::TenantTx;

/// Arguments of `noop` (all optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Noop {
    /// Sleep this long inside the transaction (at most 600000), to simulate a slow job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep_ms: Option<u64>,
    /// Fail (retryably) with this message, to check retry and backoff handling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail: Option<String>,
    /// Count the records visible in the scoped transaction and report them in the result.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub count: bool,
}

impl Job for Noop {
    const KIND: &'static str = "noop";
}

impl Noop {
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.sleep_ms.is_some_and(|ms| ms > 600_000) {
            return Err("sleep_ms must be at most 600000".into());
        }
        if self.fail.as_ref().is_some_and(|m| m.len() > 1000) {
            return Err("fail message must be at most 1000 bytes".into());
        }
        Ok(())
    }

    pub(super) async fn run(
        &self,
        tx: &mut TenantTx,
        _ctx: &JobContext,
    ) -> Result<serde_json::Value, JobError> {
        if let Some(ms) = self.sleep_ms {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        if let Some(message) = &self.fail {
            return Err(JobError::Retryable(message.clone()));
        }
        if self.count {
            let n: i64 = sqlx::query_scalar("select count(*) from records")
                .fetch_one(tx.conn().await?)
                .await?;
            return Ok(serde_json::json!({ "records_visible": n }));
        }
        Ok(serde_json::Value::Null)
    }
}
