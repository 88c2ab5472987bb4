//! `noop`: does no work beyond the scoped transaction and the run record. Used by checks,
//! benchmarks and the demo; its options exercise the worker's paths (slow jobs, failures,
//! read isolation) without touching anything else.

use serde::{Deserialize, Serialize};

use crate::job::{JobContext, JobError, TenantJob};
use crate::scope::ScopedTx;

/// The `noop` kind.
#[derive(Debug, Clone, Copy, Default)]
pub struct Noop;

/// Arguments of `noop` (all optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoopArgs {
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

impl TenantJob for Noop {
    const KIND: &'static str = "noop";
    type Args = NoopArgs;
    type Output = serde_json::Value;

    fn validate(&self, args: &NoopArgs) -> Result<(), String> {
        if args.sleep_ms.is_some_and(|ms| ms > 600_000) {
            return Err("sleep_ms must be at most 600000".into());
        }
        if args.fail.as_ref().is_some_and(|m| m.len() > 1000) {
            return Err("fail message must be at most 1000 bytes".into());
        }
        Ok(())
    }

    /// A `noop` that sleeps stands for a slow job: it runs alone.
    fn shares_rounds(&self, args: &NoopArgs) -> bool {
        args.sleep_ms.is_none()
    }

    async fn run(
        &self,
        tx: &mut ScopedTx,
        _ctx: &JobContext,
        args: NoopArgs,
    ) -> Result<serde_json::Value, JobError> {
        if let Some(ms) = args.sleep_ms {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        if let Some(message) = args.fail {
            return Err(JobError::retry(message));
        }
        if args.count {
            let n: i64 = sqlx::query_scalar("select count(*) from records")
                .fetch_one(tx.conn().await?)
                .await?;
            return Ok(serde_json::json!({ "records_visible": n }));
        }
        Ok(serde_json::Value::Null)
    }
}
