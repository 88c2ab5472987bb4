//! Writing outcomes back to the queue, batched ([`Acker`]), and storing the progress jobs
//! report while they run ([`ProgressWriter`]).

use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;

use crate::job::Progress;
use crate::job::ProgressSink;
use crate::queue::RowOutcome;

/// How one delivery of a job ended, as written back to its row: what apalis's own ack writes
/// (`status`, `attempts`, `last_result` as `{"Ok": ..}` / `{"Err": ..}`, `done_at`), plus the
/// new `run_at` of a job that runs again and the job's last progress, in the same statement.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Ack {
    /// Row id (the ULID).
    pub id: String,
    /// The worker that fetched it; a row since re-enqueued and taken by another is left alone.
    pub worker: String,
    /// `Done`, `Failed`, `Killed`, or `Pending` (snoozed).
    pub status: &'static str,
    /// The attempts to record: the 1-based attempt that just ended, or one less for a snooze
    /// (which does not count).
    pub attempt: u32,
    /// `{"Ok": result}` or `{"Err": message}`.
    pub result: Value,
    /// For a job that runs again: fetch it only after this many milliseconds.
    pub again_in_ms: Option<f64>,
    /// The job's progress reported last and not stored yet (JSON text).
    pub progress: Option<String>,
}

impl Ack {
    /// The ack of attempt `attempt` of row `id`, fetched by `worker`, ending with `outcome`.
    pub(crate) fn new(
        id: String,
        worker: &str,
        attempt: u32,
        outcome: &RowOutcome,
        progress: Option<Progress>,
    ) -> Self {
        let attempt = match outcome {
            RowOutcome::Snoozed(_) => attempt.saturating_sub(1),
            _ => attempt,
        };
        Self {
            id,
            worker: worker.to_string(),
            status: outcome.status(),
            attempt,
            result: outcome.last_result(),
            again_in_ms: outcome.run_again_in().map(|d| d.as_secs_f64() * 1000.0),
            progress: progress.and_then(|p| serde_json::to_string(&p).ok()),
        }
    }
}

/// The acks of every job that ended while the previous write was in flight, in one statement.
/// A snoozed job goes back to `Pending` (no `done_at`, no lock) for its new `run_at`.
const ACK: &str = "
with d as (
    select * from jsonb_to_recordset($1::jsonb)
        as d(id text, worker text, status text, attempt integer, result jsonb,
             again_in_ms double precision, progress text)
)
update apalis.jobs j
set status = d.status, attempts = d.attempt, last_result = d.result,
    done_at = case when d.status = 'Pending' then null else now() end,
    lock_by = case when d.status = 'Pending' then null else j.lock_by end,
    run_at = case when d.again_in_ms is null then j.run_at
                  else now() + d.again_in_ms * interval '1 millisecond' end,
    metadata = case when d.progress is null then j.metadata
                    else coalesce(j.metadata, ''::hstore) || hstore('progress', d.progress) end
from d
where j.id = d.id and j.lock_by = d.worker";

type AckReply = tokio::sync::oneshot::Sender<Result<(), String>>;
type AckItem = (Vec<Ack>, AckReply);

/// Writes job outcomes back to the queue, batched: one writer per worker process takes every
/// ack that arrived while its previous statement ran (group commit), so acks cost one round
/// trip and one commit per batch and never wait behind the fetch, as apalis's own acks do in
/// its backend's single state machine. A handler returns only once its ack is written, so a
/// worker that stops has written every ack of the jobs it finished.
#[derive(Debug)]
pub(crate) struct Acker {
    pool: PgPool,
    writer: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<AckItem>>>,
}

impl Acker {
    /// An acker writing through `pool` (the queue role's).
    pub(crate) fn new(pool: PgPool) -> Self {
        Self {
            pool,
            writer: std::sync::Mutex::new(None),
        }
    }

