//! Finding the PostgreSQL server binaries.

use super::*;

/// Finds the directory holding the PostgreSQL server binaries (`initdb`, `pg_ctl`,
/// `postgres`).
///
/// Looks, in order, at `$TENANT_WORKER_PG_BIN`, at every directory on `PATH` that holds both
/// `initdb` and `pg_ctl`, and at `/usr/lib/postgresql/<version>/bin`, highest version first.
/// Symlinks are resolved and the directory of the real `pg_ctl` is returned, because `pg_ctl`
/// finds `postgres` next to its own resolved location; shell or Perl wrappers (Debian's
/// `pg_wrapper`) are skipped, and each candidate is verified by running `pg_ctl --version`.
///
/// # Errors
///
/// [`Error::BinariesNotFound`] (telling what to install) when nothing usable exists, or when
/// `$TENANT_WORKER_PG_BIN` is set but does not hold working binaries.
pub fn find_binaries() -> Result<PathBuf> {
    find_binaries_in(
        std::env::var_os(PG_BIN_ENV),
        std::env::var_os("PATH"),
        Path::new("/usr/lib/postgresql"),
    )
}

pub(super) fn find_binaries_in(
    env_override: Option<OsString>,
    path_var: Option<OsString>,
    versioned_root: &Path,
) -> Result<PathBuf> {
    if let Some(dir) = env_override.filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return usable_bin_dir(&dir).map_err(|why| Error::BinariesNotFound {
            detail: format!("{PG_BIN_ENV}={} is not usable: {why}", dir.display()),
        });
    }

    let mut rejected = Vec::new();
    let path_dirs: Vec<PathBuf> = path_var
        .as_deref()
        .map(|p| std::env::split_paths(p).collect())
        .unwrap_or_default();
    for dir in path_dirs {
        if !(is_executable(&dir.join("initdb")) && is_executable(&dir.join("pg_ctl"))) {
            continue;
        }
        match usable_bin_dir(&dir) {
            Ok(found) => return Ok(found),
            Err(why) => rejected.push(format!("{}: {why}", dir.display())),
        }
    }

    for dir in versioned_bin_dirs(versioned_root) {
        match usable_bin_dir(&dir) {
            Ok(found) => return Ok(found),
            Err(why) => rejected.push(format!("{}: {why}", dir.display())),
        }
    }

    let mut detail = format!(
        "searched {PG_BIN_ENV}, PATH and {}/*/bin",
        versioned_root.display()
    );
    if !rejected.is_empty() {
        detail.push_str("; rejected ");
        detail.push_str(&rejected.join("; "));
    }
    Err(Error::BinariesNotFound { detail })
}

/// `<root>/<version>/bin` directories, highest version first.
pub(super) fn versioned_bin_dirs(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut versions: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name();
            let version: Option<Vec<u32>> = name
                .to_str()?
                .split('.')
                .map(|part| part.parse().ok())
                .collect();
            Some((version?, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

pub(super) fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
}

/// Checks that `dir` leads to real server binaries and returns their real directory.
pub(super) fn usable_bin_dir(dir: &Path) -> std::result::Result<PathBuf, String> {
    let pg_ctl = dir
        .join("pg_ctl")
        .canonicalize()
        .map_err(|e| format!("no pg_ctl ({e})"))?;
    if is_script(&pg_ctl) {
        return Err(format!(
            "{} is a wrapper script, not the real pg_ctl",
            pg_ctl.display()
        ));
    }
    let real = pg_ctl
        .parent()
        .ok_or_else(|| "pg_ctl has no parent directory".to_owned())?
        .to_path_buf();
    for tool in ["initdb", "pg_ctl", "postgres"] {
        if !is_executable(&real.join(tool)) {
            return Err(format!("{} has no executable {tool}", real.display()));
        }
    }
    let output = Command::new(&pg_ctl)
        .arg("--version")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", pg_ctl.display()))?;
    let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if !output.status.success() || !version.contains("PostgreSQL") {
        return Err(format!(
            "`{} --version` did not report a PostgreSQL version",
            pg_ctl.display()
        ));
    }
    debug!(dir = %real.display(), %version, "found PostgreSQL server binaries");
    Ok(real)
}

pub(super) fn is_script(path: &Path) -> bool {
    let mut magic = [0u8; 2];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| &magic == b"#!")
}

// ---------------------------------------------------------------------------------------------
// Users, permissions, commands
// ---------------------------------------------------------------------------------------------
