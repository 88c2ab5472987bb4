//! Faults and hostile input, end to end, against REAL worker processes (the built binary):
//! SIGKILL in the middle of big exports, imports and a thousand jobs; a database restart under
//! running workers; three workers racing on one queue; poison and undecodable jobs; a fairness
//! smoke; a catalog of hostile inputs; and an ignored two-minute soak.
//!
//! Every test owns its database (the restart test and the soak their own throwaway cluster).
//! Ground truth is read as the superuser. Worker processes are wrapped in [`Proc`], whose
//! `Drop` SIGKILLs and reaps them, so a failing test never leaves one behind. Waits are bounded
//! polling loops with generous limits (2 cores, builds running next to us): no assertion here
//! depends on tight timing except the backoff bounds, which come from database timestamps.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::io::Write as _;
use std::os::unix::ffi::OsStringExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use ed25519_dalek::Signer as _;
use ed25519_dalek::pkcs8::DecodePrivateKey as _;
use serde_json::{Value, json};
use sqlx::PgPool;
use tenant_worker::embedded::EphemeralCluster;
use tenant_worker::envelope;
use tenant_worker::jobs::export::{Manifest, hash_file};
use tenant_worker::queue::{self, NewJob};
use tenant_worker::schedule::{self, store};
use tenant_worker::tenant;
use tenant_worker::{JobId, TenantId};
use uuid::Uuid;

use crate::helpers::{self, TestDb, enqueue_all, row_id, stderr, stdout};

// ------------------------------------------------------------------------------------------
// Harness: worker processes, their environment, ground truth
// ------------------------------------------------------------------------------------------

/// One process of the built binary, with stderr in a log file. Dropping it SIGKILLs and reaps
/// it (a no-op when it already exited).
struct Proc {
    child: Child,
    log: PathBuf,
    label: String,
    spawned: Instant,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running?
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `kill -9`, then reap.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM: the graceful stop.
    fn terminate(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }

