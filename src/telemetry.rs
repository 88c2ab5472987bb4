//! Logging setup. Everything logs through `tracing`; job spans carry `tenant_id` and `job_id`.

use tracing_subscriber::{EnvFilter, fmt};

/// Installs a `tracing` subscriber writing to stderr, filtered by `RUST_LOG`
/// (default `info` for this crate, `warn` for dependencies).
///
/// Calling it twice is harmless: the second call keeps the first subscriber.
pub fn init() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,tenant_worker=info"));
    let _ = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
