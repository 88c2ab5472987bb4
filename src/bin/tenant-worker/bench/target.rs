//! Where the benchmark runs: a private throwaway cluster, or a fresh database on the
//! configured server.

use anyhow::{Context as _, Result};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use sqlx::{AssertSqlSafe, Executor as _};
use tenant_worker::embedded::EphemeralCluster;
use tenant_worker::{Settings, config, db};

// ---------------------------------------------------------------------------------------------
// Where the benchmark runs
// ---------------------------------------------------------------------------------------------

pub(crate) enum Server {
    Embedded(EphemeralCluster),
    Configured { maintenance: SecretString },
}

/// The database the benchmark uses: on a throwaway cluster or a fresh one on the configured
/// server.
pub(crate) struct Target {
    pub(crate) server: Server,
    pub(crate) name: String,
    pub(crate) url: SecretString,
}

impl Target {
    pub(crate) async fn open(base: &Settings) -> Result<Target> {
        match &base.database.admin_url {
            Some(admin) => {
                let name = format!(
                    "tw_bench_{}",
                    &uuid::Uuid::new_v4().simple().to_string()[..12]
                );
                let url = config::with_database(admin.expose_secret(), &name);
                let maintenance =
                    SecretString::from(config::with_database(admin.expose_secret(), "postgres"));
                eprintln!(
                    "bench: on the configured server, in a new database {name} (dropped at the end)"
                );
                Ok(Target {
                    server: Server::Configured { maintenance },
                    name,
                    url: SecretString::from(url),
                })
            }
            None => {
                eprintln!("bench: starting a private throwaway PostgreSQL cluster...");
                let cluster = tokio::task::spawn_blocking(EphemeralCluster::start)
                    .await
                    .context("cluster start panicked")?
                    .context("could not start a throwaway PostgreSQL")?;
                let name = "tenant_worker_bench".to_string();
                let url = config::with_database(&cluster.admin_url(), &name);
                Ok(Target {
                    server: Server::Embedded(cluster),
                    name,
                    url: SecretString::from(url),
                })
            }
        }
    }

    pub(crate) fn describe(&self) -> serde_json::Value {
        match &self.server {
            Server::Embedded(_) => json!({
                "kind": "embedded throwaway cluster (fsync on, shared_buffers 128MB)",
                "database": self.name,
            }),
            Server::Configured { .. } => json!({
                "kind": "configured server (database.admin_url)",
                "database": self.name,
                "url": config::redact_url(self.url.expose_secret()),
            }),
        }
    }

    pub(crate) async fn close(self) {
        match self.server {
            Server::Embedded(cluster) => {
                let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
            }
            Server::Configured { maintenance } => {
                let dropped = async {
                    let mut conn = db::connect("admin", &maintenance).await?;
                    conn.execute(AssertSqlSafe(format!(
                        r#"drop database if exists "{}" with (force)"#,
                        self.name
                    )))
                    .await?;
                    Ok::<(), anyhow::Error>(())
                }
                .await;
                if let Err(e) = dropped {
                    eprintln!(
                        "bench: could not drop the database {}: {e:#}; drop it by hand",
                        self.name
                    );
                }
            }
        }
    }
}
