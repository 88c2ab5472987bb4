//! The benchmark's shared context: the database and its pools, the signing key, the sizes,
//! and running our worker (in process, or as a child process).

use super::report::path_string;
use serde_json::json;
use sqlx::Executor as _;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail, ensure};
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use tenant_worker::db::{self, DbUrls};
use tenant_worker::envelope::keys;
use tenant_worker::jobs::declared::Catalog;
use tenant_worker::{
    Enqueuer, JobId, KeyId, NewJob, Registry, RunOptions, Scope, Settings, Signer, Summary,
    TenantId, Worker, client, jobs, worker,
};
use tokio_util::sync::CancellationToken;

use super::Sizes;
use super::measure::{ChildRun, keep_log, run_measured};
use super::target::Target;

// ---------------------------------------------------------------------------------------------
// The benchmark context
// ---------------------------------------------------------------------------------------------

pub(crate) struct Ctx {
    pub(crate) settings: Settings,
    pub(crate) urls: DbUrls,
    pub(crate) admin: PgPool,
    pub(crate) app: Scope,
    pub(crate) queue: PgPool,
    pub(crate) signer: Signer,
    pub(crate) work: tempfile::TempDir,
    pub(crate) sizes: Sizes,
    /// The built-in kinds, as the CLI's worker registers them.
    pub(crate) kinds: Arc<Registry>,
}

/// One job's times and result, read back from the run record and the queue.
#[derive(Debug)]
pub(crate) struct JobTimes {
    pub(crate) started_at: DateTime<Utc>,
    /// The run record's completion (the job's last statement before COMMIT).
    pub(crate) finished_at: Option<DateTime<Utc>>,
    pub(crate) lock_at: Option<DateTime<Utc>>,
    pub(crate) done_at: Option<DateTime<Utc>>,
    pub(crate) result: serde_json::Value,
}

impl JobTimes {
    /// When the job's work ended: the run record's `finished_at` (written with
    /// `clock_timestamp()` just before the commit). A worker that still wrote it with `now()`
    /// (the transaction's start, so equal to `started_at`) falls back to the queue's `done_at`,
    /// which apalis may set up to a poll interval late.
    pub(crate) fn end(&self) -> Result<DateTime<Utc>> {
        match (self.finished_at, self.done_at) {
            (Some(f), _) if f > self.started_at => Ok(f),
            (_, Some(d)) => Ok(d),
            _ => bail!("the job has neither finished_at nor done_at"),
        }
    }
}

impl Ctx {
    pub(crate) async fn prepare(base: &Settings, target: &Target, sizes: Sizes) -> Result<Ctx> {
        let work = tempfile::Builder::new()
            .prefix("tenant-worker-bench-")
            .tempdir()
            .context("creating a work directory")?;
        let url = target.url.expose_secret().to_string();
        let mut settings = base.clone();
        settings.database.admin_url = Some(SecretString::from(url.clone()));
        settings.database.app_url = None;
        settings.database.queue_url = None;
        settings.exports.dir = work.path().join("exports");
        settings.imports.dir = work.path().join("imports");
        settings.jobs.dir = None;
        let keys = work.path().join("keys");
        let (kid, private, public) = keys::generate_key_pair(&keys, Some(KeyId::parse("bench")?))?;
        settings.keys.signing_key_file = Some(private.clone());
        settings.keys.signing_key_id = Some(kid.to_string());
        settings.keys.verifying.clear();
        settings.keys.verifying.insert(kid.to_string(), public);
        let signer = Signer::from_file(kid, &private)?;
        for d in ["exports", "imports", "child"] {
            std::fs::create_dir_all(work.path().join(d))?;
        }
        let urls = DbUrls::derive(&settings, &url, false);
        eprintln!("bench: setting up {} ...", target.name);
        db::setup(&settings, &urls).await.context("setup failed")?;
        let admin = db::admin_pool(&settings, &urls).await?;
        let superuser: bool =
            sqlx::query_scalar("select rolsuper from pg_roles where rolname = current_user")
                .fetch_one(&admin)
                .await?;
        ensure!(
            superuser,
            "the benchmark needs a superuser in database.admin_url: it generates every tenant's \
             data in bulk, reads all run records and runs CHECKPOINT"
        );
        let app = Scope::new(
            db::app_pool(&settings, &urls).await?,
            db::context_key(&settings, &urls).await?,
        );
        let queue = db::queue_pool(&settings, &urls).await?;
        let kinds = Arc::new(jobs::builtins(&settings, Arc::new(Catalog::new())));
        Ok(Ctx {
            settings,
            urls,
            admin,
            app,
            queue,
            signer,
            work,
            sizes,
            kinds,
        })
    }

    pub(crate) async fn close(self) {
        self.admin.close().await;
        self.app.pool().close().await;
        self.queue.close().await;
    }

