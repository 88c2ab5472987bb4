//! What a running job knows about its run: [`JobContext`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::ids::{JobId, TenantId};

/// How far a job has got: `done` of `total` units (rows, files, ...), with a short message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Units done so far.
    pub done: u64,
    /// Units in all, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// What the job is doing, in a few words (never record contents or secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Where a job's progress goes (the worker stores it with the job, outside the job's
/// transaction, so it is visible while the job runs).
pub(crate) trait ProgressSink: Send + Sync {
    /// Stores `progress` for the job whose queue row is `row`.
    fn store(&self, row: &str, progress: &Progress);
}

/// Progress is stored at most this often per job; what is reported in between is kept and
/// stored with the next report or when the job ends.
pub(crate) const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

struct ProgressState {
    sink: Arc<dyn ProgressSink>,
    row: String,
    /// When progress was last stored, and what was reported since and not stored yet.
    throttle: Mutex<(Option<Instant>, Option<Progress>)>,
}

/// What the worker tells a job about its run. It holds no path to the database: the job's
/// data access is the scoped transaction it is handed beside this.
#[derive(Clone)]
pub struct JobContext {
    tenant_id: TenantId,
    job_id: JobId,
    attempt: u32,
    max_attempts: u32,
    deadline: Instant,
    cancel: CancellationToken,
    progress: Option<Arc<ProgressState>>,
}

impl std::fmt::Debug for JobContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobContext")
            .field("tenant_id", &self.tenant_id)
            .field("job_id", &self.job_id)
            .field("attempt", &self.attempt)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

impl JobContext {
    /// A context for one run (the worker makes these; so can tests of a job's body).
    pub fn new(
        tenant_id: TenantId,
        job_id: JobId,
        attempt: u32,
        max_attempts: u32,
        timeout: Duration,
    ) -> Self {
        Self {
            tenant_id,
            job_id,
            attempt,
            max_attempts,
            deadline: Instant::now() + timeout,
            cancel: CancellationToken::new(),
            progress: None,
        }
    }

    /// Reports progress through `sink` for the queue row `row`.
    pub(crate) fn with_progress(mut self, sink: Arc<dyn ProgressSink>, row: String) -> Self {
        self.progress = Some(Arc::new(ProgressState {
            sink,
            row,
            throttle: Mutex::new((None, None)),
        }));
        self
    }

    /// Cancelled by `token` as well.
    pub(crate) fn with_cancellation(mut self, token: CancellationToken) -> Self {
        self.cancel = token;
        self
    }

    /// The verified tenant this run acts for (the one its transaction is scoped to).
    pub fn tenant_id(&self) -> TenantId {
        self.tenant_id
    }

    /// The job's id.
    pub fn job_id(&self) -> JobId {
        self.job_id
    }

    /// This run's attempt, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The attempts the job has in all.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// When the run's time limit ends: the worker rolls the run back at this instant.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// True once the worker wants the job to stop early (it is shutting down). A long job can
    /// check this between steps and return, e.g., [`crate::JobError::snooze`].
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves once [`JobContext::is_cancelled`] is true.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// Reports progress: `done` units of `total` (`None` or a number). Cheap to call often:
    /// it is stored at most twice a second, outside the job's transaction, and shown by
    /// `tenant-worker jobs show` while the job runs.
    pub fn progress(&self, done: u64, total: impl Into<Option<u64>>) {
        self.report(Progress {
            done,
            total: total.into(),
            message: None,
        });
    }

    /// Reports progress with a short message.
    pub fn report(&self, progress: Progress) {
        let Some(state) = &self.progress else {
            return;
        };
        let now = Instant::now();
        let due = {
            let mut throttle = state.throttle.lock().unwrap_or_else(|e| e.into_inner());
            match throttle.0 {
                Some(last) if now.duration_since(last) < PROGRESS_INTERVAL => {
                    throttle.1 = Some(progress);
                    None
                }
                _ => {
                    *throttle = (Some(now), None);
                    Some(progress)
                }
            }
        };
        if let Some(p) = due {
            state.sink.store(&state.row, &p);
        }
    }

    /// The progress reported last and not stored yet (the worker stores it with the outcome).
    pub(crate) fn unsaved_progress(&self) -> Option<Progress> {
        let state = self.progress.as_ref()?;
        let mut throttle = state.throttle.lock().unwrap_or_else(|e| e.into_inner());
        throttle.1.take()
    }
}
