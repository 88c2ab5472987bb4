//! `tenant-worker demo`: the product in one command, on a private throwaway cluster.

use anyhow::Result;

use crate::config::Settings;

/// Runs the demo.
///
/// # Errors
/// Any failure, with context.
pub async fn run(_settings: &Settings) -> Result<()> {
    anyhow::bail!("the demo is not written yet")
}
