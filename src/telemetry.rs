//! Logging setup. Everything logs through `tracing`; job spans carry `tenant_id` and `job_id`.

use tracing_subscriber::{EnvFilter, fmt};

/// Installs a `tracing` subscriber writing to stderr, filtered by `RUST_LOG`
/// (default `info` for this crate, `warn` for dependencies), in colour only when stderr is a
/// terminal.
///
/// Calling it twice is harmless: the second call keeps the first subscriber.
pub fn init() {
    init_with_default("warn,tenant_worker=info");
}

/// [`init`] with another filter for when `RUST_LOG` is not set (the demo keeps its report
/// readable with `warn`).
pub fn init_with_default(default_filter: &str) {
    use std::io::IsTerminal as _;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}