    /// Waits (bounded) for the process to exit by itself.
    async fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!(
                    "{} did not exit within {limit:?}; log tail:\n{}",
                    self.label,
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Resident set size in KiB, from /proc.
    fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// The `worker finished: ...` summary line of a process that exited: (done, duplicates,
    /// rejected, failed attempts).
    fn summary(&self) -> (u64, u64, u64, u64) {
        let text = self.log_text();
        let line = text
            .lines()
            .find(|l| l.starts_with("worker finished:"))
            .unwrap_or_else(|| panic!("{}: no summary line in\n{}", self.label, self.log_tail(30)));
        let numbers: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(numbers.len(), 4, "{line}");
        (numbers[0], numbers[1], numbers[2], numbers[3])
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The environment worker processes of one test run with: the test database and key, fast
/// polling and heartbeats (an orphan is re-enqueued ~2 s after its worker died), and private
/// exports, imports and log folders.
struct Rig {
    env: Vec<(String, String)>,
    root: tempfile::TempDir,
    exports: PathBuf,
    imports: PathBuf,
    spawned: std::cell::Cell<usize>,
}

impl Rig {
    fn new(db: &TestDb, extra: &[(&str, &str)]) -> Rig {
        let root = tempfile::tempdir().expect("tempdir");
        let exports = root.path().join("exports");
        let imports = root.path().join("imports");
        std::fs::create_dir_all(&exports).unwrap();
        std::fs::create_dir_all(&imports).unwrap();
        std::fs::create_dir_all(root.path().join("logs")).unwrap();
        let mut env = db.env();
        for (k, v) in [
            ("TENANT_WORKER__EXPORTS__DIR", exports.display().to_string()),
            ("TENANT_WORKER__IMPORTS__DIR", imports.display().to_string()),
            (
                "TENANT_WORKER__JOBS__DIR",
                shipped_jobs().display().to_string(),
            ),
            ("TENANT_WORKER__WORKER__HEARTBEAT_SECS", "1".into()),
            ("TENANT_WORKER__WORKER__MISSED_HEARTBEATS", "2".into()),
        ] {
            env.push((k.to_string(), v));
        }
        for (k, v) in extra {
            env.push((k.to_string(), v.to_string()));
        }
        Rig {
            env,
            root,
            exports,
            imports,
            spawned: std::cell::Cell::new(0),
        }
    }

    /// Starts `tenant-worker <args>` (log in `logs/<label>-<n>.log`).
    fn spawn(&self, args: &[&str], label: &str) -> Proc {
        let n = self.spawned.get() + 1;
        self.spawned.set(n);
        let log = self
            .root
            .path()
            .join("logs")
            .join(format!("{label}-{n}.log"));
        let mut cmd = Command::new(helpers::bin());
        cmd.args(args).current_dir(self.root.path());
        for (k, _) in std::env::vars() {
            if k.starts_with("TENANT_WORKER__") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        let child = cmd.spawn().expect("start tenant-worker");
        Proc {
            child,
            log,
            label: format!("{label}-{n}"),
            spawned: Instant::now(),
        }
    }

    /// Runs a CLI command to completion.
    fn cli(&self, args: &[&str]) -> Output {
        helpers::cli_with_env(args, &self.env)
    }

    /// Runs a CLI command whose arguments need not be UTF-8.
    fn cli_os(&self, args: &[OsString]) -> Output {
        let mut cmd = Command::new(helpers::bin());
        cmd.args(args).current_dir(self.root.path());
        for (k, _) in std::env::vars() {
            if k.starts_with("TENANT_WORKER__") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.env.iter().cloned());
        cmd.output().expect("run tenant-worker")
    }

    /// A tenant's import inbox (created).
    fn inbox(&self, tenant: TenantId) -> PathBuf {
        let dir = self.imports.join(tenant.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn export_dir(&self, tenant: TenantId, source: &str) -> PathBuf {
        self.exports.join(tenant.to_string()).join(source)
    }
}

fn shipped_jobs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs")
}

/// Every regular file below `dir`, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Temporary files (`.tmp` in the name) directly in `dir`, with their sizes.
fn temp_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .map(|e| (e.path(), e.metadata().map(|m| m.len()).unwrap_or(0)))
        .collect()
}

/// `n` property records for `tenant`, written as the superuser (fast; RLS does not apply).
async fn seed_properties(admin: &PgPool, tenant: TenantId, n: i64) {
    sqlx::query(
        "insert into records (tenant_id, kind, data)
         select $1, 'property', jsonb_build_object('name', 'Tower ' || g, 'city', 'Springfield',
                                                   'units', g % 50)
         from generate_series(1, $2) g",
    )
    .bind(tenant)
    .bind(n)
    .execute(admin)
    .await
    .unwrap();
}

/// Ground truth: the ids of a tenant's property records.
async fn property_ids(admin: &PgPool, tenant: TenantId) -> BTreeSet<Uuid> {
    sqlx::query_scalar::<_, Uuid>(
        "select id from records where tenant_id = $1 and kind = 'property'",
    )
    .bind(tenant)
    .fetch_all(admin)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

async fn record_count(admin: &PgPool, tenant: TenantId) -> i64 {
    sqlx::query_scalar("select count(*) from records where tenant_id = $1")
        .bind(tenant)
        .fetch_one(admin)
        .await
        .unwrap()
}

/// Ground truth: a fingerprint of all tenant data (records, rollups, schedules, tenants).
async fn fingerprint(admin: &PgPool) -> String {
    sqlx::query_scalar(
        "select coalesce(md5(string_agg(x, '|' order by x)), 'empty') from (
             select r::text as x from records r
             union all select r::text from rollups r
             union all select s.id::text || s.cron || s.timezone from schedules s
             union all select t.id::text || t.name || t.status from tenants t) u",
    )
    .fetch_one(admin)
    .await
    .unwrap()
}

/// apalis status -> count.
async fn queue_states(admin: &PgPool) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>("select status, count(*) from apalis.jobs group by 1")
        .fetch_all(admin)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

async fn done_count(admin: &PgPool, ids: &[JobId]) -> i64 {
    let rows: Vec<String> = ids.iter().map(|j| row_id(*j)).collect();
    sqlx::query_scalar("select count(*) from apalis.jobs where status = 'Done' and id = any($1)")
        .bind(&rows)
        .fetch_one(admin)
        .await
        .unwrap()
}

/// Ground truth: job id -> (tenant, number of run records, result of the first).
async fn run_records(admin: &PgPool) -> HashMap<Uuid, (TenantId, usize, Option<Value>)> {
    let rows: Vec<(Uuid, TenantId, Option<Value>)> =
        sqlx::query_as("select job_id, tenant_id, result from job_runs")
            .fetch_all(admin)
            .await
            .unwrap();
    let mut out: HashMap<Uuid, (TenantId, usize, Option<Value>)> = HashMap::new();
    for (job, tenant, result) in rows {
        out.entry(job)
            .and_modify(|e| e.1 += 1)
            .or_insert((tenant, 1, result));
    }
    out
}

/// Asserts every job in `expected` is `Done` in the queue and took effect exactly once, for
/// its own tenant, and that nothing else took effect.
async fn assert_each_done_once(admin: &PgPool, expected: &HashMap<JobId, TenantId>) {
    let states = queue_states(admin).await;
    assert_eq!(
        states,
        BTreeMap::from([("Done".to_string(), expected.len() as i64)]),
        "every job ends done"
    );
    let (total, distinct): (i64, i64) =
        sqlx::query_as("select count(*), count(distinct job_id) from job_runs")
            .fetch_one(admin)
            .await
            .unwrap();
    assert_eq!(
        (total, distinct),
        (expected.len() as i64, expected.len() as i64),
        "one run record per job, no job id twice"
    );
    let runs = run_records(admin).await;
    for (job, tenant) in expected {
        let (run_tenant, n, _) = runs
            .get(&job.0)
            .unwrap_or_else(|| panic!("job {job} has no run record"));
        assert_eq!((*run_tenant, *n), (*tenant, 1), "job {job}");
    }
}

/// Checks one CSV export of `v_property`: complete, manifest right, only `tenant`'s rows
/// (exactly `ids`), and no temporary file left in its folder.
fn check_property_export(rig: &Rig, tenant: TenantId, job: JobId, ids: &BTreeSet<Uuid>) {
    let dir = rig.export_dir(tenant, "v_property");
    let file = dir.join(format!("{job}.csv"));
    let manifest_path = dir.join(format!("{job}.csv.manifest.json"));
    let manifest: Manifest = serde_json::from_slice(
        &std::fs::read(&manifest_path)
            .unwrap_or_else(|e| panic!("manifest {}: {e}", manifest_path.display())),
    )
    .unwrap();
    let (bytes, sha256) = hash_file(&file).unwrap();
    assert_eq!(
        (manifest.bytes, manifest.sha256.as_str()),
        (bytes, sha256.as_str()),
        "the manifest describes the file"
    );
    assert_eq!(manifest.tenant_id, tenant.to_string());
    assert_eq!(manifest.job_id, job.to_string());
    assert_eq!(manifest.rows, ids.len() as u64);
    let text = std::fs::read_to_string(&file).unwrap();
    let mut lines = text.lines();
    let header = lines.next().expect("a header line");
    assert!(header.starts_with("id,tenant_id,"), "{header}");
    let mut seen = BTreeSet::new();
    for line in lines {
        let mut fields = line.split(',');
        let id: Uuid = fields.next().unwrap().parse().unwrap();
        assert_eq!(
            fields.next().unwrap(),
            tenant.to_string(),
            "another tenant's row"
        );
        assert!(seen.insert(id), "row {id} twice");
    }
    assert_eq!(&seen, ids, "exactly the tenant's rows");
    assert_eq!(temp_files(&dir), vec![], "temporary files left behind");
}

/// Inserts a row into apalis.jobs directly (what anyone with the queue role can do).
async fn insert_raw(admin: &PgPool, queue: &str, row: &str, payload: &[u8], max_attempts: i32) {
    sqlx::query(
        "insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, priority)
         values ($1, $2, $3, 'Pending', 0, $4, now(), 0)",
    )
    .bind(row)
    .bind(queue)
    .bind(payload)
    .bind(max_attempts)
    .execute(admin)
    .await
    .unwrap();
}

/// A correctly signed envelope around the exact JSON text `args` (which need not be what the
/// enqueuer would accept): the worker's own checks are all that stands in the way.
fn signed_envelope(db: &TestDb, job: JobId, tenant: TenantId, kind: &str, args: &str) -> Vec<u8> {
    let pem = std::fs::read_to_string(db.settings.keys.signing_key_file.as_ref().unwrap()).unwrap();
    let key = ed25519_dalek::SigningKey::from_pkcs8_pem(&pem).unwrap();
    let kid = db.settings.keys.signing_key_id.clone().unwrap();
    let now = Utc::now().timestamp();
    let bytes = envelope::signing_bytes(job, tenant, kind, args, now, now + 3600, &kid);
    let sig = base64::engine::general_purpose::STANDARD.encode(key.sign(&bytes).to_bytes());
    format!(
        r#"{{"v":1,"job_id":"{job}","tenant_id":"{tenant}","kind":{},"args":{args},"issued_at":{now},"expires_at":{},"key_id":"{kid}","sig":"{sig}"}}"#,
        serde_json::to_string(kind).unwrap(),
        now + 3600
    )
    .into_bytes()
}

/// `[[[...]]]` nested `depth` deep.
fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// One change of an apalis row, as recorded by the history trigger.
#[derive(Debug, sqlx::FromRow)]
struct Change {
    status: String,
    attempts: i32,
    run_at: DateTime<Utc>,
    lock_at: Option<DateTime<Utc>>,
    done_at: Option<DateTime<Utc>>,
    /// When the change happened; shown in failure messages.
    #[allow(dead_code)]
    at: DateTime<Utc>,
}

async fn db_now(admin: &PgPool) -> DateTime<Utc> {
    sqlx::query_scalar("select now()")
        .fetch_one(admin)
        .await
        .unwrap()
}

/// Polls `check` every `every` until it returns true (bounded).
macro_rules! wait_until {
    ($limit:expr, $every:expr, $what:expr, $check:expr) => {{
        let deadline = Instant::now() + $limit;
        loop {
            if $check {
                break;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {}", $what);
            tokio::time::sleep($every).await;
        }
    }};
}

// ------------------------------------------------------------------------------------------
// 1. Crash: kill -9 in the middle of a 200k export, a 200k import and 1,000 small jobs
// ------------------------------------------------------------------------------------------

const BIG: i64 = 200_000;
const SMALL_JOBS: usize = 1_000;

/// What a kill interrupted.
#[derive(Debug, Default, Clone, Copy)]
struct Interrupted {
    export: bool,
    import: bool,
    small_jobs: bool,
}

#[tokio::test]
async fn kill_9_mid_export_mid_import_and_mid_a_thousand_jobs_then_each_takes_effect_once() {
    let t0 = Instant::now();
    let db = TestDb::new().await;
    let rig = Rig::new(&db, &[]);
    let admin = db.admin().await;
    let exporter = db.tenant("Export Co").await;
    let importer = db.tenant("Import Co").await;
    let mut small = Vec::new();
    for i in 0..10 {
        small.push(db.tenant(&format!("Small {i}")).await);
    }
    seed_properties(&admin, exporter, BIG).await;
    seed_properties(&admin, importer, 25).await; // the import adds to existing records
    let export_truth = property_ids(&admin, exporter).await;
    assert_eq!(export_truth.len(), BIG as usize);
    let importer_before = record_count(&admin, importer).await;
    {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(rig.inbox(importer).join("big.jsonl")).unwrap(),
        );
        for n in 0..BIG {
            writeln!(
                f,
                r#"{{"kind":"property","external_id":"ext-{n}","data":{{"name":"Imported {n}","units":{}}}}}"#,
                n % 90
            )
            .unwrap();
        }
        f.flush().unwrap();
    }
    // Oldest first: the import, the export, then the small jobs.
    let mut batch = vec![
        (
            importer,
            NewJob::new("import", json!({"file": "big.jsonl"})),
        ),
        (
            exporter,
            NewJob::new("export", json!({"source": "v_property", "format": "csv"})),
        ),
    ];
    for i in 0..SMALL_JOBS {
        batch.push((
            small[i % small.len()],
            NewJob::new("noop", json!({"sleep_ms": 10})),
        ));
    }
    let tenants: Vec<TenantId> = batch.iter().map(|(t, _)| *t).collect();
    let ids: Vec<JobId> = enqueue_all(&db.enqueuer().await, batch).await;
    let (import_job, export_job) = (ids[0], ids[1]);
    let small_ids = ids[2..].to_vec();
    let expected: HashMap<JobId, TenantId> = ids.iter().copied().zip(tenants).collect();
    let folder = rig.export_dir(exporter, "v_property");
    let app_role = db.settings.roles.app.clone();
    eprintln!("crash: seeded and enqueued in {:?}", t0.elapsed());

    // Kill the worker at the next moment something not yet interrupted is in flight, until
    // each of the three has been interrupted at least once.
    let mut hit = Interrupted::default();
    let mut kills = Vec::new();
    for cycle in 1..=10 {
        if hit.export && hit.import && hit.small_jobs {
            break;
        }
        let since = db_now(&admin).await;
        let small_before = done_count(&admin, &small_ids).await;
        let stale_temps: BTreeSet<PathBuf> =
            temp_files(&folder).into_iter().map(|(p, _)| p).collect();
        let mut worker = rig.spawn(&["run"], "crash");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            // A partial export file written by THIS process (a killed one leaves its own).
            let export_now = !hit.export
                && temp_files(&folder)
                    .iter()
                    .any(|(p, len)| *len > 0 && !stale_temps.contains(p));
            // The import's transaction at work on a connection of THIS process (the backend of
            // a killed one may still be finishing its statement).
            let import_now = !hit.import
                && sqlx::query_scalar::<_, bool>(
                    "select exists(select 1 from pg_stat_activity
                                   where usename = $1 and state = 'active'
                                     and query like '%import_rows%' and backend_start > $2)",
                )
                .bind(&app_role)
                .bind(since)
                .fetch_one(&admin)
                .await
                .unwrap();
            let small_done = done_count(&admin, &small_ids).await;
            let small_now = !hit.small_jobs
                && small_done >= small_before + 50
                && small_done < SMALL_JOBS as i64 - 50;
            if export_now || import_now || small_now {
                worker.kill9();
                kills.push(format!(
                    "cycle {cycle} at {:?}: export {export_now}, import {import_now}, small jobs {small_now} ({small_done} done)",
                    t0.elapsed()
                ));
                hit.export |= export_now;
                hit.import |= import_now;
                hit.small_jobs |= small_now;
                if export_now {
                    // Killed mid-stream: the partial file never got its final name.
                    assert!(!folder.join(format!("{export_job}.csv")).exists());
                    assert!(!run_records(&admin).await.contains_key(&export_job.0));
                }
                break;
            }
            assert!(
                worker.alive(),
                "the worker exited by itself:\n{}",
                worker.log_tail(30)
            );
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: nothing left to interrupt ({hit:?}, kills {kills:#?}); log:\n{}",
                worker.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
    eprintln!("crash: kills {kills:#?}");
    assert!(
        hit.export && hit.import && hit.small_jobs,
        "each kind was interrupted: {hit:?}"
    );

    // Restart (bounded) until everything is done; orphans come back after the heartbeat timeout.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let mut worker = rig.spawn(&["run", "--until-idle"], "crash-final");
        let status = worker.wait(Duration::from_secs(240)).await;
        assert!(status.success(), "{}", worker.log_tail(30));
        assert!(
            !worker.log_text().contains("panicked"),
            "{}",
            worker.log_text()
        );
        if done_count(&admin, &ids).await == ids.len() as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all jobs finished: {:?}",
            queue_states(&admin).await
        );
    }
    eprintln!("crash: all done at {:?}", t0.elapsed());

    assert_each_done_once(&admin, &expected).await;
    // (a) The export: complete, its manifest right, only its tenant's rows, no leftovers.
    check_property_export(&rig, exporter, export_job, &export_truth);
    let runs = run_records(&admin).await;
    let recorded: Manifest =
        serde_json::from_value(runs[&export_job.0].2.clone().unwrap()).unwrap();
    assert_eq!(recorded.rows, BIG as u64);
    // (b) The import: every record once, no duplicate, and the run that took effect inserted
    // them all (the interrupted attempts left nothing behind).
    let result = runs[&import_job.0].2.clone().unwrap();
    assert_eq!(
        (
            &result["written"],
            &result["inserted"],
            &result["updated"],
            &result["unchanged"],
            &result["rejected"]
        ),
        (&json!(true), &json!(BIG), &json!(0), &json!(0), &json!(0)),
        "{result}"
    );
    let (total, with_ext, distinct_ext, missing): (i64, i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from records where tenant_id = $1),
                (select count(external_id) from records where tenant_id = $1),
                (select count(distinct external_id) from records where tenant_id = $1),
                (select count(*) from generate_series(0, $2 - 1) g
                 where not exists (select 1 from records
                                   where tenant_id = $1 and kind = 'property'
                                     and external_id = 'ext-' || g))",
    )
    .bind(importer)
    .bind(BIG)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(
        (total, with_ext, distinct_ext, missing),
        (importer_before + BIG, BIG, BIG, 0)
    );
    // (c) The small jobs: 1,000 run records, per tenant as enqueued (checked above).
    let per_tenant: Vec<(TenantId, i64)> =
        sqlx::query_as("select tenant_id, count(*) from job_runs where kind = 'noop' group by 1")
            .fetch_all(&admin)
            .await
            .unwrap();
    assert_eq!(per_tenant.len(), small.len());
    assert!(
        per_tenant
            .iter()
            .all(|(_, n)| *n == (SMALL_JOBS / small.len()) as i64)
    );
    // Nothing else was written anywhere: the file and its manifest.
    assert_eq!(
        files_under(&rig.exports),
        vec![
            folder.join(format!("{export_job}.csv")),
            folder.join(format!("{export_job}.csv.manifest.json"))
        ]
    );
    eprintln!("crash: checked at {:?}", t0.elapsed());
}

// ------------------------------------------------------------------------------------------
// 2. Database restart under running worker processes
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn worker_processes_survive_a_database_restart_and_finish_everything_once() {
    let t0 = Instant::now();
    let cluster = Arc::new(
        tokio::task::spawn_blocking(EphemeralCluster::start)
            .await
            .unwrap()
            .expect("start a private PostgreSQL"),
    );
    let db = TestDb::on_server(&cluster.admin_url()).await;
    let rig = Rig::new(&db, &[]);
    let admin = db.admin().await;
    let enqueuer = db.enqueuer().await;
    let mut tenants = Vec::new();
    for i in 0..4 {
        let t = db.tenant(&format!("T{i}")).await;
        seed_properties(&admin, t, 20 + i).await;
        tenants.push(t);
    }
    let mut expected: HashMap<JobId, TenantId> = HashMap::new();
    let mut exports: Vec<(JobId, TenantId)> = Vec::new();
    // One export and 75 short jobs per tenant, per round.
    let mut enqueue_round = async |round: usize| -> Vec<JobId> {
        let mut batch = Vec::new();
        for (i, t) in tenants.iter().enumerate() {
            batch.push((*t, NewJob::new("export", json!({"source": "v_property"}))));
            for _ in 0..75 {
                batch.push((*t, NewJob::new("noop", json!({"sleep_ms": 20 + i + round}))));
            }
        }
        let kinds: Vec<(TenantId, bool)> = batch
            .iter()
            .map(|(t, j)| (*t, j.kind == "export"))
            .collect();
        let ids: Vec<JobId> = enqueue_all(&enqueuer, batch).await;
        for (id, (t, is_export)) in ids.iter().zip(kinds) {
            expected.insert(*id, t);
            if is_export {
                exports.push((*id, t));
            }
        }
        ids
    };
    let first = enqueue_round(0).await;
    let mut workers = vec![
        rig.spawn(&["run"], "restart"),
        rig.spawn(&["run"], "restart"),
    ];
    wait_until!(
        Duration::from_secs(60),
        Duration::from_millis(20),
        "the workers to get going",
        done_count(&admin, &first).await >= 30
    );
    let before = done_count(&admin, &first).await;
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.restart())
        .await
        .unwrap()
        .expect("pg_ctl restart -m fast");
    eprintln!(
        "restart: restarted with {before}/{} done at {:?}",
        first.len(),
        t0.elapsed()
    );
    assert!(before < first.len() as i64, "the restart hit a busy queue");
    for w in &mut workers {
        assert!(
            w.alive(),
            "a worker died with the database:\n{}",
            w.log_tail(30)
        );
    }
    // More work after the restart, through the enqueuer's (reconnecting) pool.
    let second = enqueue_round(1).await;
    let all: Vec<JobId> = expected.keys().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(180);
    while done_count(&admin, &all).await < all.len() as i64 {
        for w in &mut workers {
            assert!(w.alive(), "a worker died:\n{}", w.log_tail(30));
        }
        assert!(
            Instant::now() < deadline,
            "not everything finished after the restart: {:?}",
            queue_states(&admin).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("restart: all {} done at {:?}", all.len(), t0.elapsed());
    // Both processes reconnected on their own: each takes work queued after the restart. (One
    // may still be waiting out its reconnect backoff when the second round is over, so slow
    // jobs are offered until both have taken some; bounded.)
    let mut after_restart = second.clone();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let rows: Vec<String> = after_restart.iter().map(|j| row_id(*j)).collect();
        let mut idle = Vec::new();
        for w in &workers {
            let n: i64 = sqlx::query_scalar(
                "select count(*) from apalis.jobs where id = any($1) and lock_by like $2",
            )
            .bind(&rows)
            .bind(format!("%-{}-%", w.pid()))
            .fetch_one(&admin)
            .await
            .unwrap();
            eprintln!("restart: {} ran {n} jobs queued after the restart", w.label);
            if n == 0 {
                idle.push(w.label.clone());
            }
        }
        if idle.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{idle:?} took no work after the restart:\n{}",
            workers
                .iter()
                .map(|w| w.log_tail(20))
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        let batch = (0..16)
            .map(|i| {
                (
                    tenants[i % tenants.len()],
                    NewJob::new("noop", json!({"sleep_ms": 300})),
                )
            })
            .collect();
        let more: Vec<JobId> = enqueue_all(&enqueuer, batch).await;
        for (i, j) in more.iter().enumerate() {
            expected.insert(*j, tenants[i % tenants.len()]);
        }
        wait_until!(
            Duration::from_secs(60),
            Duration::from_millis(100),
            "the extra jobs",
            done_count(&admin, &more).await == more.len() as i64
        );
        after_restart.extend(more);
    }
    assert_each_done_once(&admin, &expected).await;
    for (job, t) in &exports {
        check_property_export(&rig, *t, *job, &property_ids(&admin, *t).await);
    }
    // A graceful stop still works after all that.
    for w in &workers {
        w.terminate();
    }
    for w in &mut workers {
        let status = w.wait(Duration::from_secs(60)).await;
        assert!(status.success(), "{}", w.log_tail(20));
        assert!(!w.log_text().contains("panicked"), "{}", w.log_text());
    }
    admin.close().await;
    drop(enqueuer);
    let cluster = Arc::try_unwrap(cluster).expect("sole owner");
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

// ------------------------------------------------------------------------------------------
// 3. Many workers: three processes, 10,000 jobs, 200 tenants
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn three_worker_processes_share_ten_thousand_jobs_of_two_hundred_tenants_each_once() {
    const TENANTS: usize = 200;
    const JOBS: usize = 10_000;
    const EXPORTS: usize = 40;
    let t0 = Instant::now();
    let db = TestDb::new().await;
    // Fewer connections per process: three of them share the test server with other tests.
    let rig = Rig::new(
        &db,
        &[
            ("TENANT_WORKER__DATABASE__MAX_CONNECTIONS", "6"),
            ("TENANT_WORKER__WORKER__CONCURRENCY", "4"),
        ],
    );
    let admin = db.admin().await;
    let mut tenants = Vec::new();
    for i in 0..TENANTS {
        tenants.push(
            tenant::add(&admin, &db.settings.roles.owner, &format!("Tenant {i}"))
                .await
                .unwrap()
                .id,
        );
    }
    // Tenant k owns 1 + k % 7 properties, so a leak shows up in the counts.
    sqlx::query(
        "insert into records (tenant_id, kind, data)
         select t.id, 'property', jsonb_build_object('name', 'Tower ' || g, 'units', g)
         from unnest($1::uuid[]) with ordinality as t(id, k),
              generate_series(1, 1 + ((t.k - 1) % 7)::int) g",
    )
    .bind(tenants.iter().map(|t| t.0).collect::<Vec<_>>())
    .execute(&admin)
    .await
    .unwrap();
    let owned = |k: usize| 1 + (k % 7) as i64;

    // Mostly noops (every fifth counts the records it can see), plus 40 small exports.
    let mut jobs: Vec<(TenantId, NewJob)> = Vec::with_capacity(JOBS);
    for n in 0..JOBS {
        let k = (n * 7919) % TENANTS; // a permutation that interleaves tenants
        let job = if n % (JOBS / EXPORTS) == 0 {
            NewJob::new("export", json!({"source": "v_property", "format": "csv"}))
        } else if n % 5 == 0 {
            NewJob::new("noop", json!({"count": true}))
        } else {
            NewJob::new("noop", json!({}))
        };
        jobs.push((tenants[k], job));
    }
    let meta: Vec<(TenantId, String, Value)> = jobs
        .iter()
        .map(|(t, j)| (*t, j.kind.clone(), j.args.clone()))
        .collect();
    let enqueuer = db.enqueuer().await;
    let mut ids = Vec::with_capacity(JOBS);
    for chunk in jobs.chunks(1_000) {
        ids.extend(enqueue_all(&enqueuer, chunk.to_vec()).await);
    }
    let expected: HashMap<JobId, TenantId> =
        ids.iter().copied().zip(meta.iter().map(|m| m.0)).collect();
    assert_eq!(expected.len(), JOBS);
    eprintln!("many: enqueued {JOBS} at {:?}", t0.elapsed());

    let mut workers: Vec<Proc> = (0..3)
        .map(|_| rig.spawn(&["run", "--until-idle"], "many"))
        .collect();
    let mut done = 0;
    for w in &mut workers {
        let status = w.wait(Duration::from_secs(400)).await;
        assert!(status.success(), "{}", w.log_tail(30));
        assert!(!w.log_text().contains("panicked"), "{}", w.log_text());
        let (d, _dup, rejected, failed) = w.summary();
        assert_eq!((rejected, failed), (0, 0), "{}", w.log_tail(20));
        done += d;
    }
    eprintln!("many: all workers exited at {:?}", t0.elapsed());
    assert_eq!(
        done, JOBS as u64,
        "the processes report each job done once in total"
    );
    assert_each_done_once(&admin, &expected).await;

    // The work was shared: each process ran some of it.
    for w in &workers {
        let n: i64 = sqlx::query_scalar("select count(*) from apalis.jobs where lock_by like $1")
            .bind(format!("%-{}-%", w.pid()))
            .fetch_one(&admin)
            .await
            .unwrap();
        eprintln!("many: {} ran {n} jobs", w.label);
        assert!(n > 0, "{} ran nothing", w.label);
    }
    // Run records add up per tenant, and every count saw exactly its own tenant's records.
    let runs = run_records(&admin).await;
    let mut per_tenant: HashMap<TenantId, usize> = HashMap::new();
    for ((job, (tenant, kind, args)), k) in ids
        .iter()
        .zip(&meta)
        .zip((0..JOBS).map(|n| (n * 7919) % TENANTS))
    {
        *per_tenant.entry(*tenant).or_default() += 1;
        let (_, _, result) = &runs[&job.0];
        if kind == "noop" && args.get("count").is_some() {
            assert_eq!(
                result,
                &Some(json!({"records_visible": owned(k)})),
                "job {job}"
            );
        }
    }
    let counted: HashMap<TenantId, i64> =
        sqlx::query_as::<_, (TenantId, i64)>("select tenant_id, count(*) from job_runs group by 1")
            .fetch_all(&admin)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(counted.len(), TENANTS);
    for (t, n) in per_tenant {
        assert_eq!(counted[&t], n as i64, "run records of tenant {t}");
    }
    // Every export holds only its tenant's rows.
    let mut exports = 0;
    for (job, (tenant, kind, _)) in ids.iter().zip(&meta) {
        if kind == "export" {
            exports += 1;
            check_property_export(&rig, *tenant, *job, &property_ids(&admin, *tenant).await);
        }
    }
    assert_eq!(exports, EXPORTS);
    eprintln!("many: checked at {:?}", t0.elapsed());
}

// ------------------------------------------------------------------------------------------
// 4. Poison and undecodable jobs
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_poison_job_backs_off_and_dies_while_others_flow_and_undecodable_payloads_never_stop_the_worker()
 {
    const MAX: i32 = 4;
    const BASE_MS: i64 = 400;
    const CAP_MS: i64 = 1_000;
    let mut db = TestDb::new().await;
    db.settings.worker.max_attempts = MAX as u32;
    let rig = Rig::new(
        &db,
        &[
            ("TENANT_WORKER__WORKER__MAX_ATTEMPTS", &MAX.to_string()),
            (
                "TENANT_WORKER__WORKER__BACKOFF_BASE_MS",
                &BASE_MS.to_string(),
            ),
            ("TENANT_WORKER__WORKER__BACKOFF_MAX_MS", &CAP_MS.to_string()),
        ],
    );
    let admin = db.admin().await;
    helpers::record_queue_history(&admin).await;
    let poisoned = db.tenant("Poisoned").await;
    let mut others = Vec::new();
    for i in 0..4 {
        others.push(db.tenant(&format!("Healthy {i}")).await);
    }
    let enqueuer = db.enqueuer().await;
    let queue_name = db.settings.worker.queue.clone();
    let mut good: Vec<JobId> = Vec::new();
    let enqueue_good = async |n: usize| -> Vec<JobId> {
        let batch = (0..n)
            .map(|i| {
                (
                    others[i % others.len()],
                    NewJob::new("noop", json!({"sleep_ms": 20})),
                )
            })
            .collect();
        enqueue_all(&enqueuer, batch).await
    };

    let poison = enqueuer
        .enqueue_job(
            poisoned,
            NewJob::new("noop", json!({"fail": "poison pill"})),
        )
        .await
        .unwrap()
        .id;
    good.extend(enqueue_good(40).await);
    // Payloads that are not even JSON, straight into the queue, before the worker starts...
    let mut garbage: Vec<(JobId, &str)> = Vec::new();
    let mut noise = vec![0xabu8];
    noise.extend((0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
    for (payload, what) in [
        (b"\xff\xfe\xfd not UTF-8 \xc3\x28".to_vec(), "invalid UTF-8"),
        (Vec::new(), "empty"),
        (b"\x00\x00\x00\x00".to_vec(), "NUL bytes"),
        (noise, "4 KiB of noise"),
        (b"null".to_vec(), "JSON null"),
        (br#"{"v":1,"job_id":"#.to_vec(), "truncated JSON"),
    ] {
        let id = JobId::new();
        insert_raw(&admin, &queue_name, &row_id(id), &payload, MAX).await;
        garbage.push((id, what));
    }
    let mut worker = rig.spawn(&["run"], "poison");
    // ...and more while it runs.
    wait_until!(
        Duration::from_secs(60),
        Duration::from_millis(20),
        "the worker to start",
        done_count(&admin, &good).await > 0
    );
    let id = JobId::new();
    insert_raw(
        &admin,
        &queue_name,
        &row_id(id),
        b"\xc0\xc1 mid-run garbage",
        MAX,
    )
    .await;
    garbage.push((id, "invalid UTF-8 while running"));

    // Other tenants' jobs keep coming while the poison job waits out its backoffs.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, attempts): (String, i32) =
            sqlx::query_as("select status, attempts from apalis.jobs where id = $1")
                .bind(row_id(poison))
                .fetch_one(&admin)
                .await
                .unwrap();
        if status == "Failed" && attempts >= MAX {
            break;
        }
        assert!(worker.alive(), "{}", worker.log_tail(30));
        assert!(
            Instant::now() < deadline,
            "poison job still {status} after {attempts}"
        );
        good.extend(enqueue_good(5).await);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Jobs enqueued after all the garbage still run.
    let after = enqueue_good(30).await;
    good.extend(after.iter().copied());
    wait_until!(
        Duration::from_secs(120),
        Duration::from_millis(50),
        "the healthy jobs",
        done_count(&admin, &good).await == good.len() as i64
    );
    assert!(
        worker.alive(),
        "the worker process stays up:\n{}",
        worker.log_tail(30)
    );
    assert!(
        !worker.log_text().contains("worker failed"),
        "no worker generation died:\n{}",
        worker.log_tail(40)
    );

    // The poison job: dead after MAX attempts with its error, no effect.
    let queue_pool = db.queue().await;
    let info = queue::show(&queue_pool, &poison.to_string()).await.unwrap();
    assert_eq!(
        (info.state.as_str(), info.attempts),
        ("dead", MAX),
        "{info:?}"
    );
    assert!(info.error().unwrap().contains("poison pill"), "{info:?}");
    let runs = run_records(&admin).await;
    assert!(
        !runs.contains_key(&poison.0),
        "a failed attempt took effect"
    );
    // Its backoff delays, from the database's own timestamps.
    let history: Vec<Change> = sqlx::query_as(
        "select status, attempts, run_at, lock_at, done_at, at from job_history where id = $1 order by seq",
    )
    .bind(row_id(poison))
    .fetch_all(&admin)
    .await
    .unwrap();
    let ms = |d: chrono::TimeDelta| d.num_milliseconds();
    // A fetch claims the row and marks it `Running` in one statement.
    let fetches: Vec<&Change> = history
        .windows(2)
        .filter(|w| w[1].status == "Running" && w[0].status != "Running")
        .map(|w| &w[1])
        .collect();
    assert_eq!(
        fetches.len(),
        MAX as usize,
        "one fetch per attempt: {history:#?}"
    );
    let mut delays = Vec::new();
    for n in 1..MAX {
        let raw = (BASE_MS << (n - 1)).min(CAP_MS);
        let failed = history
            .iter()
            .position(|c| c.status == "Failed" && c.attempts == n)
            .unwrap_or_else(|| panic!("no failure {n}: {history:#?}"));
        let next_run = history[failed].run_at;
        // The ack of the failure writes its next run time and done_at in one statement.
        let failed_at = history[failed].done_at.expect("done_at set by the ack");
        let next_start = history[failed..]
            .iter()
            .find(|c| c.status == "Running")
            .and_then(|c| c.lock_at)
            .unwrap_or_else(|| panic!("attempt {} never started: {history:#?}", n + 1));
        let delay = ms(next_run - failed_at);
        assert!(
            (raw / 2 - 5..=raw).contains(&delay),
            "retry {n}: delay {delay} ms outside [{}, {raw}]: {history:#?}",
            raw / 2
        );
        assert!(
            next_start >= next_run,
            "retry {n} started before its time: {history:#?}"
        );
        let waited = ms(next_start - failed_at);
        assert!(
            waited >= raw / 2,
            "retry {n} after only {waited} ms: {history:#?}"
        );
        delays.push((delay, waited));
    }
    eprintln!("poison: (scheduled delay ms, waited ms) per retry: {delays:?}");
    let final_failure = history
        .iter()
        .find(|c| c.status == "Failed" && c.attempts == MAX)
        .and_then(|c| c.done_at)
        .expect("the last failure");
    let first_failure = history
        .iter()
        .find(|c| c.status == "Failed" && c.attempts == 1)
        .and_then(|c| c.done_at)
        .expect("the first failure");
    // Meanwhile the other tenants' jobs kept flowing.
    let rows: Vec<String> = good.iter().map(|j| row_id(*j)).collect();
    let flowed: i64 = sqlx::query_scalar(
        "select count(*) from apalis.jobs where id = any($1) and done_at between $2 and $3",
    )
    .bind(&rows)
    .bind(first_failure)
    .bind(final_failure)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert!(
        flowed > 0,
        "no other job finished while the poison job was retried"
    );
    eprintln!("poison: {flowed} other jobs finished while it was being retried");
    for j in &good {
        assert_eq!(runs[&j.0].1, 1);
    }
    // Each undecodable payload: rejected once with a clear reason, never retried, no effect.
    for (id, what) in &garbage {
        let info = queue::show(&queue_pool, &id.to_string()).await.unwrap();
        assert_eq!(
            (info.state.as_str(), info.attempts),
            ("rejected", 1),
            "{what}: {info:?}"
        );
        let error = info.error().unwrap();
        assert!(
            error.contains("payload is not a valid job envelope"),
            "{what}: {error}"
        );
        assert!(!runs.contains_key(&id.0), "{what}");
    }
    assert_eq!(runs.len(), good.len());
}

// ------------------------------------------------------------------------------------------
// 5. Fairness smoke
// ------------------------------------------------------------------------------------------

/// With the fair fetch (the default), B's ten jobs go in the first fetches after the worker
/// starts, not after A's 5,000: the whole order is asserted, the times only printed.
#[tokio::test]
async fn fairness_smoke_ten_jobs_of_tenant_b_behind_five_thousand_of_tenant_a() {
    let db = TestDb::new().await;
    let rig = Rig::new(&db, &[]);
    let admin = db.admin().await;
    let (a, b) = (db.tenant("Busy A").await, db.tenant("Small B").await);
    let enqueuer = db.enqueuer().await;
    let mut a_jobs = Vec::new();
    for _ in 0..5 {
        let batch = (0..1_000)
            .map(|_| (a, NewJob::new("noop", json!({}))))
            .collect();
        a_jobs.extend(enqueue_all(&enqueuer, batch).await);
    }
    let batch = (0..10)
        .map(|_| (b, NewJob::new("noop", json!({}))))
        .collect();
    let b_jobs: Vec<JobId> = enqueue_all(&enqueuer, batch).await;
    let start = db_now(&admin).await;
    let mut worker = rig.spawn(&["run", "--until-idle"], "fairness");
    let status = worker.wait(Duration::from_secs(400)).await;
    assert!(status.success(), "{}", worker.log_tail(30));
    assert_eq!(done_count(&admin, &b_jobs).await, 10, "B's jobs complete");
    assert_eq!(done_count(&admin, &a_jobs).await, 5_000);

    let rows = |ids: &[JobId]| ids.iter().map(|j| row_id(*j)).collect::<Vec<_>>();
    let (first_lock, a_last): (DateTime<Utc>, DateTime<Utc>) =
        sqlx::query_as("select min(lock_at), max(done_at) from apalis.jobs where id = any($1)")
            .bind(rows(&a_jobs))
            .fetch_one(&admin)
            .await
            .unwrap();
    let (b_first, b_last): (DateTime<Utc>, DateTime<Utc>) =
        sqlx::query_as("select min(done_at), max(done_at) from apalis.jobs where id = any($1)")
            .bind(rows(&b_jobs))
            .fetch_one(&admin)
            .await
            .unwrap();
    let a_after_b: i64 =
        sqlx::query_scalar("select count(*) from apalis.jobs where id = any($1) and done_at > $2")
            .bind(rows(&a_jobs))
            .bind(b_first)
            .fetch_one(&admin)
            .await
            .unwrap();
    assert!(
        a_after_b >= 4_800,
        "only {a_after_b} of A's 5,000 jobs finished after B's first: B waited behind A's backlog"
    );
    let secs = |d: chrono::TimeDelta| d.num_milliseconds() as f64 / 1000.0;
    println!(
        "FAIRNESS (1 worker process, 5,000 noop jobs of tenant A enqueued before 10 of tenant B): \
         B's jobs finished {:.2}-{:.2} s after the worker started ({:.2} s after it took its first job); \
         A's last job finished at {:.2} s; B's last finished {:+.2} s relative to A's last; \
         {a_after_b} of A's jobs finished after B's first",
        secs(b_first - start),
        secs(b_last - start),
        secs(b_last - first_lock),
        secs(a_last - start),
        secs(b_last - a_last),
    );
}

// ------------------------------------------------------------------------------------------
// 6. Hostile input catalog
// ------------------------------------------------------------------------------------------

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

const SQLI: &str = "'; drop table records; --";

#[tokio::test]
async fn hostile_command_line_arguments_are_refused_with_a_clear_error_and_change_nothing() {
    let db = TestDb::new().await;
    let rig = Rig::new(&db, &[]);
    let admin = db.admin().await;
    let a = db.tenant("A").await;
    seed_properties(&admin, a, 5).await;
    std::fs::write(rig.inbox(a).join("x.jsonl"), "{}\n").unwrap();
    let before = fingerprint(&admin).await;
    let t = a.to_string();
    let enqueue = |kind: &str, more: &[&str]| {
        let mut v = strings(&["enqueue", kind, "--tenant", &t]);
        v.extend(strings(more));
        v
    };
    let schedule = |cron: &str, tz: &str, more: &[&str]| {
        let mut v = strings(&[
            "schedule", "add", "--tenant", &t, "--cron", cron, "--tz", tz,
        ]);
        v.extend(strings(more));
        v
    };
    let deep = nested(10_000);
    let deep_in_object = format!(r#"{{"fail":{deep}}}"#);
    let too_many_records = format!(
        r#"{{"records":[{}]}}"#,
        vec![r#"{"kind":"property","data":{"name":"x"}}"#; 1001].join(",")
    );
    let long_fail = format!(r#"{{"fail":"{}"}}"#, "x".repeat(1001));
    let long_name = "x".repeat(201);
    // A key that does not compress, far over what the queue's unique index can hold.
    let huge_key: String = (0..2_000)
        .map(|_| Uuid::new_v4().simple().to_string())
        .collect();

    // (case, arguments, text the error must contain)
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        // SQL in every string argument.
        (
            "export source with SQL",
            enqueue("export", &["--source", "v_property; drop table records"]),
            "source `v_property; drop table records` is not a valid name",
        ),
        (
            "export source with a quote",
            enqueue("export", &["--source", "v_property' or '1'='1"]),
            "is not a valid name",
        ),
        (
            "export format with SQL",
            enqueue(
                "export",
                &[
                    "--source",
                    "v_property",
                    "--format",
                    "csv'; drop table records; --",
                ],
            ),
            "invalid arguments for `export`: format: unknown variant",
        ),
        (
            "export since garbage",
            enqueue(
                "export",
                &[
                    "--args",
                    r#"{"source":"v_property","since":"now(); drop table records"}"#,
                ],
            ),
            "invalid arguments for `export`",
        ),
        (
            "rollup name with SQL",
            enqueue("rollup", &["--name", SQLI]),
            "unknown rollup `'; drop table records; --`",
        ),
        (
            "process name with SQL",
            enqueue(
                "process",
                &["--name", "normalise_customer_emails; drop table records"],
            ),
            "unknown processing job",
        ),
        (
            "import mode with SQL",
            enqueue("import", &["--file", "x.jsonl", "--mode", SQLI]),
            "invalid arguments for `import`: mode: unknown variant",
        ),
        (
            "kind with SQL",
            enqueue("noop; drop table records", &[]),
            "unknown job kind `noop; drop table records`",
        ),
        (
            "args key with SQL",
            enqueue("noop", &["--args", r#"{"'; drop table records; --": 1}"#]),
            "unknown field",
        ),
        (
            "tenant id with SQL",
            strings(&["enqueue", "noop", "--tenant", SQLI]),
            "invalid value",
        ),
        (
            "jobs show with SQL",
            strings(&["jobs", "show", SQLI]),
            "no job with id",
        ),
        (
            "jobs cancel with SQL",
            strings(&["jobs", "cancel", SQLI]),
            "no job with id",
        ),
        (
            "jobs list state with SQL",
            strings(&["jobs", "list", "--state", "done'; --"]),
            "unknown state `done'; --`",
        ),
        (
            "schedule cron with SQL",
            schedule("* * * * *; drop table schedules", "UTC", &["noop"]),
            "invalid cron expression",
        ),
        (
            "schedule cron all SQL",
            schedule(SQLI, "UTC", &["noop"]),
            "invalid cron expression",
        ),
        (
            "schedule tz with SQL",
            schedule("* * * * *", "UTC'; drop table schedules; --", &["noop"]),
            "unknown time zone `UTC'; drop table schedules; --`",
        ),
        // Path traversal in every path-like argument.
        (
            "export source ../../etc",
            enqueue("export", &["--source", "../../etc"]),
            "source `../../etc` is not a valid name",
        ),
        (
            "export source absolute",
            enqueue("export", &["--source", "/etc/passwd"]),
            "is not a valid name",
        ),
        (
            "import file ../x",
            enqueue("import", &["--file", "../x"]),
            "`file` must stay inside the tenant's inbox",
        ),
        (
            "import file /etc/passwd",
            enqueue("import", &["--file", "/etc/passwd"]),
            "`file` must stay inside the tenant's inbox",
        ),
        (
            "import file a/../../x",
            enqueue("import", &["--file", "a/../../x"]),
            "`file` must stay inside the tenant's inbox",
        ),
        (
            "import file ./../x",
            enqueue("import", &["--file", "./../x"]),
            "`file` must stay inside the tenant's inbox",
        ),
        (
            "import file empty",
            enqueue("import", &["--file", ""]),
            "`file` must be a non-empty relative path",
        ),
        (
            "rollup name as a path",
            enqueue("rollup", &["--name", "../../etc/passwd"]),
            "unknown rollup",
        ),
        (
            "schedule tz as a path",
            schedule("* * * * *", "../../../etc/localtime", &["noop"]),
            "unknown time zone",
        ),
        (
            "schedule job with a path",
            schedule("* * * * *", "UTC", &["export", "--source", "../../etc"]),
            "invalid scheduled job: invalid arguments for `export`: source `../../etc` is not a valid name",
        ),
        // NUL characters (argv cannot carry a NUL byte; JSON escapes can).
        (
            "NUL in export source",
            enqueue("export", &["--args", r#"{"source":"v_prop\u0000erty"}"#]),
            "is not a valid name",
        ),
        (
            "NUL in import file",
            enqueue(
                "import",
                &["--args", r#"{"file":"x.jsonl\u0000../../etc/passwd"}"#],
            ),
            "`file` must be a non-empty relative path",
        ),
        (
            "NUL in rollup name",
            enqueue(
                "rollup",
                &["--args", r#"{"name":"records_per_kind_per_day\u0000"}"#],
            ),
            "unknown rollup",
        ),
        (
            "NUL in process name",
            enqueue("process", &["--args", r#"{"name":"x\u0000"}"#]),
            "unknown processing job",
        ),
        // Cron and time-zone garbage.
        (
            "cron one field",
            schedule("garbage", "UTC", &["noop"]),
            "expected 5 fields (or 6 with seconds), found 1",
        ),
        ("cron empty", schedule("", "UTC", &["noop"]), "found 0"),
        (
            "cron seven fields",
            schedule("* * * * * * *", "UTC", &["noop"]),
            "found 7",
        ),
        (
            "cron minute 61",
            schedule("61 * * * *", "UTC", &["noop"]),
            "invalid cron expression",
        ),
        (
            "cron step 0",
            schedule("*/0 * * * *", "UTC", &["noop"]),
            "range step cannot be zero",
        ),
        (
            "cron reversed range",
            schedule("59-0 * * * *", "UTC", &["noop"]),
            "invalid cron expression",
        ),
        (
            "cron huge number",
            schedule("1-99999999999999999999 * * * *", "UTC", &["noop"]),
            "invalid cron expression",
        ),
        (
            "tz unknown",
            schedule("* * * * *", "Mars/Olympus_Mons", &["noop"]),
            "unknown time zone `Mars/Olympus_Mons`",
        ),
        (
            "tz empty",
            schedule("* * * * *", "", &["noop"]),
            "unknown time zone ``",
        ),
        (
            "tz offset",
            schedule("* * * * *", "+25:00", &["noop"]),
            "unknown time zone",
        ),
        // Huge and negative numbers.
        (
            "sleep_ms -1",
            enqueue("noop", &["--args", r#"{"sleep_ms":-1}"#]),
            "invalid value: integer `-1`, expected u64",
        ),
        (
            "sleep_ms 1e300",
            enqueue("noop", &["--args", r#"{"sleep_ms":1e300}"#]),
            "invalid type: floating point",
        ),
        (
            "sleep_ms u64::MAX+1",
            enqueue("noop", &["--args", r#"{"sleep_ms":18446744073709551616}"#]),
            "invalid type: floating point",
        ),
        (
            "sleep_ms u64::MAX",
            enqueue("noop", &["--args", r#"{"sleep_ms":18446744073709551615}"#]),
            "sleep_ms must be at most 600000",
        ),
        (
            "sleep_ms as text",
            enqueue("noop", &["--args", r#"{"sleep_ms":"10"}"#]),
            "invalid type: string",
        ),
        (
            "fail message too long",
            enqueue("noop", &["--args", &long_fail]),
            "fail message must be at most 1000 bytes",
        ),
        (
            "1001 inline records",
            enqueue("import", &["--args", &too_many_records]),
            "at most 1000 inline records",
        ),
        (
            "priority i64::MAX+1",
            enqueue("noop", &["--priority", "9223372036854775808"]),
            "number too large to fit in target type",
        ),
        (
            "priority i64::MIN-1",
            enqueue("noop", &["--priority=-9223372036854775809"]),
            "number too small to fit in target type",
        ),
        (
            "priority i32::MAX+1",
            enqueue("noop", &["--priority", "2147483648"]),
            "2147483648 is not in -2147483648..=2147483647",
        ),
        (
            "priority 1e3",
            enqueue("noop", &["--priority", "1e3"]),
            "invalid digit",
        ),
        (
            "jobs list limit overflow",
            strings(&["jobs", "list", "--limit", "9223372036854775808"]),
            "number too large",
        ),
        (
            "run-at garbage",
            enqueue("noop", &["--run-at", "yesterday"]),
            "invalid value 'yesterday' for '--run-at <RUN_AT>'",
        ),
        (
            "run-at month 13",
            enqueue("noop", &["--run-at", "2026-13-45T00:00:00Z"]),
            "invalid value",
        ),
        // JSON nested 10,000 deep, and other non-objects.
        (
            "args nested 10,000 deep",
            enqueue("noop", &["--args", &deep]),
            "--args is not valid JSON: recursion limit exceeded",
        ),
        (
            "args nested 10,000 deep in a field",
            enqueue("noop", &["--args", &deep_in_object]),
            "--args is not valid JSON: recursion limit exceeded",
        ),
        (
            "schedule args nested 10,000 deep",
            schedule("* * * * *", "UTC", &["noop", "--args", &deep]),
            "--args is not valid JSON: recursion limit exceeded",
        ),
        (
            "args an array",
            enqueue("noop", &["--args", "[]"]),
            "--args must be a JSON object",
        ),
        (
            "args truncated",
            enqueue("noop", &["--args", "{"]),
            "--args is not valid JSON",
        ),
        (
            "args lone surrogate",
            enqueue("noop", &["--args", r#"{"fail":"\ud800"}"#]),
            "--args is not valid JSON",
        ),
        // Tenant names.
        (
            "tenant name empty",
            strings(&["tenant", "add", "--name", ""]),
            "invalid tenant name",
        ),
        (
            "tenant name blank",
            strings(&["tenant", "add", "--name", "   "]),
            "invalid tenant name",
        ),
        (
            "tenant name 201 characters",
            strings(&["tenant", "add", "--name", &long_name]),
            "invalid tenant name",
        ),
        // An idempotency key the queue could not index: refused before the database sees it.
        (
            "idempotency key of 64 KiB",
            enqueue("noop", &["--idempotency-key", &huge_key]),
            "the idempotency key must be 1 to 200 characters",
        ),
    ];
    let mut failures = Vec::new();
    for (case, args, expected) in &cases {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = rig.cli(&argv);
        let err = stderr(&out);
        if out.status.success() || !err.contains(expected) || err.contains("panicked") {
            failures.push(format!(
                "{case}: exit {:?}, expected `{expected}` in stderr:\n{err}{}",
                out.status.code(),
                stdout(&out)
            ));
        }
    }
    // Arguments that are not UTF-8 at all.
    let os = |parts: &[&[u8]]| -> Vec<OsString> {
        parts
            .iter()
            .map(|p| OsString::from_vec(p.to_vec()))
            .collect()
    };
    let t_bytes = t.as_bytes();
    let not_utf8: Vec<(&str, Vec<OsString>)> = vec![
        (
            "args not UTF-8",
            os(&[
                b"enqueue",
                b"noop",
                b"--tenant",
                t_bytes,
                b"--args",
                b"{\"fail\":\"\xff\xfe\"}",
            ]),
        ),
        (
            "import file not UTF-8",
            os(&[
                b"enqueue",
                b"import",
                b"--tenant",
                t_bytes,
                b"--file",
                b"a\xffb.jsonl",
            ]),
        ),
        (
            "tenant name not UTF-8",
            os(&[b"tenant", b"add", b"--name", b"\xc3\x28"]),
        ),
        (
            "cron not UTF-8",
            os(&[
                b"schedule",
                b"add",
                b"--tenant",
                t_bytes,
                b"--cron",
                b"\xff * * * *",
                b"noop",
            ]),
        ),
    ];
    for (case, argv) in &not_utf8 {
        let out = rig.cli_os(argv);
        let err = stderr(&out);
        if out.status.success() || !err.contains("invalid UTF-8") || err.contains("panicked") {
            failures.push(format!("{case}: exit {:?}:\n{err}", out.status.code()));
        }
    }
    // NUL in a tenant name, a time zone and schedule arguments (through the library: argv
    // cannot carry a NUL byte).
    let owner = &db.settings.roles.owner;
    match tenant::add(&admin, owner, "Evil\0Corp").await {
        Ok(t) => failures.push(format!("NUL tenant name: created {t:?}")),
        Err(e) => eprintln!("hostile: NUL tenant name refused: {e}"),
    }
    let app = db.scope().await;
    let catalog = tenant_worker::jobs::declared::Catalog::new();
    for (case, cron, tz, args) in [
        ("NUL in the time zone", "* * * * *", "UTC\0", json!({})),
        (
            "NUL in the cron expression",
            "* * * * *\0",
            "UTC",
            json!({}),
        ),
        (
            "NUL in schedule arguments",
            "* * * * *",
            "UTC",
            json!({"fail": "a\u{0}b"}),
        ),
    ] {
        if let Ok(id) =
            store::add(&app, &db.kinds(catalog.clone()), a, cron, tz, "noop", &args).await
        {
            failures.push(format!("{case}: schedule {id} created"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        cases.len() + not_utf8.len() + 4,
        failures.join("\n\n")
    );

    // Nothing changed: no job, no schedule, no tenant, no record, no file.
    assert_eq!(fingerprint(&admin).await, before);
    assert_eq!(queue_states(&admin).await, BTreeMap::new());
    assert_eq!(files_under(&rig.exports), Vec::<PathBuf>::new());

    // SQL in a display name or a filter is just text: stored and shown verbatim, harmless.
    let evil = "Robert'); drop table tenants; --";
    let out = rig.cli(&["tenant", "add", "--name", evil]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = rig.cli(&["tenant", "list"]);
    assert!(stdout(&out).contains(evil), "{}", stdout(&out));
    // A name that is no rollup is refused (it used to print "no rollup rows" and exit 0).
    let out = rig.cli(&["rollups", "show", "--tenant", &t, "--name", SQLI]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains(&format!("no rollup named `{SQLI}`")),
        "{}",
        stderr(&out)
    );
    assert_eq!(record_count(&admin, a).await, 5);
}

#[tokio::test]
async fn hostile_jobs_put_straight_into_the_queue_are_rejected_by_the_worker_and_change_nothing() {
    let db = TestDb::new().await;
    let rig = Rig::new(
        &db,
        &[("TENANT_WORKER__WORKER__MAX_PAYLOAD_BYTES", "32768")],
    );
    let admin = db.admin().await;
    let (a, b) = (db.tenant("A").await, db.tenant("B").await);
    seed_properties(&admin, a, 5).await;
    seed_properties(&admin, b, 3).await;
    let before = fingerprint(&admin).await;
    let queue_name = db.settings.worker.queue.clone();
    let max = db.settings.worker.max_attempts as i32;
    let deep = nested(10_000);
    let big_import = json!({"records": (0..200).map(|i| json!({"kind": "property", "data": {"name": format!("{i:0>200}")}})).collect::<Vec<_>>()}).to_string();
    // (case, kind, exact args text, expected reason)
    let signed: Vec<(&str, &str, String, &str)> = vec![
        (
            "envelope over max_payload_bytes",
            "import",
            big_import,
            "over the limit of 32768",
        ),
        (
            "args nested 10,000 deep",
            "noop",
            deep.clone(),
            "invalid arguments for `noop`: [0]: invalid type: sequence",
        ),
        (
            "args nested 10,000 deep in a field",
            "noop",
            format!(r#"{{"fail":{deep}}}"#),
            "invalid arguments for `noop`: fail: invalid type: sequence",
        ),
        (
            "import file ../x",
            "import",
            r#"{"file":"../x"}"#.into(),
            "`file` must stay inside the tenant's inbox",
        ),
        (
            "import file /etc/passwd",
            "import",
            r#"{"file":"/etc/passwd"}"#.into(),
            "`file` must stay inside the tenant's inbox",
        ),
        (
            "import file a/../../x",
            "import",
            r#"{"file":"a/../../x"}"#.into(),
            "`file` must stay inside the tenant's inbox",
        ),
        (
            "NUL in import file",
            "import",
            r#"{"file":"x\u0000/../../etc/passwd"}"#.into(),
            "`file` must be a non-empty relative path",
        ),
        (
            "export source ../../etc",
            "export",
            r#"{"source":"../../etc"}"#.into(),
            "source `../../etc` is not a valid name",
        ),
        (
            "export source with SQL",
            "export",
            r#"{"source":"v_property; delete from records"}"#.into(),
            "is not a valid name",
        ),
        (
            "export since 1e300",
            "export",
            r#"{"source":"v_property","since":1e300}"#.into(),
            "invalid arguments for `export`",
        ),
        (
            "rollup name with SQL",
            "rollup",
            format!(r#"{{"name":"{SQLI}"}}"#),
            "unknown rollup",
        ),
        (
            "process name with SQL",
            "process",
            format!(r#"{{"name":"{SQLI}"}}"#),
            "unknown processing job",
        ),
        (
            "sleep_ms -1",
            "noop",
            r#"{"sleep_ms":-1}"#.into(),
            "invalid value: integer `-1`",
        ),
        (
            "sleep_ms 1e300",
            "noop",
            r#"{"sleep_ms":1e300}"#.into(),
            "invalid type: floating point",
        ),
        (
            "sleep_ms u64::MAX+1",
            "noop",
            r#"{"sleep_ms":18446744073709551616}"#.into(),
            "invalid type: floating point",
        ),
        (
            "sleep_ms u64::MAX",
            "noop",
            r#"{"sleep_ms":18446744073709551615}"#.into(),
            "sleep_ms must be at most 600000",
        ),
        (
            "1001 inline records",
            "import",
            format!(r#"{{"records":[{}]}}"#, vec!["{}"; 1001].join(",")),
            "at most 1000 inline records",
        ),
        (
            "kind with SQL",
            "noop'; drop table records; --",
            "{}".into(),
            "unknown job kind `noop'; drop table records; --`",
        ),
        (
            "args a string",
            "noop",
            r#""{}""#.into(),
            "invalid arguments for `noop`: invalid type: string",
        ),
    ];
    let mut cases: Vec<(&str, JobId, Vec<u8>, &str)> = Vec::new();
    for (case, kind, args, reason) in &signed {
        let job = JobId::new();
        cases.push((case, job, signed_envelope(&db, job, a, kind, args), reason));
    }
    // Bytes that no signature can save.
    let job = JobId::new();
    let mut text = signed_envelope(&db, job, a, "noop", r#"{"fail":"AB"}"#);
    let at = text.windows(2).position(|w| w == b"AB").unwrap();
    text[at..at + 2].copy_from_slice(b"\xff\xfe");
    cases.push((
        "invalid UTF-8 in a signed string",
        job,
        text,
        "payload is not a valid job envelope",
    ));
    cases.push((
        "64 KiB of noise",
        JobId::new(),
        vec![b'x'; 64 * 1024],
        "over the limit of 32768",
    ));
    for (_, job, payload, _) in &cases {
        insert_raw(&admin, &queue_name, &row_id(*job), payload, max).await;
    }
    // Well-formed jobs after them still run.
    let enqueuer = db.enqueuer().await;
    let mut good = Vec::new();
    for i in 0..20 {
        let t = if i % 2 == 0 { a } else { b };
        good.push(
            enqueuer
                .enqueue_job(t, NewJob::new("noop", json!({})))
                .await
                .unwrap()
                .id,
        );
    }
    let mut worker = rig.spawn(&["run", "--until-idle"], "hostile");
    let status = worker.wait(Duration::from_secs(120)).await;
    assert!(status.success(), "{}", worker.log_tail(30));
    assert!(
        !worker.log_text().contains("panicked"),
        "{}",
        worker.log_text()
    );
    assert_eq!(
        worker.summary(),
        (good.len() as u64, 0, cases.len() as u64, 0),
        "{}",
        worker.log_tail(40)
    );
    let queue_pool = db.queue().await;
    let runs = run_records(&admin).await;
    let mut failures = Vec::new();
    for (case, job, _, reason) in &cases {
        let info = queue::show(&queue_pool, &job.to_string()).await.unwrap();
        let error = info.error().unwrap_or_default();
        if info.state != "rejected" || info.attempts != 1 || !error.contains(reason) {
            failures.push(format!(
                "{case}: {} after {} attempt(s): {error}",
                info.state, info.attempts
            ));
        }
        assert!(!runs.contains_key(&job.0), "{case} took effect");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(done_count(&admin, &good).await, good.len() as i64);
    assert_eq!(runs.len(), good.len());
    assert_eq!(fingerprint(&admin).await, before);
    assert_eq!(files_under(&rig.exports), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn hostile_import_files_are_refused_or_reported_row_by_row_and_write_only_the_tenants_valid_rows()
 {
    let db = TestDb::new().await;
    let rig = Rig::new(&db, &[]);
    let admin = db.admin().await;
    let (a, b) = (db.tenant("Importer").await, db.tenant("Victim").await);
    seed_properties(&admin, a, 3).await;
    seed_properties(&admin, b, 3).await;
    let b_before: String = sqlx::query_scalar(
        "select md5(string_agg(r::text, '|' order by id)) from records r where tenant_id = $1",
    )
    .bind(b)
    .fetch_one(&admin)
    .await
    .unwrap();
    let inbox = rig.inbox(a);
    let victim = rig.inbox(b);
    let line = |name: &str| format!(r#"{{"kind":"property","data":{{"name":"{name}"}}}}"#);
    std::fs::write(victim.join("secret.jsonl"), line("B's secret") + "\n").unwrap();

    // Files the worker must refuse to open.
    std::os::unix::fs::symlink("/etc/passwd", inbox.join("passwd.jsonl")).unwrap();
    std::os::unix::fs::symlink(victim.join("secret.jsonl"), inbox.join("theirs.jsonl")).unwrap();
    std::os::unix::fs::symlink(&victim, inbox.join("sub")).unwrap();
    std::os::unix::fs::symlink("../../../../../../etc/hostname", inbox.join("rel.jsonl")).unwrap();
    nix::unistd::mkfifo(&inbox.join("fifo.jsonl"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    std::fs::create_dir(inbox.join("folder.jsonl")).unwrap();
    std::fs::write(inbox.join("empty.jsonl"), "").unwrap();
    // (file, expected error of the dead job)
    let refused: Vec<(&str, &str)> = vec![
        (
            "passwd.jsonl",
            "`passwd.jsonl` resolves outside the tenant's inbox",
        ),
        (
            "theirs.jsonl",
            "`theirs.jsonl` resolves outside the tenant's inbox",
        ),
        (
            "sub/secret.jsonl",
            "`sub/secret.jsonl` resolves outside the tenant's inbox",
        ),
        (
            "rel.jsonl",
            "`rel.jsonl` resolves outside the tenant's inbox",
        ),
        ("fifo.jsonl", "`fifo.jsonl` is not a regular file"),
        ("folder.jsonl", "`folder.jsonl` is not a regular file"),
        (
            "missing.jsonl",
            "cannot open `missing.jsonl` in the tenant's inbox",
        ),
        ("empty.jsonl", "`empty.jsonl` is empty (0 bytes)"),
    ];

    // Files with hostile rows: each bad row is reported with its line; all-or-nothing writes
    // nothing, skip-invalid writes exactly the good rows, always for the job's tenant.
    let sqli_data = json!({"name": "Robert'); drop table records; --", "city": "x' or '1'='1"});
    let mut hostile: Vec<u8> = Vec::new();
    let mut push = |bytes: &[u8]| {
        hostile.extend_from_slice(bytes);
        hostile.push(b'\n');
    };
    push(
        json!({"kind": "property", "external_id": "sqli", "data": sqli_data})
            .to_string()
            .as_bytes(),
    ); // 1: fine
    push(b"{\"kind\":\"property\",\"data\":{\"name\":\"\xff\xfe\"}}"); // 2
    push(b"{\"kind\":\"property\",\"data\":{\"name\":\"a\x00b\"}}"); // 3: a raw NUL byte
    push(nested(10_000).as_bytes()); // 4
    push(
        format!(
            r#"{{"kind":"property","data":{{"name":"{}"}}}}"#,
            "x".repeat(1 << 20)
        )
        .as_bytes(),
    ); // 5
    push(br#"{"kind":"property; drop table records","data":{"name":"x"}}"#); // 6
    push(
        format!(
            r#"{{"kind":"property","external_id":"{}","data":{{"name":"x"}}}}"#,
            "e".repeat(201)
        )
        .as_bytes(),
    ); // 7
    push(br#"{"kind":"property","data":{"name":"x","units":-1}}"#); // 8
    push(br#"{"kind":"property","data":{"name":"x","units":1e300}}"#); // 9
    push(br#"{"kind":"invoice","data":{"number":"1","amount":1e400,"customer_id":"00000000-0000-0000-0000-000000000000"}}"#); // 10
    push(
        format!(r#"{{"kind":"property","tenant_id":"{b}","data":{{"name":"planted in B"}}}}"#)
            .as_bytes(),
    ); // 11
    push(format!(r#"{{"kind":"property","tenant_id":"{SQLI}","data":{{"name":"x"}}}}"#).as_bytes()); // 12
    push(format!(r#"{{"kind":"property","tenant_id":"{a}","external_id":"own","data":{{"name":"mine"}}}}"#).as_bytes()); // 13: fine
    std::fs::write(inbox.join("hostile.jsonl"), &hostile).unwrap();
    let expected_errors: Vec<(u64, &str)> = vec![
        (2, "line is not valid UTF-8"),
        (3, "not valid JSON: control character"),
        (4, "not valid JSON: recursion limit exceeded"),
        (5, "line is longer than 1048576 bytes"),
        (6, "unknown kind `property; drop table records`"),
        (7, "external_id must be 1 to 200 characters"),
        (8, "`units` must be a whole number from 0"),
        (9, "`units` must be a whole number from 0"),
        (10, "not valid JSON: number out of range"),
        (11, "the record names another tenant"),
        (12, "the record names another tenant"),
    ];
    let mut csv: Vec<u8> = b"kind,data,external_id,tenant_id\n".to_vec();
    csv.extend_from_slice(b"property,\"{\"\"name\"\":\"\"\xff\"\"}\",c1,\n"); // 2
    csv.extend_from_slice(format!("property,\"{{\"\"name\"\":\"\"x\"\"}}\",c2,{b}\n").as_bytes()); // 3
    csv.extend_from_slice(b"property,not json; drop table records,c3,\n"); // 4
    csv.extend_from_slice(b"property,\"{\"\"name\"\":\"\"csv ok\"\"}\",c4,\n"); // 5: fine
    std::fs::write(inbox.join("hostile.csv"), &csv).unwrap();
    // A file named like an injection is just a file name.
    let odd_name = "x'; drop table records; --.jsonl";
    std::fs::write(inbox.join(odd_name), line("odd but fine") + "\n").unwrap();

    let t = a.to_string();
    let enqueue = |file: &str, more: &[&str]| -> JobId {
        let mut args = vec!["enqueue", "import", "--tenant", &t, "--file", file];
        args.extend(more);
        let out = rig.cli(&args);
        assert!(out.status.success(), "{file}: {}", stderr(&out));
        stdout(&out)
            .trim()
            .parse::<Uuid>()
            .map(JobId)
            .expect("a job id")
    };
    let refused_jobs: Vec<(JobId, &str, &str)> = refused
        .iter()
        .map(|(f, e)| (enqueue(f, &[]), *f, *e))
        .collect();
    let strict = enqueue("hostile.jsonl", &[]);
    let lenient = enqueue("hostile.jsonl", &["--mode", "skip-invalid"]);
    let csv_job = enqueue(
        "hostile.csv",
        &["--format", "csv", "--mode", "skip-invalid"],
    );
    let odd = enqueue(odd_name, &[]);

    let mut worker = rig.spawn(&["run", "--until-idle"], "imports");
    // (The FIFO has no writer: a worker that opened it would hang here.)
    let status = worker.wait(Duration::from_secs(120)).await;
    assert!(status.success(), "{}", worker.log_tail(30));
    assert!(
        !worker.log_text().contains("panicked"),
        "{}",
        worker.log_text()
    );

    let queue_pool = db.queue().await;
    let runs = run_records(&admin).await;
    for (job, file, error) in &refused_jobs {
        let info = queue::show(&queue_pool, &job.to_string()).await.unwrap();
        assert_eq!(
            (info.state.as_str(), info.attempts),
            ("dead", 1),
            "{file}: {info:?}"
        );
        let got = info.error().unwrap_or_default();
        assert!(got.contains(error), "{file}: `{got}`");
        assert!(!runs.contains_key(&job.0), "{file}");
    }
    let result = |job: JobId| {
        let (tenant, n, result) = runs.get(&job.0).cloned().expect("a run record");
        assert_eq!((tenant, n), (a, 1));
        result.unwrap()
    };
    let listed = |r: &Value| -> Vec<(u64, String)> {
        r["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["line"].as_u64().unwrap(),
                    e["reason"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let check_errors = |what: &str, r: &Value, expected: &[(u64, &str)]| {
        let got = listed(r);
        assert_eq!(got.len(), expected.len(), "{what}: {got:#?}");
        for ((line, reason), (want_line, want)) in got.iter().zip(expected) {
            assert!(
                line == want_line && reason.contains(want),
                "{what}: line {line} `{reason}`, expected line {want_line} `{want}`"
            );
        }
    };
    let r = result(strict);
    assert_eq!(
        (&r["written"], &r["inserted"], &r["rejected"]),
        (&json!(false), &json!(0), &json!(11)),
        "{r}"
    );
    check_errors("all-or-nothing", &r, &expected_errors);
    let r = result(lenient);
    assert_eq!(
        (&r["written"], &r["inserted"], &r["rejected"]),
        (&json!(true), &json!(2), &json!(11)),
        "{r}"
    );
    check_errors("skip-invalid", &r, &expected_errors);
    let r = result(csv_job);
    assert_eq!(
        (&r["written"], &r["inserted"], &r["rejected"]),
        (&json!(true), &json!(1), &json!(3)),
        "{r}"
    );
    check_errors(
        "csv",
        &r,
        &[
            (2, "a field is not valid UTF-8"),
            (3, "the record names another tenant"),
            (4, "`data` is not valid JSON"),
        ],
    );
    let r = result(odd);
    assert_eq!(
        (&r["written"], &r["inserted"]),
        (&json!(true), &json!(1)),
        "{r}"
    );

    // Exactly the valid rows landed, in the importer's tenant, byte for byte.
    let stored: Value = sqlx::query_scalar(
        "select data from records where tenant_id = $1 and external_id = 'sqli'",
    )
    .bind(a)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(stored, sqli_data);
    assert_eq!(record_count(&admin, a).await, 3 + 2 + 1 + 1);
    let b_after: String = sqlx::query_scalar(
        "select md5(string_agg(r::text, '|' order by id)) from records r where tenant_id = $1",
    )
    .bind(b)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(
        b_after, b_before,
        "the other tenant's records did not change"
    );
    assert_eq!(files_under(&rig.exports), Vec::<PathBuf>::new());
}

// ------------------------------------------------------------------------------------------
// 7. Soak (not in CI)
// ------------------------------------------------------------------------------------------

/// A small deterministic generator (no dependency, reproducible runs).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n
    }
}

/// One VmRSS sample of a worker process.
#[derive(Debug, Clone)]
struct Sample {
    label: String,
    age: Duration,
    rss_kib: u64,
    under_load: bool,
}

fn sample(procs: &[&Proc], under_load: bool, out: &mut Vec<Sample>) {
    for p in procs {
        if let Some(rss_kib) = p.rss_kib() {
            out.push(Sample {
                label: p.label.clone(),
                age: p.spawned.elapsed(),
                rss_kib,
                under_load,
            });
        }
    }
}

/// Two minutes of mixed load (exports, imports, rollups, processing, noops; 50 tenants) on
/// three worker processes, one of which is SIGKILLed and replaced every 15 s; then every
/// invariant of this file, and flat memory. `SOAK_SECS` overrides the duration.
#[tokio::test]
#[ignore = "soak (minutes): cargo test --test it faults::soak -- --ignored --nocapture"]
async fn soak() {
    const TENANTS: usize = 50;
    let load_for = Duration::from_secs(
        std::env::var("SOAK_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(120),
    );
    let kill_every = Duration::from_secs(15);
    let t0 = Instant::now();
    let cluster = tokio::task::spawn_blocking(EphemeralCluster::start)
        .await
        .unwrap()
        .expect("start a private PostgreSQL");
    let db = TestDb::on_server(&cluster.admin_url()).await;
    let rig = Rig::new(&db, &[]);
    let admin = db.admin().await;
    let mut tenants = Vec::new();
    for i in 0..TENANTS {
        tenants.push(
            tenant::add(&admin, &db.settings.roles.owner, &format!("Soak {i}"))
                .await
                .unwrap()
                .id,
        );
    }
    let ids: Vec<Uuid> = tenants.iter().map(|t| t.0).collect();
    for statement in [
        "insert into records (tenant_id, kind, data)
         select t, 'property', jsonb_build_object('name', 'Tower ' || g,
                'city', (array['Springfield', 'Shelbyville'])[1 + g % 2], 'units', g)
         from unnest($1::uuid[]) t, generate_series(1, 30) g",
        "insert into records (tenant_id, kind, data)
         select t, 'customer', jsonb_build_object('name', 'Customer ' || g,
                'email', 'User' || g || '@Example.test')
         from unnest($1::uuid[]) t, generate_series(1, 10) g",
        "insert into records (tenant_id, kind, data)
         select c.tenant_id, 'invoice', jsonb_build_object('customer_id', c.id,
                'number', 'INV-' || g, 'amount', g * 10.5, 'currency', 'EUR',
                'status', (array['open', 'paid', 'sent'])[1 + g % 3],
                'issued_on', to_char(current_date - g * 17, 'YYYY-MM-DD'),
                'due_on', to_char(current_date - g * 17 + 30, 'YYYY-MM-DD'))
         from records c, generate_series(1, 2) g
         where c.kind = 'customer' and c.tenant_id = any($1::uuid[])",
    ] {
        sqlx::query(statement)
            .bind(&ids)
            .execute(&admin)
            .await
            .unwrap();
    }
    let mut expected_records: HashMap<TenantId, i64> = HashMap::new();
    for t in &tenants {
        expected_records.insert(*t, record_count(&admin, *t).await);
    }
    let catalog = tenant_worker::jobs::declared::Catalog::load(&shipped_jobs(), true).unwrap();
    let enqueuer = db.enqueuer_with(catalog).await;

    let steady = rig.spawn(&["run"], "steady");
    let mut churn = [rig.spawn(&["run"], "churn"), rig.spawn(&["run"], "churn")];
    let mut retired: Vec<Proc> = Vec::new();
    let mut samples = Vec::new();
    let mut expected: HashMap<JobId, TenantId> = HashMap::new();
    let mut exports: Vec<(JobId, TenantId)> = Vec::new();
    let mut rng = Lcg(0x5eed);
    let mut seq = 0usize;
    let mut kills = 0;
    let start = Instant::now();
    let mut last_kill = start;
    let mut last_sample = start;
    let sources = [
        "v_property",
        "v_customer",
        "v_invoice",
        "property",
        "customer",
        "invoice",
        "properties_by_city",
        "overdue_invoices",
    ];
    let rollups = [
        None,
        Some("records_per_kind_per_day"),
        Some("invoices_per_month"),
        Some("revenue_by_month"),
    ];
    while start.elapsed() < load_for {
        let mut batch: Vec<(TenantId, NewJob)> = Vec::new();
        let pick = |rng: &mut Lcg| tenants[rng.next(TENANTS)];
        for _ in 0..8 {
            let t = pick(&mut rng);
            let args = if rng.next(4) == 0 {
                json!({"count": true})
            } else {
                json!({"sleep_ms": rng.next(30)})
            };
            batch.push((t, NewJob::new("noop", args)));
        }
        let t = pick(&mut rng);
        let source = sources[rng.next(sources.len())];
        let mut args = json!({"source": source, "gzip": rng.next(2) == 0});
        if !source.contains('_') || source.starts_with("v_") {
            args["format"] = json!(["csv", "jsonl"][rng.next(2)]);
        }
        batch.push((t, NewJob::new("export", args)));
        // An import of four records: two properties, a customer and its invoice.
        let t = pick(&mut rng);
        seq += 1;
        let customer = Uuid::new_v4();
        let records = json!([
            {"kind": "property", "external_id": format!("soak-{seq}-1"), "data": {"name": format!("Soak {seq}"), "units": seq % 40}},
            {"kind": "property", "external_id": format!("soak-{seq}-2"), "data": {"name": format!("Soak {seq} annex")}},
            {"kind": "customer", "external_id": format!("soak-{seq}-3"), "id": customer,
             "data": {"name": format!("Buyer {seq}"), "email": format!("Buyer{seq}@Soak.test")}},
            {"kind": "invoice", "external_id": format!("soak-{seq}-4"),
             "data": {"customer_id": customer, "number": format!("S-{seq}"), "amount": seq, "currency": "EUR",
                      "status": "open", "issued_on": "2026-01-15", "due_on": "2026-02-15"}},
        ]);
        *expected_records.get_mut(&t).unwrap() += 4;
        batch.push((t, NewJob::new("import", json!({"records": records}))));
        let t = pick(&mut rng);
        let mut args = json!({"full": rng.next(5) == 0});
        if let Some(name) = rollups[rng.next(rollups.len())] {
            args["name"] = json!(name);
        }
        batch.push((t, NewJob::new("rollup", args)));
        if seq.is_multiple_of(2) {
            let t = pick(&mut rng);
            batch.push((
                t,
                NewJob::new("process", json!({"name": "normalise_customer_emails"})),
            ));
        }
        let meta: Vec<(TenantId, bool)> = batch
            .iter()
            .map(|(t, j)| (*t, j.kind == "export"))
            .collect();
        let ids = enqueuer.enqueue_batch(batch).await.expect("enqueue");
        for (id, (t, is_export)) in ids.into_iter().zip(meta) {
            let id = id.id;
            expected.insert(id, t);
            if is_export {
                exports.push((id, t));
            }
        }
        if last_kill.elapsed() >= kill_every {
            let slot = kills % 2;
            churn[slot].kill9();
            let replacement = rig.spawn(&["run"], "churn");
            retired.push(std::mem::replace(&mut churn[slot], replacement));
            kills += 1;
            last_kill = Instant::now();
        }
        if last_sample.elapsed() >= Duration::from_secs(1) {
            sample(&[&steady, &churn[0], &churn[1]], true, &mut samples);
            last_sample = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let load_end = start.elapsed();
    eprintln!(
        "soak: {} jobs enqueued over {load_end:?}, {kills} kills; draining",
        expected.len()
    );
    let all: Vec<JobId> = expected.keys().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(600);
    while done_count(&admin, &all).await < all.len() as i64 {
        let stuck: Vec<(String, String)> = sqlx::query_as(
            "select id, coalesce(last_result::text, '') from apalis.jobs
             where status = 'Killed' or (status = 'Failed' and attempts >= max_attempts)",
        )
        .fetch_all(&admin)
        .await
        .unwrap();
        assert!(stuck.is_empty(), "jobs failed for good: {stuck:#?}");
        assert!(
            Instant::now() < deadline,
            "not drained: {:?}",
            queue_states(&admin).await
        );
        if last_sample.elapsed() >= Duration::from_secs(1) {
            sample(&[&steady, &churn[0], &churn[1]], false, &mut samples);
            last_sample = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // One last rollup per tenant brings every bucket up to date.
    let finals: Vec<JobId> = enqueuer
        .enqueue_batch(
            tenants
                .iter()
                .map(|t| (*t, NewJob::new("rollup", json!({}))))
                .collect(),
        )
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    expected.extend(finals.iter().copied().zip(tenants.iter().copied()));
    wait_until!(
        Duration::from_secs(300),
        Duration::from_millis(200),
        "the final rollups",
        done_count(&admin, &finals).await == finals.len() as i64
    );
    eprintln!("soak: drained at {:?}", t0.elapsed());

    // Every job done, once, for its tenant.
    assert_each_done_once(&admin, &expected).await;
    // Every import took effect once: records per tenant add up, no external id twice.
    for t in &tenants {
        let (n, ext, distinct): (i64, i64, i64) = sqlx::query_as(
            "select count(*), count(external_id),
                    count(distinct (kind, external_id)) filter (where external_id is not null)
             from records where tenant_id = $1",
        )
        .bind(t)
        .fetch_one(&admin)
        .await
        .unwrap();
        assert_eq!(n, expected_records[t], "records of tenant {t}");
        assert_eq!(ext, distinct, "an external id twice in tenant {t}");
    }
    // Rollups agree with the records (incremental runs interrupted by kills included).
    let mismatched: Vec<(TenantId, i64, i64)> = sqlx::query_as(
        "select t.id,
                (select count(*) from records r where r.tenant_id = t.id),
                (select coalesce(sum(count), 0)::bigint from rollups u
                 where u.tenant_id = t.id and u.name = 'records_per_kind_per_day')
         from tenants t
         where (select count(*) from records r where r.tenant_id = t.id)
               <> (select coalesce(sum(count), 0) from rollups u
                   where u.tenant_id = t.id and u.name = 'records_per_kind_per_day')",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(mismatched.is_empty(), "rollups out of date: {mismatched:?}");
    // Every export complete and its tenant's alone; no temporary file anywhere.
    let runs = run_records(&admin).await;
    let others: Vec<String> = tenants.iter().map(|t| t.to_string()).collect();
    for (job, t) in &exports {
        let result = runs[&job.0].2.clone().unwrap();
        let manifest: Manifest = serde_json::from_value(result.clone()).unwrap();
        let path = PathBuf::from(result["path"].as_str().unwrap());
        let (bytes, sha256) = hash_file(&path).unwrap();
        assert_eq!(
            (manifest.bytes, manifest.sha256),
            (bytes, sha256),
            "{path:?}"
        );
        assert_eq!(manifest.tenant_id, t.to_string());
        let raw = std::fs::read(&path).unwrap();
        let text = if manifest.gzip {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&raw[..]), &mut s)
                .unwrap();
            s
        } else {
            String::from_utf8(raw).unwrap()
        };
        for other in others.iter().filter(|o| **o != t.to_string()) {
            assert!(
                !text.contains(other.as_str()),
                "{path:?} holds rows of {other}"
            );
        }
    }
    let leftovers: Vec<PathBuf> = files_under(&rig.exports)
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // Memory: the long-lived process did not grow under load, and restarted processes of the
    // same age weigh the same at the start and at the end of the run.
    let under: Vec<&Sample> = samples.iter().filter(|s| s.under_load).collect();
    let steady_samples: Vec<&&Sample> = under.iter().filter(|s| s.label == steady.label).collect();
    let first = steady_samples
        .iter()
        .find(|s| s.age >= Duration::from_secs(20))
        .expect("a steady sample after warm-up");
    let last = steady_samples.last().unwrap();
    let at_age = |label: &str| {
        under
            .iter()
            .filter(|s| s.label == label && s.age >= Duration::from_secs(8))
            .min_by_key(|s| s.age)
            .copied()
    };
    let mut churn_procs: Vec<&Proc> = retired.iter().chain(churn.iter()).collect();
    churn_procs.sort_by_key(|p| p.spawned);
    let churned: Vec<&Sample> = churn_procs
        .iter()
        .filter_map(|p| at_age(&p.label))
        .collect();
    eprintln!(
        "soak memory: steady {} KiB at {:?} -> {} KiB at {:?}; churned at ~8 s: {:?}",
        first.rss_kib,
        first.age,
        last.rss_kib,
        last.age,
        churned
            .iter()
            .map(|s| (s.label.as_str(), s.rss_kib))
            .collect::<Vec<_>>()
    );
    let grew = |from: u64, to: u64| to > from + from / 2 + 32 * 1024;
    assert!(!grew(first.rss_kib, last.rss_kib), "the steady worker grew");
    if let (Some(a), Some(b)) = (churned.first(), churned.last()) {
        assert!(
            !grew(a.rss_kib, b.rss_kib),
            "restarted workers grew: {a:?} -> {b:?}"
        );
    }
    println!(
        "SOAK: {} jobs over {load_end:?} on 3 workers with {kills} SIGKILLs: all done once; \
         {} exports, records and rollups add up; steady worker RSS {} -> {} KiB",
        expected.len(),
        exports.len(),
        first.rss_kib,
        last.rss_kib
    );

    let mut workers = vec![steady];
    workers.extend(churn);
    for w in &workers {
        w.terminate();
    }
    for w in &mut workers {
        w.wait(Duration::from_secs(60)).await;
    }
    drop(workers);
    drop(retired);
    admin.close().await;
    drop(enqueuer);
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
}

// ------------------------------------------------------------------------------------------
// Regression tests for bugs this suite found (each failed before its fix)
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn bug_a_nul_character_in_a_rejection_reason_or_error_stalls_the_whole_queue() {
    let db = TestDb::new().await;
    let rig = Rig::new(&db, &[]);
    let admin = db.admin().await;
    let a = db.tenant("A").await;
    // 1. Anyone who may insert into apalis.jobs (the queue role; no key needed): the key id
    //    is echoed into the rejection reason before any signature is checked.
    let unsigned = JobId::new();
    let payload = format!(
        r#"{{"v":1,"job_id":"{unsigned}","tenant_id":"{a}","kind":"noop","args":{{}},"issued_at":1,"expires_at":2,"key_id":"k\u0000","sig":"AAAA"}}"#
    );
    insert_raw(
        &admin,
        &db.settings.worker.queue,
        &row_id(unsigned),
        payload.as_bytes(),
        3,
    )
    .await;
    // 2. An ordinary job through the CLI: a NUL in noop's `fail` message is accepted.
    let out = rig.cli(&[
        "enqueue",
        "noop",
        "--tenant",
        &a.to_string(),
        "--args",
        r#"{"fail":"nul \u0000 here"}"#,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let failing = JobId(stdout(&out).trim().parse().unwrap());
    let enqueuer = db.enqueuer().await;
    let mut good = Vec::new();
    for _ in 0..10 {
        good.push(
            enqueuer
                .enqueue_job(a, NewJob::new("noop", json!({})))
                .await
                .unwrap()
                .id,
        );
    }
    let mut worker = rig.spawn(&["run", "--until-idle"], "nul");
    // Today: the run never ends; the log repeats "unsupported Unicode escape sequence",
    // "worker failed (database unavailable?); restarting", "released jobs", and the good jobs
    // run again and again ("job already took effect") without ever being marked done.
    let status = worker.wait(Duration::from_secs(60)).await;
    assert!(status.success(), "{}", worker.log_tail(20));
    assert_eq!(done_count(&admin, &good).await, good.len() as i64);
    let queue_pool = db.queue().await;
    let info = queue::show(&queue_pool, &unsigned.to_string())
        .await
        .unwrap();
    assert_eq!(info.state, "rejected", "{info:?}");
    // `--until-idle` does not wait out retry delays: the failing job is retrying or dead, with
    // its error stored.
    let info = queue::show(&queue_pool, &failing.to_string())
        .await
        .unwrap();
    assert!(
        matches!(info.state.as_str(), "retrying" | "dead"),
        "{info:?}"
    );
    assert!(
        info.error().unwrap_or_default().contains("here"),
        "{info:?}"
    );
}

#[tokio::test]
async fn bug_enqueue_accepts_a_job_every_worker_will_reject_as_too_large() {
    let db = TestDb::new().await;
    let a = db.tenant("A").await;
    // 1,000 inline records is within the import's own limit; the envelope (~350 KB) is not
    // within worker.max_payload_bytes (256 KiB by default, the same settings the Enqueuer got).
    let records: Vec<Value> = (0..1_000)
        .map(|i| json!({"kind": "property", "external_id": format!("r{i}"), "data": {"name": "x".repeat(300)}}))
        .collect();
    let result = db
        .enqueuer()
        .await
        .enqueue_job(a, NewJob::new("import", json!({"records": records})))
        .await;
    assert!(
        matches!(
            result,
            Err(queue::Error::Invalid(envelope::Rejection::TooLarge { .. }))
        ),
        "enqueued a job over worker.max_payload_bytes: {result:?}"
    );
}

#[test]
fn bug_five_field_cron_weekdays_are_one_day_off_standard_cron() {
    use chrono::{Datelike as _, TimeZone as _, Weekday};
    // Thursday 2026-11-26: the latest "06:00 on Monday" before it is Monday 2026-11-23.
    let now = Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 0).unwrap();
    let monday = schedule::cron::parse_cron("0 6 * * 1").unwrap();
    let fire = schedule::cron::latest_fire_before(&monday, chrono_tz::UTC, now).unwrap();
    assert_eq!(fire.weekday(), Weekday::Mon, "`0 6 * * 1` fired on {fire}");
    assert!(
        schedule::cron::parse_cron("0 6 * * 0").is_ok(),
        "0 = Sunday in standard cron"
    );
    let seven = schedule::cron::parse_cron("0 6 * * 7").unwrap();
    let fire = schedule::cron::latest_fire_before(&seven, chrono_tz::UTC, now).unwrap();
    assert_eq!(fire.weekday(), Weekday::Sun, "`0 6 * * 7` fired on {fire}");
}

#[tokio::test]
async fn bug_an_import_row_with_a_nul_in_its_kind_fails_the_whole_import() {
    let db = TestDb::new().await;
    let rig = Rig::new(&db, &[]);
    let admin = db.admin().await;
    let a = db.tenant("A").await;
    std::fs::write(
        rig.inbox(a).join("nul.jsonl"),
        concat!(
            r#"{"kind":"property","data":{"name":"fine"}}"#,
            "\n",
            r#"{"kind":"prop\u0000erty","data":{"name":"bad"}}"#,
            "\n",
        ),
    )
    .unwrap();
    let out = rig.cli(&[
        "enqueue",
        "import",
        "--tenant",
        &a.to_string(),
        "--file",
        "nul.jsonl",
        "--mode",
        "skip-invalid",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let job = JobId(stdout(&out).trim().parse().unwrap());
    let mut worker = rig.spawn(&["run", "--until-idle"], "nul-import");
    worker.wait(Duration::from_secs(60)).await;
    let info = queue::show(&db.queue().await, &job.to_string())
        .await
        .unwrap();
    assert_eq!(info.state, "done", "{:?}", info.error());
    let r = run_records(&admin).await[&job.0].2.clone().unwrap();
    assert_eq!(
        (&r["inserted"], &r["rejected"]),
        (&json!(1), &json!(1)),
        "{r}"
    );
}
