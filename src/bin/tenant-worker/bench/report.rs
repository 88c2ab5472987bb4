//! Numbers and the results table.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::json;

use chrono::{DateTime, Utc};

use serde::Serialize;

use super::Scenario;

/// One line of the results table.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    pub(crate) scenario: &'static str,
    pub(crate) metric: String,
    pub(crate) unit: &'static str,
    pub(crate) ours: Option<f64>,
    pub(crate) baseline: Option<f64>,
    /// What the baseline column holds.
    pub(crate) baseline_is: String,
    pub(crate) ratio: Option<f64>,
    pub(crate) target: String,
    pub(crate) met: Option<bool>,
}

impl Row {
    pub(crate) fn new(scenario: Scenario, metric: &str, unit: &'static str) -> Self {
        Row {
            scenario: scenario.name(),
            metric: metric.to_string(),
            unit,
            ours: None,
            baseline: None,
            baseline_is: String::new(),
            ratio: None,
            target: "-".into(),
            met: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Numbers and the table
// ---------------------------------------------------------------------------------------------

/// Nearest-rank percentile (`q` in 0..=1) of unsorted values.
pub(crate) fn percentile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

pub(crate) fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

pub(crate) fn secs_between(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    (b - a).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

/// (ms since the first enqueue, latency in ms) pairs as JSON.
pub(crate) fn slowest_json(slowest: &[(f64, f64)]) -> Vec<serde_json::Value> {
    slowest
        .iter()
        .map(|(at, ms)| json!({ "at_ms": at, "latency_ms": ms }))
        .collect()
}

pub(crate) fn ms_between(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    secs_between(a, b) * 1000.0
}

pub(crate) fn opt_secs(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<f64> {
    Some(secs_between(a?, b?))
}

/// `total` split into `parts` nearly equal shares; share `i`.
pub(crate) fn split(total: i64, parts: usize, i: usize) -> i64 {
    let parts = parts as i64;
    total / parts + i64::from((i as i64) < total % parts)
}

pub(crate) fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

pub(crate) fn path_string(p: Option<&Path>) -> String {
    p.map(|p| p.display().to_string()).unwrap_or_default()
}

pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// 1234567 -> "1,234,567"; 5000000 -> "5M" style only for round millions.
pub(crate) fn human(v: f64) -> String {
    if v >= 1e6 && (v / 1e6).fract() == 0.0 {
        return format!("{}M", v / 1e6);
    }
    thousands(v.round() as i64)
}

pub(crate) fn thousands(v: i64) -> String {
    let digits = v.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if v < 0 { format!("-{out}") } else { out }
}

pub(crate) fn value(v: Option<f64>, unit: &str) -> String {
    let Some(v) = v else {
        return "-".into();
    };
    match unit {
        "jobs/s" | "rows/s" | "tx/s" => format!("{} {unit}", thousands(v.round() as i64)),
        "ms" if v < 10.0 => format!("{v:.2} ms"),
        "ms" => format!("{v:.1} ms"),
        "s" if v < 1.0 => format!("{:.0} ms", v * 1000.0),
        "s" => format!("{v:.2} s"),
        "MiB" => format!("{v:.1} MiB"),
        other => format!("{v:.3} {other}"),
    }
}

pub(crate) fn render_line(r: &Row) -> String {
    format!(
        "{} / {}: ours {}, baseline {} ({}), ratio {}, target {}, met {}",
        r.scenario,
        r.metric,
        value(r.ours, r.unit),
        value(r.baseline, r.unit),
        if r.baseline_is.is_empty() {
            "-"
        } else {
            &r.baseline_is
        },
        r.ratio.map(|x| format!("{x:.2}×")).unwrap_or("-".into()),
        r.target,
        met(r.met)
    )
}

pub(crate) fn met(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    }
}

/// At quick sizes a row's target (set for the full sizes) means nothing: the row keeps the
/// target's text, marked, and is judged neither way.
pub(crate) fn not_judged_at_quick_sizes(rows: &mut [Row]) {
    for row in rows {
        if row.met.take().is_some() {
            row.target = format!("{} (full sizes)", row.target);
        }
    }
}

/// The results as a Markdown table (pasteable into the README).
pub(crate) fn render_table(rows: &[Row]) -> String {
    let header = [
        "scenario", "metric", "ours", "baseline", "ratio", "target", "met?",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.scenario.to_string(),
                r.metric.clone(),
                value(r.ours, r.unit),
                match (&r.baseline, r.baseline_is.as_str()) {
                    (Some(_), "") => value(r.baseline, r.unit),
                    (Some(_), what) => format!("{} ({what})", value(r.baseline, r.unit)),
                    (None, _) => "-".into(),
                },
                r.ratio.map(|x| format!("{x:.2}×")).unwrap_or("-".into()),
                r.target.clone(),
                met(r.met).to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: Vec<&str>| -> String {
        let mut s = String::from("|");
        for (c, w) in cols.iter().zip(widths) {
            let pad = w - c.chars().count();
            let _ = write!(s, " {c}{} |", " ".repeat(pad));
        }
        s
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    out.push_str(&line(widths.iter().map(|_| "").collect()).replace(' ', "-"));
    out.push('\n');
    for row in &cells {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out.trim_end().to_string()
}

/// The machine: cores, memory, CPU, kernel, OS.
pub(crate) fn machine() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let meminfo = read("/proc/meminfo");
    let mem_kib: Option<u64> = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string());
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string());
    json!({
        "loadavg_at_end": read("/proc/loadavg").trim(),
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "mem_total_mib": mem_kib.map(|k| k / 1024),
        "cpu": cpu,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "os": os,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::measure::{parse_psql_time, percent_decode};

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&[3.0], 0.99), Some(3.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn splits_add_up() {
        let total: i64 = (0..7).map(|i| split(4_990_000, 7, i)).sum();
        assert_eq!(total, 4_990_000);
    }

    #[test]
    fn psql_timing_lines_parse() {
        assert_eq!(parse_psql_time("Time: 72.536 ms"), Some(72.536));
        assert_eq!(
            parse_psql_time("Time: 1234.500 ms (00:01.235)"),
            Some(1234.5)
        );
        assert_eq!(parse_psql_time("COPY 3"), None);
    }

    #[test]
    fn numbers_render() {
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
        assert_eq!(human(5_000_000.0), "5M");
        assert_eq!(human(10_000.0), "10,000");
        assert_eq!(percent_decode("a%40b"), "a@b");
    }

    #[test]
    fn quick_rows_are_not_judged_against_full_size_targets() {
        let mut judged = Row::new(Scenario::Throughput, "noop jobs per second", "jobs/s");
        judged.target = "≥ 8,000 jobs/s".into();
        judged.met = Some(false);
        let mut info = Row::new(Scenario::Latency, "enqueue-to-start p50", "ms");
        info.target = "-".into();
        let mut rows = vec![judged, info];
        not_judged_at_quick_sizes(&mut rows);
        assert_eq!(rows[0].met, None);
        assert_eq!(rows[0].target, "≥ 8,000 jobs/s (full sizes)");
        assert_eq!(rows[1].target, "-", "a row without a target stays as it is");
        let table = render_table(&rows);
        assert!(!table.contains("NO"), "{table}");
    }
}
