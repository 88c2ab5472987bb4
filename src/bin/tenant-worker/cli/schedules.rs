//! `schedule add/list/remove` and `rollups show`.

use anyhow::Result;
use tenant_worker::db;
use tenant_worker::schedule::store;
use tenant_worker::{Settings, jobs};

use super::{RollupsCommand, ScheduleCommand, connect};

pub async fn command(settings: &Settings, cmd: ScheduleCommand) -> Result<()> {
    let client = connect(settings).await?;
    match cmd {
        ScheduleCommand::Add {
            tenant,
            cron,
            tz,
            kind,
            args,
            shortcuts,
        } => {
            let args = shortcuts.apply(&args)?;
            let registry = client.builtins();
            let id =
                store::add(client.scope(), &registry, tenant, &cron, &tz, &kind, &args).await?;
            println!("{id}");
        }
        ScheduleCommand::List { tenant } => {
            let rows = match tenant {
                Some(t) => store::list_for_tenant(client.scope(), t).await?,
                None => {
                    let pool = db::scheduler_pool(settings, client.urls()).await?;
                    store::list_all(&pool).await?
                }
            };
            for s in rows {
                println!(
                    "{}  tenant {}  {:<16} {:<14} {} {}{}",
                    s.id,
                    s.tenant_id,
                    format!("\"{}\"", s.cron),
                    s.timezone,
                    s.kind,
                    s.args,
                    if s.enabled { "" } else { "  (disabled)" }
                );
            }
        }
        ScheduleCommand::Remove { id } => {
            let sched = db::scheduler_pool(settings, client.urls()).await?;
            let tenant = store::remove(&sched, client.scope(), id).await?;
            println!("removed schedule {id} of tenant {tenant}");
        }
    }
    Ok(())
}

pub async fn rollups(settings: &Settings, cmd: RollupsCommand) -> Result<()> {
    let RollupsCommand::Show { tenant, name } = cmd;
    let client = connect(settings).await?;
    let known = jobs::rollup::known(client.catalog());
    if let Some(n) = &name
        && !known.contains(n)
    {
        anyhow::bail!("no rollup named `{n}`; known: {}", known.join(", "));
    }
    let mut tx = client.scope().begin(tenant).await?;
    let rows = jobs::rollup::show(&mut tx, name.as_deref()).await?;
    tx.rollback().await?;
    if rows.is_empty() {
        let only = name
            .as_deref()
            .map(|n| format!(" --name {n}"))
            .unwrap_or_default();
        println!("no rollup rows: run `tenant-worker enqueue rollup --tenant {tenant}{only}`");
    }
    for r in rows {
        println!(
            "{:<26} {}  {:<40} count {:>8}  sum {}",
            r.name,
            r.bucket,
            r.dims.to_string(),
            r.count.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            r.sum.unwrap_or_else(|| "-".into())
        );
    }
    Ok(())
}
