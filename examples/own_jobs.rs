//! Your own job kinds beside the built-in ones, with nothing but tenant-worker's public API.
//!
//! Two kinds of an application's own:
//! - `invoice_reminders` reads the tenant's overdue invoices from `v_invoice` and writes one
//!   `reminder` record per invoice;
//! - `tenant_summary` writes a small per-tenant summary file.
//!
//! Neither's SQL says `where tenant_id = ...`: each job runs in its tenant's scoped
//! transaction, so it sees that tenant's rows only. The example creates two tenants with
//! invoices, enqueues both kinds for both (one enqueue inside the caller's own transaction),
//! runs the worker until the queue is idle and prints what each job saw.
//!
//! ```sh
//! cargo run --example own_jobs
//! ```
//!
//! With no database configured it uses the local cluster in `.tenant-worker/` (created on first
//! use), like the command line does.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tenant_worker::{
    Client, JobContext, JobError, Registry, ScopedTx, Settings, TenantId, TenantJob,
};

/// Reminds customers of invoices overdue on a date.
struct InvoiceReminders;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReminderArgs {
    /// Invoices due before this date and not paid are overdue.
    overdue_on: chrono::NaiveDate,
}

#[derive(Serialize)]
struct ReminderOutput {
    /// The invoice numbers reminded of (what the job saw).
    reminded: Vec<String>,
}

impl TenantJob for InvoiceReminders {
    const KIND: &'static str = "invoice_reminders";
    type Args = ReminderArgs;
    type Output = ReminderOutput;

    /// Short database-only work: it may share a transaction with other such jobs.
    fn shares_rounds(&self, _: &ReminderArgs) -> bool {
        true
    }

    async fn run(
        &self,
        tx: &mut ScopedTx,
        ctx: &JobContext,
        args: ReminderArgs,
    ) -> Result<ReminderOutput, JobError> {
        let reminded: Vec<String> = sqlx::query_scalar(
            "select number from v_invoice
             where status <> 'paid' and due_on < $1
             order by number",
        )
        .bind(args.overdue_on)
        .fetch_all(tx.conn().await?)
        .await?;
        // One reminder record per invoice, in the same transaction: it exists only if the job
        // succeeds. `current_tenant_id()` is the transaction's tenant.
        sqlx::query(
            "insert into records (tenant_id, kind, data)
             select public.current_tenant_id(), 'reminder',
                    jsonb_build_object('invoice', number, 'job', $1::text)
             from unnest($2::text[]) as number",
        )
        .bind(ctx.job_id().to_string())
        .bind(&reminded)
        .execute(tx.conn().await?)
        .await?;
        Ok(ReminderOutput { reminded })
    }
}

/// Writes `<dir>/<tenant>.summary.json`: the tenant's record counts by kind.
struct TenantSummary {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct SummaryArgs {}

impl TenantJob for TenantSummary {
    const KIND: &'static str = "tenant_summary";
    type Args = SummaryArgs;
    type Output = serde_json::Value;

    async fn run(
        &self,
        tx: &mut ScopedTx,
        ctx: &JobContext,
        _: SummaryArgs,
    ) -> Result<serde_json::Value, JobError> {
        let counts: serde_json::Value = sqlx::query_scalar(
            "select coalesce(jsonb_object_agg(kind, n), '{}') from
                 (select kind, count(*) as n from records group by kind) k",
        )
        .fetch_one(tx.conn().await?)
        .await?;
        let file = self.dir.join(format!("{}.summary.json", ctx.tenant_id()));
        std::fs::create_dir_all(&self.dir)
            .and_then(|()| std::fs::write(&file, counts.to_string()))
            .map_err(|e| JobError::retry(format!("writing {}: {e}", file.display())))?;
        Ok(serde_json::json!({ "file": file, "records": counts }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let settings = Settings::load(None)?;
    let client = Client::connect(&settings).await?;

    // The kinds: the built-in ones and ours, checked for duplicates.
    let mut kinds: Registry = client.builtins();
    kinds.register(InvoiceReminders)?.register(TenantSummary {
        dir: settings.exports.dir.join("summaries"),
    })?;
    let kinds = Arc::new(kinds);

    // Two tenants whose invoices look alike on purpose.
    let run = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let northwind = client.add_tenant(&format!("Northwind {run}")).await?.id;
    let helios = client.add_tenant(&format!("Helios {run}")).await?.id;
    seed(&client, northwind, "NW", 3).await?;
    seed(&client, helios, "HS", 2).await?;

    // Enqueue, typed. The tenant is yours to verify (a login token, say), never a request body.
    let enqueuer = client.enqueuer(kinds.clone())?;
    let overdue_on = chrono::NaiveDate::from_ymd_opt(2026, 6, 1).expect("a date");
    let mut jobs = Vec::new();
    for (name, tenant) in [("Northwind", northwind), ("Helios", helios)] {
        let reminders = enqueuer
            .enqueue::<InvoiceReminders>(tenant, &ReminderArgs { overdue_on })
            .await?;
        jobs.push((name, reminders.id));
    }
    // Inside the caller's own transaction: the job exists only because this commits.
    let mut tx = client.queue_pool().begin().await?;
    let summary = enqueuer
        .enqueue_in::<TenantSummary>(&mut tx, northwind, &SummaryArgs {})
        .await?;
    tx.commit().await?;
    jobs.push(("Northwind", summary.id));

    let done = client
        .worker()?
        .registry(&kinds)
        .build()?
        .run_until_idle()
        .await?;
    println!(
        "worker ran until idle: {} done, {} failed",
        done.done, done.failed
    );

    for (name, id) in jobs {
        let info = tenant_worker::queue::show(client.queue_pool(), &id.to_string()).await?;
        println!(
            "{name:<10} {:<18} {:<5} saw {}",
            info.kind.as_deref().unwrap_or("?"),
            info.state,
            info.result().map(|r| r.to_string()).unwrap_or_default()
        );
    }
    println!(
        "each tenant's jobs saw only its own invoices (NW-* for Northwind, HS-* for Helios), \
         though their SQL has no `where tenant_id`"
    );
    Ok(())
}

/// `n` customers with one overdue invoice each, numbered `<prefix>-<i>`.
async fn seed(
    client: &Client,
    tenant: TenantId,
    prefix: &str,
    n: i64,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut tx = client.scope().begin(tenant).await?;
    sqlx::query(
        "with c as (
             insert into records (tenant_id, kind, data)
             select $1, 'customer', jsonb_build_object('name', 'Customer ' || i,
                                                       'email', 'c' || i || '@example.test')
             from generate_series(1, $3) as i
             returning id, data ->> 'name' as name)
         insert into records (tenant_id, kind, data)
         select $1, 'invoice', jsonb_build_object(
             'customer_id', c.id, 'number', $2 || '-' || row_number() over (order by c.name),
             'amount', 100, 'status', 'open', 'due_on', '2026-05-01')
         from c",
    )
    .bind(tenant)
    .bind(prefix)
    .bind(n)
    .execute(tx.conn().await?)
    .await?;
    tx.commit().await?;
    Ok(())
}
