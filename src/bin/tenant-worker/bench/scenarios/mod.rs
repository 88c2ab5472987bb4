//! One file per scenario; each `run(ctx)` measures ours and its baseline in the same run.

pub(crate) mod context;
pub(crate) mod export;
pub(crate) mod fairness;
pub(crate) mod import;
pub(crate) mod latency;
pub(crate) mod rollup;
pub(crate) mod scale;
pub(crate) mod throughput;