    pub(crate) async fn server_info(&self) -> Result<serde_json::Value> {
        let version: String = sqlx::query_scalar("select version()")
            .fetch_one(&self.admin)
            .await?;
        let settings: Vec<(String, String)> = sqlx::query_as(
            "select name, setting || coalesce(' ' || unit, '') from pg_settings
             where name in ('fsync', 'synchronous_commit', 'shared_buffers', 'work_mem',
                            'max_wal_size', 'wal_level', 'max_connections', 'jit')
             order by name",
        )
        .fetch_all(&self.admin)
        .await?;
        Ok(json!({
            "version": version,
            "settings": settings
                .into_iter()
                .map(|(k, v)| (k, json!(v)))
                .collect::<serde_json::Map<_, _>>(),
        }))
    }

    /// Empty tables for the next scenario.
    pub(crate) async fn reset(&self) -> Result<()> {
        self.admin
            .execute(
                "truncate public.rollup_changes, public.rollup_runs, public.rollups,
                          public.job_runs, public.schedule_fires, public.schedules,
                          public.records, public.tenants cascade;
                 truncate apalis.jobs, apalis.workers, apalis.tenant_lanes cascade;
                 drop table if exists public.bench_scratch",
            )
            .await?;
        for d in ["exports", "imports"] {
            let dir = self.work.path().join(d);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
        }
        Ok(())
    }

    /// `vacuum (analyze)` and a checkpoint after a bulk load.
    pub(crate) async fn settle(&self) -> Result<()> {
        self.admin
            .execute("vacuum (analyze) public.records")
            .await?;
        self.admin.execute("vacuum (analyze) apalis.jobs").await?;
        self.admin.execute("checkpoint").await?;
        Ok(())
    }