    /// Writes `acks` (with whatever else is waiting) and returns once they are committed.
    ///
    /// # Errors
    /// Only when the outcomes cannot be encoded: database errors are retried until the write
    /// succeeds (or nobody waits any more).
    pub(crate) async fn ack(&self, acks: Vec<Ack>) -> Result<(), String> {
        let (reply, done) = tokio::sync::oneshot::channel();
        {
            let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            let unsent = match writer.as_ref() {
                Some(w) => w.send((acks, reply)).err().map(|e| e.0),
                None => Some((acks, reply)),
            };
            if let Some(item) = unsent {
                let (w, queue) = tokio::sync::mpsc::unbounded_channel();
                let _ = w.send(item);
                *writer = Some(w);
                tokio::spawn(write_acks(self.pool.clone(), queue));
            }
        }
        done.await
            .unwrap_or_else(|_| Err("the ack writer stopped".into()))
    }
}

async fn write_acks(pool: PgPool, mut queue: tokio::sync::mpsc::UnboundedReceiver<AckItem>) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match queue.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let rows: Vec<&Ack> = batch.iter().flat_map(|(a, _)| a).collect();
        let json = match serde_json::to_value(&rows) {
            Ok(json) => json,
            Err(e) => {
                for (_, reply) in batch {
                    let _ = reply.send(Err(e.to_string()));
                }
                continue;
            }
        };
        // A database that went away must not lose an outcome: retry, backing off, for as long
        // as some handler still waits for it (a worker cut off by its shutdown timeout stops
        // waiting; `run` then releases its jobs, or orphan recovery does).
        let mut pause = Duration::from_millis(50);
        let written = loop {
            match sqlx::query(ACK).bind(&json).execute(&pool).await {
                Ok(_) => break Ok(()),
                Err(e) if batch.iter().all(|(_, reply)| reply.is_closed()) => {
                    break Err(e.to_string());
                }
                Err(e) => {
                    tracing::warn!(error.message = %e, jobs = rows.len(), "could not record job outcomes in the queue; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        };
        for (_, reply) in batch {
            let _ = reply.send(written.clone());
        }
    }
}

/// Stores the progress running jobs report, batched like [`Acker`]: one writer per worker
/// process takes every report that arrived while its previous statement ran. Losing a report
/// (the database is away) loses nothing but a moment of display: the next one replaces it.
#[derive(Debug)]
pub(crate) struct ProgressWriter {
    sender: tokio::sync::mpsc::UnboundedSender<(String, String)>,
}

impl ProgressWriter {
    /// A writer through `pool` (the queue role's). Must be called inside a tokio runtime.
    pub(crate) fn new(pool: PgPool) -> Self {
        let (sender, queue) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(write_progress(pool, queue));
        Self { sender }
    }
}

impl ProgressSink for ProgressWriter {
    fn store(&self, row: &str, progress: &Progress) {
        if let Ok(text) = serde_json::to_string(progress) {
            let _ = self.sender.send((row.to_string(), text));
        }
    }
}

async fn write_progress(
    pool: PgPool,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
) {
    while let Some(first) = queue.recv().await {
        let mut latest = std::collections::HashMap::from([first]);
        while latest.len() < 1024 {
            match queue.try_recv() {
                Ok((row, text)) => {
                    latest.insert(row, text);
                }
                Err(_) => break,
            }
        }
        let (rows, texts): (Vec<String>, Vec<String>) = latest.into_iter().unzip();
        // Only rows still running: a late report must not touch a finished job.
        let written = sqlx::query(
            "update apalis.jobs j
             set metadata = coalesce(j.metadata, ''::hstore) || hstore('progress', d.progress)
             from unnest($1::text[], $2::text[]) as d(id, progress)
             where j.id = d.id and j.status = 'Running'",
        )
        .bind(&rows)
        .bind(&texts)
        .execute(&pool)
        .await;
        if let Err(e) = written {
            tracing::debug!(error.message = %e, jobs = rows.len(), "could not store job progress");
        }
    }
}
