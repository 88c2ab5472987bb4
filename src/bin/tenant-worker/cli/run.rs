//! `run`: the worker, with the scheduler, after the audit.

use std::sync::Arc;

use anyhow::Result;
use chrono::Utc;
use tenant_worker::db::{self, audit};
use tenant_worker::envelope::keys::KeyError;
use tenant_worker::schedule::Scheduler;
use tenant_worker::{RunOptions, Settings, client};
use tokio_util::sync::CancellationToken;

use super::admin::print_checks;
use super::connect;

pub async fn worker(settings: &Settings, until_idle: bool) -> Result<i32> {
    let client = connect(settings).await?;
    let builtins = Arc::new(client.builtins());
    let worker = client.worker()?.registry(&builtins).build()?;
    if settings.worker.audit_on_start {
        let admin = client.admin_pool().await?;
        let checks = audit::run(&admin, &settings.roles).await?;
        admin.close().await;
        let failed = audit::failures(&checks);
        if failed > 0 {
            print_checks(&checks);
            eprintln!("refusing to start: the security audit failed ({failed} problem(s))");
            return Ok(1);
        }
    }
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    match client.enqueuer(builtins) {
        Ok(enqueuer) => {
            let sched =
                Scheduler::new(db::scheduler_pool(settings, client.urls()).await?, enqueuer);
            if until_idle {
                // One pass, so runs that became due while nothing ran fire (once) now.
                let jobs = sched.tick(Utc::now()).await?;
                if !jobs.is_empty() {
                    eprintln!("scheduler enqueued {} due job(s)", jobs.len());
                }
            } else {
                tokio::spawn(sched.run(std::time::Duration::from_secs(1), shutdown.clone()));
            }
        }
        Err(client::Error::Keys(KeyError::NoSigningKey)) => {
            tracing::warn!("no signing key configured: the scheduler is off in this process");
        }
        Err(e) => return Err(e.into()),
    }
    let summary = worker
        .run(
            RunOptions {
                until_idle,
                name: None,
            },
            shutdown,
        )
        .await?;
    eprintln!(
        "worker finished: {} done, {} duplicate deliveries ignored, {} rejected, {} failed attempts",
        summary.done, summary.duplicates, summary.rejected, summary.failed
    );
    Ok(0)
}

/// Cancels `token` on SIGINT or SIGTERM.
fn spawn_signal_handler(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error.message = %e, "cannot listen for SIGTERM");
                    let _ = tokio::signal::ctrl_c().await;
                    token.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutdown requested: finishing in-flight jobs");
        token.cancel();
    });
}
