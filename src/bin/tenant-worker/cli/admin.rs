//! Setup, tenants, keys, the audit and the local cluster.

use anyhow::{Context as _, Result};
use tenant_worker::db::{self, DbUrls, audit};
use tenant_worker::envelope::keys;
use tenant_worker::{KeyId, Settings, embedded, tenant};

use super::{Cap, DevCommand, KeysCommand, TenantCommand};

async fn resolve(settings: &Settings) -> Result<DbUrls> {
    super::note_local_default(settings);
    DbUrls::resolve(settings)
        .await
        .context("could not reach the database")
}

pub async fn setup(settings: &Settings) -> Result<()> {
    let urls = resolve(settings).await?;
    // On the local default, resolving ran setup already when the cluster was new; running
    // it again is cheap and repairs what changed since.
    let repaired = db::setup(settings, &urls).await.context("setup failed")?;
    for check in &repaired {
        println!("repaired: {check}");
    }
    println!("setup complete: roles, migrations and grants are in place");
    Ok(())
}

pub async fn migrate(settings: &Settings) -> Result<()> {
    let urls = resolve(settings).await?;
    db::migrate(settings, &urls)
        .await
        .context("migration failed")?;
    println!("migrations applied");
    Ok(())
}

pub async fn tenant(settings: &Settings, cmd: TenantCommand) -> Result<()> {
    let urls = resolve(settings).await?;
    let admin = db::admin_pool(settings, &urls).await?;
    let owner = &settings.roles.owner;
    match cmd {
        TenantCommand::Add { name } => {
            let t = tenant::add(&admin, owner, &name).await?;
            println!("{}", t.id);
        }
        TenantCommand::List => {
            let tenants = tenant::list(&admin, owner).await?;
            if tenants.is_empty() {
                println!("no tenants yet: add one with `tenant-worker tenant add --name NAME`");
            }
            if !tenants.is_empty() {
                println!(
                    "{:<36}  {:<9}  {:>6}  {:>11}  {:<6}  name",
                    "id", "status", "weight", "max-running", "paused"
                );
            }
            for t in tenants {
                let cap = t.max_running.map_or("-".to_string(), |n| n.to_string());
                let paused = if t.paused { "paused" } else { "-" };
                println!(
                    "{}  {:<9}  {:>6}  {:>11}  {:<6}  {}",
                    t.id, t.status, t.weight, cap, paused, t.name
                );
            }
        }
        TenantCommand::Suspend { id } => {
            tenant::set_status(&admin, owner, id, false).await?;
            println!("suspended {id}: its jobs will be rejected");
        }
        TenantCommand::Activate { id } => {
            tenant::set_status(&admin, owner, id, true).await?;
            println!("activated {id}");
        }
        TenantCommand::Set {
            id,
            weight,
            max_running,
        } => {
            if weight.is_none() && max_running.is_none() {
                anyhow::bail!("nothing to change: give --weight and/or --max-running");
            }
            let share = tenant::Share {
                weight,
                max_running: max_running.map(|c| match c {
                    Cap::None => None,
                    Cap::At(n) => Some(n),
                }),
            };
            let t = tenant::set_share(&admin, owner, id, share).await?;
            let cap = t.max_running.map_or("none".to_string(), |n| n.to_string());
            println!("{id}: weight {}, max-running {cap}", t.weight);
        }
        TenantCommand::Pause { id } => {
            tenant::set_paused(&admin, owner, id, true).await?;
            println!("paused {id}: its jobs wait in the queue until `tenant resume {id}`");
        }
        TenantCommand::Resume { id } => {
            tenant::set_paused(&admin, owner, id, false).await?;
            println!("resumed {id}");
        }
    }
    admin.close().await;
    Ok(())
}

pub async fn keys(settings: &Settings, cmd: KeysCommand) -> Result<()> {
    let (out, key_id) = match cmd {
        KeysCommand::Generate { out, key_id } => (out, key_id),
        KeysCommand::RotateContext { grace_secs } => {
            return rotate_context(settings, grace_secs).await;
        }
    };
    let kid = key_id.map(|k| KeyId::parse(&k)).transpose()?;
    let (kid, private, public) = keys::generate_key_pair(&out, kid)?;
    println!("key id:      {kid}");
    println!(
        "private key: {} (mode 0600; enqueuers only)",
        private.display()
    );
    println!("public key:  {} (workers)", public.display());
    println!();
    println!("# worker.toml");
    println!("[keys]");
    println!("signing_key_file = {:?}", private.display().to_string());
    println!("signing_key_id = \"{kid}\"");
    println!("[keys.verifying]");
    println!("{kid} = {:?}", public.display().to_string());
    Ok(())
}

pub async fn audit(settings: &Settings) -> Result<i32> {
    let urls = resolve(settings).await?;
    let admin = db::admin_pool(settings, &urls).await?;
    let checks = audit::run(&admin, &settings.roles).await?;
    admin.close().await;
    print_checks(&checks);
    Ok(if audit::failures(&checks) > 0 { 1 } else { 0 })
}

async fn rotate_context(settings: &Settings, grace_secs: u64) -> Result<()> {
    if grace_secs < 120 {
        anyhow::bail!(
            "--grace-secs {grace_secs} is too short: workers look for a new context key once a \
             minute, so give them at least 120 seconds (and as long as your longest job)"
        );
    }
    let urls = resolve(settings).await?;
    let admin = db::admin_pool(settings, &urls).await?;
    let id = tenant_worker::scope::ContextKey::rotate(
        &admin,
        std::time::Duration::from_secs(grace_secs),
    )
    .await
    .context("could not rotate the context key")?;
    admin.close().await;
    println!("context key {id} is in force; the previous key keeps verifying for {grace_secs} s");
    Ok(())
}

/// Prints audit results.
pub fn print_checks(checks: &[audit::Check]) {
    for c in checks {
        if c.ok {
            println!("PASS  {}", c.name);
        } else {
            println!("FAIL  {}: {}", c.name, c.detail);
            println!("      fix: {}", c.fix);
        }
    }
    let failed = audit::failures(checks);
    println!("{} checks, {} failed", checks.len(), failed);
}

pub fn dev(settings: &Settings, cmd: DevCommand) -> Result<()> {
    let dir = settings.dev.data_dir.join("pg");
    match cmd {
        DevCommand::Status => match embedded::LocalCluster::status(&dir)? {
            embedded::ClusterStatus::NotInitialized => {
                println!("no local cluster in {}", dir.display())
            }
            embedded::ClusterStatus::Stopped { port } => {
                println!(
                    "local cluster in {} is stopped (port {port})",
                    dir.display()
                )
            }
            embedded::ClusterStatus::Running { port, pid } => println!(
                "local cluster in {} is running on 127.0.0.1:{port} (pid {pid})",
                dir.display()
            ),
        },
        DevCommand::Stop => {
            if embedded::LocalCluster::stop(&dir)? {
                println!("stopped the local cluster in {}", dir.display());
            } else {
                println!("the local cluster in {} was not running", dir.display());
            }
        }
    }
    Ok(())
}
