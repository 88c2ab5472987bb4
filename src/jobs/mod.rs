//! The built-in job kinds, each an implementation of [`crate::TenantJob`] that uses nothing an
//! application's own kinds could not:
//!
//! | kind | what it does |
//! | --- | --- |
//! | [`noop`] | nothing beyond the scoped transaction and the run record (checks, benchmarks) |
//! | [`export`] | streams a view, a record kind or a named export to a CSV or JSONL file |
//! | [`import`] | loads records from a file in the tenant's inbox, or inline, with per-row errors |
//! | [`rollup`] | per-tenant aggregates, full or incremental, into the `rollups` table |
//! | [`process`] | one declared INSERT, UPDATE or DELETE |
//!
//! Declared jobs (TOML + SQL in the top-level `jobs/` folder, loaded by [`declared`]) are
//! instances of these kinds: a named export, a declared rollup, a processing step.

use std::sync::Arc;

use crate::config::Settings;
use crate::job::{RegisterError, Registry};

pub mod declared;
pub mod export;
pub mod import;
pub mod noop;
pub mod process;
pub mod rollup;

use declared::Catalog;

/// Registers the five built-in kinds, with the declared jobs of `catalog` and the export and
/// import folders of `settings`.
///
/// # Errors
/// [`RegisterError`] when `registry` already holds a kind of one of their names.
pub fn register_builtins(
    registry: &mut Registry,
    settings: &Settings,
    catalog: Arc<Catalog>,
) -> Result<(), RegisterError> {
    registry
        .register(noop::Noop)?
        .register(export::Export::new(
            catalog.clone(),
            settings.exports.dir.clone(),
        ))?
        .register(import::Import::new(settings.imports.dir.clone()))?
        .register(rollup::Rollup::new(catalog.clone()))?
        .register(process::Process::new(catalog))?;
    Ok(())
}

/// A registry of the built-in kinds only.
pub fn builtins(settings: &Settings, catalog: Arc<Catalog>) -> Registry {
    let mut registry = Registry::new();
    register_builtins(&mut registry, settings, catalog)
        .expect("an empty registry has room for the built-in kinds");
    registry
}
