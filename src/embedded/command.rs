//! Running PostgreSQL commands, as another user when this process is root.

use super::*;

/// The unprivileged user PostgreSQL runs as when this process is root.
#[derive(Debug, Clone)]
pub(super) struct RunAs {
    pub(super) uid: Uid,
    pub(super) gid: Gid,
    pub(super) name: String,
}

impl RunAs {
    pub(super) fn from_user(user: User) -> Self {
        Self {
            uid: user.uid,
            gid: user.gid,
            name: user.name,
        }
    }
}

/// `None` when we are not root (commands run as ourselves), else `postgres` or `nobody`.
pub(super) fn default_run_as() -> Result<Option<RunAs>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        let user = User::from_name(name).map_err(sys_err(format!("looking up user `{name}`")))?;
        if let Some(user) = user {
            return Ok(Some(RunAs::from_user(user)));
        }
    }
    Err(Error::NoUnprivilegedUser)
}

/// For a root-run on an existing local cluster created by some other (non-root) user, keep
/// running it as that user; otherwise fall back to [`default_run_as`].
pub(super) fn run_as_for_existing(paths: &[&Path]) -> Result<Option<RunAs>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    for path in paths {
        let Ok(meta) = fs::metadata(path) else {
            continue;
        };
        if meta.uid() == 0 {
            continue;
        }
        let uid = Uid::from_raw(meta.uid());
        let user = User::from_uid(uid).map_err(sys_err(format!("looking up uid {uid}")))?;
        return Ok(Some(match user {
            Some(user) => RunAs::from_user(user),
            None => RunAs {
                uid,
                gid: Gid::from_raw(meta.gid()),
                name: uid.to_string(),
            },
        }));
    }
    default_run_as()
}

/// Checks that `user` can reach `dir`: every existing ancestor must grant it search (x)
/// permission. (Missing ones are about to be created by us.)
pub(super) fn check_traversable(dir: &Path, user: &RunAs) -> Result<()> {
    for ancestor in dir.ancestors().skip(1) {
        let meta = match fs::metadata(ancestor) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(io_err(format!(
                    "reading permissions of {}",
                    ancestor.display()
                ))(e));
            }
        };
        // Supplementary groups are dropped when the uid is switched, so only the primary
        // group counts.
        let mode = meta.mode();
        let allowed = if meta.uid() == user.uid.as_raw() {
            mode & 0o100 != 0
        } else if meta.gid() == user.gid.as_raw() {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !allowed {
            return Err(Error::DataDirNotAccessible {
                path: dir.to_path_buf(),
                user: user.name.clone(),
                reason: format!(
                    "it cannot enter {} (mode {:o}, owner uid {})",
                    ancestor.display(),
                    mode & 0o7777,
                    meta.uid()
                ),
            });
        }
    }
    Ok(())
}

pub(super) fn chown_to(path: &Path, user: Option<&RunAs>) -> Result<()> {
    if let Some(user) = user {
        nix::unistd::chown(path, Some(user.uid), Some(user.gid)).map_err(sys_err(format!(
            "handing {} over to user `{}`",
            path.display(),
            user.name
        )))?;
    }
    Ok(())
}

pub(super) fn set_mode_0700(path: &Path) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("setting mode 0700 on {}", path.display())))
}

/// A command with a clean PostgreSQL environment, run as `user` (if any) from `cwd`.
pub(super) fn base_command(program: &Path, user: Option<&RunAs>, cwd: &Path) -> Command {
    let mut cmd = Command::new(program);
    for var in CLEARED_ENV {
        cmd.env_remove(var);
    }
    cmd.env("LC_ALL", "C").current_dir(cwd).stdin(Stdio::null());
    if let Some(user) = user {
        // `std` also calls setgroups(0) here, dropping root's supplementary groups.
        cmd.uid(user.uid.as_raw())
            .gid(user.gid.as_raw())
            .env("HOME", cwd)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name);
    }
    cmd
}

pub(super) fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs `cmd` to completion, capturing its output.
pub(super) fn run_captured(cmd: &mut Command) -> Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.output()
        .map_err(io_err(format!("running `{}`", describe(cmd))))
}

pub(super) fn output_tail(output: &Output) -> String {
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    last_lines(&text, TAIL_LINES)
}

pub(super) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last lines of a (possibly large) log file; empty when it cannot be read.
pub(super) fn log_tail(path: &Path) -> String {
    let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    last_lines(
        &read_log_from(path, len.saturating_sub(16 * 1024)),
        TAIL_LINES,
    )
}

/// What was appended to a log file from `offset` on (at most 64 KiB).
pub(super) fn read_log_from(path: &Path, offset: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let mut buf = Vec::new();
    if file.seek(SeekFrom::Start(offset)).is_err()
        || file.take(64 * 1024).read_to_end(&mut buf).is_err()
    {
        return String::new();
    }
    String::from_utf8_lossy(&buf).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Cluster plumbing shared by both flavours
// ---------------------------------------------------------------------------------------------
