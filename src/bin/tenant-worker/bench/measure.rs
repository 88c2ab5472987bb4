//! Child processes and their peak memory, and psql.

use anyhow::ensure;
use chrono::Utc;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use serde::Serialize;

use super::CHILD_TIMEOUT;
use super::report::tail;

// ---------------------------------------------------------------------------------------------
// Child processes and peak RSS
// ---------------------------------------------------------------------------------------------

/// Peak RSS so far (`VmHWM`, KiB) of a running process; `None` once it exited.
pub(crate) fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

pub(crate) fn children_maxrss_kib() -> u64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map(|u| u.max_rss().max(0) as u64)
        .unwrap_or(0)
}

/// A finished child process.
#[derive(Debug, Serialize)]
pub(crate) struct ChildRun {
    pub(crate) wall_secs: f64,
    pub(crate) peak_rss_kib: u64,
    pub(crate) rss_method: String,
    pub(crate) sampled_vm_hwm_kib: u64,
    pub(crate) rusage_children_maxrss_before_kib: u64,
    pub(crate) rusage_children_maxrss_after_kib: u64,
    #[serde(skip)]
    pub(crate) output: String,
}

/// Runs `cmd` to completion with output to `log`, measuring its peak RSS (see the module docs).
pub(crate) async fn run_measured(mut cmd: tokio::process::Command, log: &Path) -> Result<ChildRun> {
    let out = std::fs::File::create(log)?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true);
    let before = children_maxrss_kib();
    let start = Instant::now();
    let mut child = cmd.spawn().context("starting a child process")?;
    let pid = child.id().context("the child has no pid")?;
    let mut sampled = 0u64;
    let status = loop {
        if let Some(v) = vm_hwm_kib(pid) {
            sampled = sampled.max(v);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > CHILD_TIMEOUT {
            let _ = child.kill().await;
            bail!("a child process ran longer than {CHILD_TIMEOUT:?}; killed");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let wall_secs = start.elapsed().as_secs_f64();
    let after = children_maxrss_kib();
    let output = std::fs::read_to_string(log).unwrap_or_default();
    ensure!(
        status.success(),
        "child process failed ({status}); its output:\n{}",
        tail(&output, 40)
    );
    let (peak, method) = if after > before {
        (
            after.max(sampled),
            "getrusage(RUSAGE_CHILDREN).ru_maxrss rose when this child was reaped: exact",
        )
    } else {
        (
            sampled,
            "VmHWM from /proc/<pid>/status sampled every 10 ms (an earlier child had a larger \
             peak, so the children's ru_maxrss did not rise)",
        )
    };
    Ok(ChildRun {
        wall_secs,
        peak_rss_kib: peak,
        rss_method: method.to_string(),
        sampled_vm_hwm_kib: sampled,
        rusage_children_maxrss_before_kib: before,
        rusage_children_maxrss_after_kib: after,
        output,
    })
}

/// With `TENANT_WORKER_BENCH_LOGS=DIR`, child process logs are kept there (the child inherits
/// `RUST_LOG`, so `RUST_LOG=sqlx::query=debug` shows each statement's time).
pub(crate) fn keep_log(log: &Path) {
    if let Some(dir) = std::env::var_os("TENANT_WORKER_BENCH_LOGS") {
        let dir = PathBuf::from(dir);
        let name = format!(
            "{}-{}",
            Utc::now().format("%H%M%S%.3f"),
            log.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        if std::fs::create_dir_all(&dir).is_ok() {
            let _ = std::fs::copy(log, dir.join(name));
        }
    }
}

pub(crate) fn find_psql() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("psql"))
            .find(|p| p.is_file())
    });
    on_path
        .or_else(|| {
            tenant_worker::embedded::find_binaries()
                .ok()
                .map(|d| d.join("psql"))
                .filter(|p| p.is_file())
        })
        .or_else(|| Some(PathBuf::from("/usr/bin/psql")).filter(|p| p.is_file()))
}

/// "Time: 1234.567 ms (00:01.235)" -> 1234.567
pub(crate) fn parse_psql_time(line: &str) -> Option<f64> {
    let rest = line.trim().strip_prefix("Time:")?;
    rest.split_whitespace().next()?.parse().ok()
}

pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