    pub(crate) async fn add_tenants(&self, n: usize, name: &str) -> Result<Vec<TenantId>> {
        let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
            "insert into public.tenants (id, name)
             select gen_random_uuid(), $1 || ' ' || g from generate_series(1, $2) g
             returning id",
        )
        .bind(name)
        .bind(n as i32)
        .fetch_all(&self.admin)
        .await?;
        Ok(ids.into_iter().map(TenantId).collect())
    }

    /// Bulk rows for one tenant, set-based, as the admin. `created_at` spreads over two years
    /// (row i of n is `(n - i) / n * SPAN_DAYS` days old); invoices are issued the day they
    /// were created and name one of the tenant's customers.
    pub(crate) async fn record_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("select count(*) from public.records")
            .fetch_one(&self.admin)
            .await?)
    }

    pub(crate) fn enqueuer(&self) -> Enqueuer {
        Enqueuer::new(
            self.queue.clone(),
            self.signer.clone(),
            &self.settings,
            self.kinds.clone(),
        )
    }

    pub(crate) async fn enqueue(
        &self,
        tenant: TenantId,
        kind: &str,
        args: serde_json::Value,
    ) -> Result<JobId> {
        let done = self
            .enqueuer()
            .enqueue_job(tenant, NewJob::new(kind, args))
            .await?;
        ensure!(done.created, "job not enqueued");
        Ok(done.id)
    }

    /// Our worker, with the built-in kinds.
    pub(crate) fn worker(&self) -> Result<Worker> {
        self.worker_with(&self.settings)
    }

    /// Our worker with the built-in kinds and other settings (e.g. fairness off).
    pub(crate) fn worker_with(&self, settings: &Settings) -> Result<Worker> {
        let keyring = client::keyring(settings, None)?;
        Ok(
            Worker::builder(self.app.clone(), self.queue.clone(), keyring, settings)
                .registry(&self.kinds)
                .build()?,
        )
    }

    /// Our worker, in this process, until the queue is idle.
    pub(crate) async fn run_in_process(&self, name: &str) -> Result<Summary> {
        Ok(self
            .worker()?
            .run(
                RunOptions {
                    until_idle: true,
                    name: Some(format!("bench-{name}")),
                },
                CancellationToken::new(),
            )
            .await?)
    }

    pub(crate) async fn server_now(&self) -> Result<DateTime<Utc>> {
        Ok(sqlx::query_scalar("select clock_timestamp()")
            .fetch_one(&self.admin)
            .await?)
    }

    /// The run record and queue row of one job (admin: sees every tenant).
    pub(crate) async fn job_times(&self, job: JobId) -> Result<JobTimes> {
        let (started_at, finished_at, result): (
            DateTime<Utc>,
            Option<DateTime<Utc>>,
            Option<serde_json::Value>,
        ) = sqlx::query_as(
            "select started_at, finished_at, result from public.job_runs where job_id = $1",
        )
        .bind(job)
        .fetch_optional(&self.admin)
        .await?
        .with_context(|| format!("job {job} has no run record: it did not take effect"))?;
        let (status, lock_at, done_at): (String, Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
            sqlx::query_as("select status, lock_at, done_at from apalis.jobs where id = $1")
                .bind(job.to_ulid().to_string())
                .fetch_one(&self.admin)
                .await?;
        ensure!(status == "Done", "job {job} is {status}, not Done");
        Ok(JobTimes {
            started_at,
            finished_at,
            lock_at,
            done_at,
            result: result.unwrap_or_default(),
        })
    }

    /// True while `queue` has a job that is not finished, delayed ones included. The worker's
    /// own index-probe check, so that watching a drain takes no CPU from the workers being
    /// measured; both sides are watched the same way.
    pub(crate) async fn not_done(&self, queue: &str) -> Result<bool> {
        Ok(worker::has_unfinished_jobs(&self.admin, queue, true, None).await?)
    }

    pub(crate) async fn last_done(&self, queue: &str) -> Result<DateTime<Utc>> {
        let t: Option<DateTime<Utc>> =
            sqlx::query_scalar("select max(done_at) from apalis.jobs where job_type = $1")
                .bind(queue)
                .fetch_one(&self.admin)
                .await?;
        t.context("no job was done")
    }

    /// Environment for the child worker: this database, key, folders and the same worker
    /// settings; nothing inherited from the caller's `TENANT_WORKER__*`.
    pub(crate) fn child_env(&self) -> Vec<(String, String)> {
        let s = &self.settings;
        let w = &s.worker;
        let mut v: Vec<(String, String)> = vec![
            (
                "DATABASE__ADMIN_URL".into(),
                self.urls.admin.expose_secret().to_string(),
            ),
            (
                "DATABASE__MAX_CONNECTIONS".into(),
                s.database.max_connections.to_string(),
            ),
            (
                "DATABASE__CONNECT_TIMEOUT_SECS".into(),
                s.database.connect_timeout_secs.to_string(),
            ),
            (
                "KEYS__SIGNING_KEY_FILE".into(),
                path_string(s.keys.signing_key_file.as_deref()),
            ),
            (
                "KEYS__SIGNING_KEY_ID".into(),
                s.keys.signing_key_id.clone().unwrap_or_default(),
            ),
            ("KEYS__JOB_TTL_SECS".into(), s.keys.job_ttl_secs.to_string()),
            ("EXPORTS__DIR".into(), path_string(Some(&s.exports.dir))),
            ("IMPORTS__DIR".into(), path_string(Some(&s.imports.dir))),
            (
                "DEV__DATA_DIR".into(),
                path_string(Some(&self.work.path().join("child").join(".tenant-worker"))),
            ),
            ("ROLES__OWNER".into(), s.roles.owner.clone()),
            ("ROLES__APP".into(), s.roles.app.clone()),
            ("ROLES__QUEUE".into(), s.roles.queue.clone()),
            ("ROLES__SCHEDULER".into(), s.roles.scheduler.clone()),
            ("WORKER__QUEUE".into(), w.queue.clone()),
            ("WORKER__CONCURRENCY".into(), w.concurrency.to_string()),
            ("WORKER__BATCH_SIZE".into(), w.batch_size.to_string()),
            ("WORKER__MAX_ATTEMPTS".into(), w.max_attempts.to_string()),
            (
                "WORKER__BACKOFF_BASE_MS".into(),
                w.backoff_base_ms.to_string(),
            ),
            (
                "WORKER__BACKOFF_MAX_MS".into(),
                w.backoff_max_ms.to_string(),
            ),
            (
                "WORKER__POLL_INTERVAL_MS".into(),
                w.poll_interval_ms.to_string(),
            ),
            (
                "WORKER__HEARTBEAT_SECS".into(),
                w.heartbeat_secs.to_string(),
            ),
            (
                "WORKER__MISSED_HEARTBEATS".into(),
                w.missed_heartbeats.to_string(),
            ),
            (
                "WORKER__SHUTDOWN_TIMEOUT_SECS".into(),
                w.shutdown_timeout_secs.to_string(),
            ),
            (
                "WORKER__JOB_TIMEOUT_SECS".into(),
                w.job_timeout_secs.to_string(),
            ),
            (
                "WORKER__MAX_PAYLOAD_BYTES".into(),
                w.max_payload_bytes.to_string(),
            ),
            (
                "WORKER__AUDIT_ON_START".into(),
                w.audit_on_start.to_string(),
            ),
        ];
        for (kind, k) in &s.kinds {
            if let Some(secs) = k.timeout_secs {
                v.push((format!("KINDS__{kind}__TIMEOUT_SECS"), secs.to_string()));
            }
        }
        for (kid, path) in &s.keys.verifying {
            v.push((format!("KEYS__VERIFYING__{kid}"), path_string(Some(path))));
        }
        for (role, pw) in [
            ("APP", &s.roles.app_password),
            ("QUEUE", &s.roles.queue_password),
            ("SCHEDULER", &s.roles.scheduler_password),
        ] {
            if let Some(pw) = pw {
                v.push((
                    format!("ROLES__{role}_PASSWORD"),
                    pw.expose_secret().to_string(),
                ));
            }
        }
        v.into_iter()
            .map(|(k, val)| (format!("TENANT_WORKER__{k}"), val))
            .collect()
    }

    /// Runs this binary's `run --until-idle` as a child process and measures its peak RSS.
    pub(crate) async fn run_worker_child(&self) -> Result<ChildRun> {
        let exe = std::env::current_exe().context("locating this binary")?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args(["run", "--until-idle"])
            .current_dir(self.work.path().join("child"));
        for (k, _) in std::env::vars() {
            if k.starts_with("TENANT_WORKER__") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.child_env());
        let log = self.work.path().join("worker-child.log");
        let run = run_measured(cmd, &log).await;
        keep_log(&log);
        run
    }
}
