//! A PostgreSQL that the product starts by itself from the installed server binaries.
//!
//! `DESIGN.md` ("Embedded default") promises that nothing beyond the PostgreSQL binaries has
//! to be installed or configured. This module keeps that promise in two flavours:
//!
//! * [`EphemeralCluster`]: a private, throwaway cluster for the tests and the demo. It is
//!   created with `initdb` in a fresh temporary directory, started with `pg_ctl` on a free
//!   TCP port on `127.0.0.1`, and removed again when it is dropped. Because `Drop` does not
//!   run when the process is killed (SIGKILL, `panic = "abort"`, an unhandled Ctrl-C), each
//!   cluster also gets a *watchdog*: a small `sh` child whose stdin is a pipe only this
//!   process holds. Whenever this process ends, for whatever reason, the kernel closes the
//!   pipe, the watchdog's `read` returns, and it stops PostgreSQL and deletes the directory.
//! * [`LocalCluster`]: a persistent development cluster in a directory chosen by the caller
//!   (`dev.data_dir`, e.g. `./.tenant-worker/pg`). It is created on first use, started when
//!   it is not running, and deliberately left running for the next command (`dev status`,
//!   `dev stop` map to [`LocalCluster::status`] and [`LocalCluster::stop`]).
//!
//! Both listen only on `127.0.0.1`, put their unix socket inside their own directory (so
//! nothing needs `/var/run/postgresql`), keep `fsync = on` (tests kill processes on purpose,
//! and durability is what they test), and log to `<dir>/postgres.log`. The superuser is
//! `postgres` with `trust` authentication, which is acceptable only because the server
//! listens on loopback alone and the directory is private to one user.
//!
//! **Running as root.** `initdb` and `postgres` refuse to run as root. When this process is
//! root, every PostgreSQL command (and the watchdog) runs as the `postgres` system user, or
//! `nobody` when that does not exist, and the cluster directory is handed over to that user.
//! `std` drops root's supplementary groups when it switches the uid of a child.
//!
//! **Directory layout** (for both flavours), inside the cluster directory:
//!
//! ```text
//! data/                     the PostgreSQL data directory (PGDATA)
//! data/tenant-worker.conf   our settings (port, listen address, socket dir, ...), included
//!                           from data/postgresql.conf; the single place the port is stored
//! postgres.log              server log (pg_ctl -l)
//! .s.PGSQL.<port>           the unix socket
//! tenant-worker.lock        LocalCluster only: serialises concurrent commands
//! ```
//!
//! All functions are synchronous (`std::process::Command`); async callers wrap them in
//! `tokio::task::spawn_blocking`.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::unistd::{Gid, Uid, User};
use tracing::{debug, info, warn};

/// Environment variable naming the directory that holds `initdb`, `pg_ctl` and `postgres`.
pub const PG_BIN_ENV: &str = "TENANT_WORKER_PG_BIN";

/// Name of the PostgreSQL superuser created by `initdb` in every embedded cluster.
pub const SUPERUSER: &str = "postgres";

/// How often a start is retried with a fresh port when the chosen one was taken meanwhile.
const START_ATTEMPTS: u32 = 5;
/// Seconds `pg_ctl` waits for start, stop and restart.
const PG_CTL_TIMEOUT_SECS: &str = "60";
/// How long we poll for a TCP connection after `pg_ctl` reported the server as started.
const TCP_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of log or command output quoted in error messages.
const TAIL_LINES: usize = 20;
/// Unix socket paths are limited to 108 bytes (`sun_path`); PostgreSQL appends
/// `/.s.PGSQL.<port>` (up to 15 bytes) and needs a terminating NUL.
const MAX_SOCKET_DIR_LEN: usize = 92;
/// Environment variables that would make a PostgreSQL tool act on another cluster.
const CLEARED_ENV: &[&str] = &[
    "PGDATA",
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGOPTIONS",
    "PGSYSCONFDIR",
];
/// The settings file we own inside the data directory.
const CONF_FILE: &str = "tenant-worker.conf";
/// The line that makes `postgresql.conf` read [`CONF_FILE`] (relative to its own directory).
const INCLUDE_LINE: &str = "include = 'tenant-worker.conf'";

/// Errors of the embedded PostgreSQL clusters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No usable `initdb`/`pg_ctl`/`postgres` were found.
    #[error(
        "PostgreSQL server binaries not found ({detail}); install the PostgreSQL server \
         binaries, e.g. `apt-get install postgresql` (Debian/Ubuntu) or \
         `brew install postgresql@15`; or set TENANT_WORKER_PG_BIN to the directory holding \
         initdb and pg_ctl"
    )]
    BinariesNotFound {
        /// Where we looked and why the candidates were rejected.
        detail: String,
    },

    /// A file-system or process operation failed.
    #[error("{what}")]
    Io {
        /// What we were doing.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A system call made through `nix` (chown, user lookup, file lock) failed.
    #[error("{what}")]
    Sys {
        /// What we were doing.
        what: String,
        /// The underlying error.
        #[source]
        source: nix::Error,
    },

    /// A PostgreSQL command (`initdb`, `pg_ctl ...`) exited unsuccessfully.
    #[error("`{command}` failed ({status}){}", tail_suffix(.log_tail))]
    CommandFailed {
        /// The command line that failed.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// The last lines of the command's output and, for starts, of the server log.
        log_tail: String,
    },

    /// We run as root, but there is no unprivileged user to run PostgreSQL as.
    #[error(
        "running as root, but PostgreSQL refuses to run as root and neither a `postgres` nor a \
         `nobody` user exists to run it as; create a `postgres` system user or run as a \
         normal user"
    )]
    NoUnprivilegedUser,

    /// The user PostgreSQL runs as cannot use the cluster directory.
    #[error(
        "the PostgreSQL directory {} cannot be used by user `{user}`: {reason}; set \
         `dev.data_dir` to a path such as /tmp/tenant-worker-pg (for throwaway clusters, point \
         TMPDIR at a directory every user can reach)",
        .path.display()
    )]
    DataDirNotAccessible {
        /// The cluster directory.
        path: PathBuf,
        /// The user PostgreSQL would run as.
        user: String,
        /// Why it cannot use it.
        reason: String,
    },

    /// `pg_ctl` reported success but the port never accepted a TCP connection.
    #[error(
        "PostgreSQL on 127.0.0.1:{port} did not accept TCP connections within {waited_secs}s{}",
        tail_suffix(.log_tail)
    )]
    NotReady {
        /// The port we polled.
        port: u16,
        /// How long we waited.
        waited_secs: u64,
        /// The last lines of the server log.
        log_tail: String,
    },

    /// The cluster directory exists but is not in the shape this module creates.
    #[error("invalid PostgreSQL cluster directory {}: {reason}", .path.display())]
    InvalidCluster {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// Result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn tail_suffix(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("\n--- last lines of output / server log ---\n{tail}")
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

fn sys_err(what: impl Into<String>) -> impl FnOnce(nix::Error) -> Error {
    let what = what.into();
    move |source| Error::Sys { what, source }
}

// ---------------------------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------------------------

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

fn find_binaries_in(
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
fn versioned_bin_dirs(root: &Path) -> Vec<PathBuf> {
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

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
}

/// Checks that `dir` leads to real server binaries and returns their real directory.
fn usable_bin_dir(dir: &Path) -> std::result::Result<PathBuf, String> {
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

fn is_script(path: &Path) -> bool {
    let mut magic = [0u8; 2];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| &magic == b"#!")
}

// ---------------------------------------------------------------------------------------------
// Users, permissions, commands
// ---------------------------------------------------------------------------------------------

/// The unprivileged user PostgreSQL runs as when this process is root.
#[derive(Debug, Clone)]
struct RunAs {
    uid: Uid,
    gid: Gid,
    name: String,
}

impl RunAs {
    fn from_user(user: User) -> Self {
        Self {
            uid: user.uid,
            gid: user.gid,
            name: user.name,
        }
    }
}

/// `None` when we are not root (commands run as ourselves), else `postgres` or `nobody`.
fn default_run_as() -> Result<Option<RunAs>> {
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
fn run_as_for_existing(paths: &[&Path]) -> Result<Option<RunAs>> {
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
fn check_traversable(dir: &Path, user: &RunAs) -> Result<()> {
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

fn chown_to(path: &Path, user: Option<&RunAs>) -> Result<()> {
    if let Some(user) = user {
        nix::unistd::chown(path, Some(user.uid), Some(user.gid)).map_err(sys_err(format!(
            "handing {} over to user `{}`",
            path.display(),
            user.name
        )))?;
    }
    Ok(())
}

fn set_mode_0700(path: &Path) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("setting mode 0700 on {}", path.display())))
}

/// A command with a clean PostgreSQL environment, run as `user` (if any) from `cwd`.
fn base_command(program: &Path, user: Option<&RunAs>, cwd: &Path) -> Command {
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

fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs `cmd` to completion, capturing its output.
fn run_captured(cmd: &mut Command) -> Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.output()
        .map_err(io_err(format!("running `{}`", describe(cmd))))
}

fn output_tail(output: &Output) -> String {
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    last_lines(&text, TAIL_LINES)
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last lines of a (possibly large) log file; empty when it cannot be read.
fn log_tail(path: &Path) -> String {
    let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    last_lines(
        &read_log_from(path, len.saturating_sub(16 * 1024)),
        TAIL_LINES,
    )
}

/// What was appended to a log file from `offset` on (at most 64 KiB).
fn read_log_from(path: &Path, offset: u64) -> String {
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

/// Paths of one cluster; see the module docs for the layout.
#[derive(Debug, Clone)]
struct Layout {
    dir: PathBuf,
    pgdata: PathBuf,
    log: PathBuf,
}

impl Layout {
    fn new(dir: PathBuf) -> Self {
        Self {
            pgdata: dir.join("data"),
            log: dir.join("postgres.log"),
            dir,
        }
    }

    fn conf(&self) -> PathBuf {
        self.pgdata.join(CONF_FILE)
    }

    fn is_initialized(&self) -> bool {
        self.pgdata.join("PG_VERSION").is_file()
    }
}

/// Context for running PostgreSQL commands against one cluster.
#[derive(Debug, Clone)]
struct Ctl {
    bin: PathBuf,
    run_as: Option<RunAs>,
    layout: Layout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PgCtlStatus {
    Running { pid: u32 },
    Stopped,
}

impl Ctl {
    fn command(&self, tool: &str) -> Command {
        base_command(&self.bin.join(tool), self.run_as.as_ref(), &self.layout.dir)
    }

    fn pg_ctl(&self, action: &str) -> Command {
        let mut cmd = self.command("pg_ctl");
        cmd.arg(action).arg("-D").arg(&self.layout.pgdata);
        cmd
    }

    /// Runs `initdb` into `target` (the data directory or a staging directory).
    fn initdb(&self, target: &Path, no_sync: bool) -> Result<()> {
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(target).args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        if no_sync {
            // Only for throwaway clusters: skips flushing the fresh files to disk, which
            // matters only if the machine crashes, and then the cluster is gone anyway.
            cmd.arg("--no-sync");
        }
        debug!(command = %describe(&cmd), "initializing PostgreSQL cluster");
        let output = run_captured(&mut cmd)?;
        if !output.status.success() {
            return Err(Error::CommandFailed {
                command: describe(&cmd),
                status: output.status,
                log_tail: output_tail(&output),
            });
        }
        Ok(())
    }

    /// Writes our settings into `<pgdata>/tenant-worker.conf` and makes sure
    /// `postgresql.conf` includes it.
    fn write_conf(&self, pgdata: &Path, port: u16) -> Result<()> {
        let dir = self.layout.dir.to_string_lossy();
        let socket_dirs = if dir.len() <= MAX_SOCKET_DIR_LEN {
            dir.into_owned()
        } else {
            // Too long for a unix socket path: TCP only. pg_ctl -w does not need the socket.
            debug!(dir = %dir, "cluster path too long for a unix socket; TCP only");
            String::new()
        };
        let text = format!(
            "# Written by tenant-worker (src/embedded.rs); rewritten when the port changes.\n\
             port = {port}\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = {socket}\n\
             # Tests kill processes on purpose; keep commits durable.\n\
             fsync = on\n\
             max_connections = 200\n\
             shared_buffers = 128MB\n",
            socket = conf_quote(&socket_dirs),
        );
        let conf = pgdata.join(CONF_FILE);
        fs::write(&conf, text).map_err(io_err(format!("writing {}", conf.display())))?;
        chown_to(&conf, self.run_as.as_ref())?;

        let main_conf = pgdata.join("postgresql.conf");
        let existing = fs::read_to_string(&main_conf)
            .map_err(io_err(format!("reading {}", main_conf.display())))?;
        if !existing.lines().any(|line| line.trim() == INCLUDE_LINE) {
            let mut file = OpenOptions::new()
                .append(true)
                .open(&main_conf)
                .map_err(io_err(format!("opening {}", main_conf.display())))?;
            writeln!(
                file,
                "\n# Settings managed by tenant-worker\n{INCLUDE_LINE}"
            )
            .map_err(io_err(format!("appending to {}", main_conf.display())))?;
        }
        Ok(())
    }

    /// The port stored in our settings file, if there is one.
    fn read_port(&self) -> Result<Option<u16>> {
        let conf = self.layout.conf();
        let text = match fs::read_to_string(&conf) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(format!("reading {}", conf.display()))(e)),
        };
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            if key.trim() == "port" {
                return value
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| Error::InvalidCluster {
                        path: self.layout.dir.clone(),
                        reason: format!("unreadable port in {}: {line:?}", conf.display()),
                    });
            }
        }
        Ok(None)
    }

    /// `pg_ctl status`: the authority on whether the server runs (it ignores a stale
    /// `postmaster.pid` whose process is gone).
    fn status(&self) -> Result<PgCtlStatus> {
        let mut cmd = self.pg_ctl("status");
        let output = run_captured(&mut cmd)?;
        match output.status.code() {
            Some(0) => {
                let text = String::from_utf8_lossy(&output.stdout);
                let pid = parse_pid(&text)
                    .or_else(|| pid_from_pid_file(&self.layout.pgdata))
                    .ok_or_else(|| Error::InvalidCluster {
                        path: self.layout.dir.clone(),
                        reason: format!("cannot tell the server's PID from {text:?}"),
                    })?;
                if is_zombie(pid) {
                    // pg_ctl only asks kill(pid, 0), which succeeds for a dead postmaster that
                    // its parent (init, after pg_ctl exited) has not reaped yet. Container
                    // inits can take a long time to reap, so treat it as stopped.
                    debug!(
                        pid,
                        "postmaster is dead but not yet reaped; treating as stopped"
                    );
                    return Ok(PgCtlStatus::Stopped);
                }
                Ok(PgCtlStatus::Running { pid })
            }
            Some(3) => Ok(PgCtlStatus::Stopped),
            _ => Err(Error::CommandFailed {
                command: describe(&cmd),
                status: output.status,
                log_tail: output_tail(&output),
            }),
        }
    }

    /// `pg_ctl start -w`, in its own process group so a Ctrl-C sent to our terminal's
    /// process group does not reach PostgreSQL before we have cleaned up ourselves.
    fn start_once(&self) -> Result<()> {
        self.remove_zombie_lock_files()?;
        let mut cmd = self.pg_ctl("start");
        cmd.arg("-l")
            .arg(&self.layout.log)
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS])
            .process_group(0);
        self.run_server_command(cmd)
    }

    /// Removes lock files (`postmaster.pid`, the socket's `.s.PGSQL.<port>.lock`) that name an
    /// unreaped, dead postmaster: the new postmaster would take the zombie for a live server
    /// and refuse to start. (Lock files whose process is really gone are handled by PostgreSQL
    /// itself.)
    fn remove_zombie_lock_files(&self) -> Result<()> {
        let mut candidates = vec![self.layout.pgdata.join("postmaster.pid")];
        if let Ok(entries) = fs::read_dir(&self.layout.dir) {
            candidates.extend(
                entries
                    .filter_map(|entry| entry.ok())
                    .map(|e| e.path())
                    .filter(|path| {
                        path.file_name()
                            .and_then(|name| name.to_str())
                            .is_some_and(|name| {
                                name.starts_with(".s.PGSQL.") && name.ends_with(".lock")
                            })
                    }),
            );
        }
        for lock in candidates {
            let Some(pid) = pid_from_lock_file(&lock) else {
                continue;
            };
            if !is_zombie(pid) {
                continue;
            }
            info!(pid, file = %lock.display(), "removing lock file of a crashed server");
            match fs::remove_file(&lock) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(format!("removing {}", lock.display()))(e)),
            }
        }
        Ok(())
    }

    /// Runs a `pg_ctl start`/`restart`, attaching the server log to a failure.
    fn run_server_command(&self, mut cmd: Command) -> Result<()> {
        debug!(command = %describe(&cmd), "running");
        let output = run_captured(&mut cmd)?;
        if output.status.success() {
            return Ok(());
        }
        let mut tail = output_tail(&output);
        let log = log_tail(&self.layout.log);
        if !log.is_empty() {
            tail.push_str(&format!("\n--- {} ---\n{log}", self.layout.log.display()));
        }
        Err(Error::CommandFailed {
            command: describe(&cmd),
            status: output.status,
            log_tail: tail,
        })
    }

    /// Starts the server on `port`; if the port was taken in the meantime (another test
    /// binary picked the same free port), retries with a fresh one. Returns the final port.
    fn start_with_retries(&self, mut port: u16) -> Result<u16> {
        let mut attempt = 1;
        loop {
            let log_offset = fs::metadata(&self.layout.log).map_or(0, |m| m.len());
            match self.start_once() {
                Ok(()) => return Ok(port),
                Err(err) if attempt < START_ATTEMPTS && self.port_conflict(log_offset) => {
                    let new_port = free_port()?;
                    info!(
                        old_port = port,
                        new_port, "port taken while starting PostgreSQL; retrying on another"
                    );
                    debug!(error = %err, "start failed");
                    self.write_conf(&self.layout.pgdata, new_port)?;
                    port = new_port;
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    fn port_conflict(&self, log_offset: u64) -> bool {
        let log = read_log_from(&self.layout.log, log_offset);
        log.contains("Address already in use")
            || log.contains("could not bind")
            || log.contains("could not create any TCP/IP sockets")
    }

    fn stop(&self, mode: &str) -> Result<()> {
        let mut cmd = self.pg_ctl("stop");
        cmd.args(["-m", mode, "-w", "-t", PG_CTL_TIMEOUT_SECS]);
        let output = run_captured(&mut cmd)?;
        if !output.status.success() {
            return Err(Error::CommandFailed {
                command: describe(&cmd),
                status: output.status,
                log_tail: output_tail(&output),
            });
        }
        Ok(())
    }

    /// Polls until the server accepts TCP connections on 127.0.0.1:`port`.
    fn wait_for_tcp(&self, port: u16) -> Result<()> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let started = Instant::now();
        while started.elapsed() < TCP_READY_TIMEOUT {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(Error::NotReady {
            port,
            waited_secs: TCP_READY_TIMEOUT.as_secs(),
            log_tail: log_tail(&self.layout.log),
        })
    }
}

/// Quotes a value for postgresql.conf (single quotes; `'` and `\` escaped).
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// Extracts `N` from pg_ctl's `server is running (PID: N)`.
fn parse_pid(text: &str) -> Option<u32> {
    let rest = &text[text.find("PID:")? + 4..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn pid_from_pid_file(pgdata: &Path) -> Option<u32> {
    pid_from_lock_file(&pgdata.join("postmaster.pid"))
}

/// The PID on the first line of a PostgreSQL lock file.
fn pid_from_lock_file(path: &Path) -> Option<u32> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` is a zombie (exited, not yet reaped). Linux only (`/proc`); elsewhere the
/// answer is always `false`.
fn is_zombie(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "<pid> (<comm>) <state> ...": comm may contain spaces and parentheses.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state == "Z")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(io_err("binding 127.0.0.1:0 to find a free port"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("reading the address of a bound socket"))?
        .port();
    Ok(port)
}

fn admin_url(port: u16) -> String {
    format!("postgres://{SUPERUSER}@127.0.0.1:{port}/postgres")
}

// ---------------------------------------------------------------------------------------------
// EphemeralCluster
// ---------------------------------------------------------------------------------------------

/// The watchdog script; `$1` = pg_ctl, `$2` = data directory, `$3` = cluster directory.
///
/// It ignores SIGINT/SIGHUP (a Ctrl-C in the terminal must not kill it), waits until our end
/// of its stdin closes (EOF: we dropped the pipe or died), then stops the server and removes
/// the directory. Both steps tolerate there being nothing left to do.
const WATCHDOG_SCRIPT: &str = "trap '' INT HUP; read _ignored; \
     \"$1\" stop -D \"$2\" -m immediate -w -t 30 >/dev/null 2>&1; \
     rm -rf \"$3\"";

/// A private, throwaway PostgreSQL cluster for tests and the demo.
///
/// Created in a fresh directory `$TMPDIR/tenant-worker-pg-*` on a free port on `127.0.0.1`,
/// with superuser `postgres` and trust authentication. Dropping it stops the server
/// (immediate mode) and removes the directory. If the process dies without dropping it
/// (SIGKILL, abort, Ctrl-C), a watchdog child does the same; see the module docs.
#[derive(Debug)]
pub struct EphemeralCluster {
    ctl: Ctl,
    port: u16,
    watchdog: Option<Child>,
    watchdog_stdin: Option<ChildStdin>,
}

impl EphemeralCluster {
    /// Creates, starts and waits for a new throwaway cluster.
    ///
    /// Blocks for the duration of `initdb` and the server start (typically one to a few
    /// seconds).
    ///
    /// # Errors
    ///
    /// [`Error::BinariesNotFound`] without PostgreSQL binaries; [`Error::CommandFailed`]
    /// (with the server log) when `initdb` or the start fails; [`Error::NoUnprivilegedUser`]
    /// or [`Error::DataDirNotAccessible`] when run as root without a usable user or temp
    /// directory; [`Error::Io`] for file-system failures. Everything created so far is
    /// removed again before the error is returned.
    pub fn start() -> Result<Self> {
        let bin = find_binaries()?;
        let run_as = default_run_as()?;
        let temp = tempfile::Builder::new()
            .prefix("tenant-worker-pg-")
            .tempdir_in(std::env::temp_dir())
            .map_err(io_err("creating a temporary directory for PostgreSQL"))?;
        // From here on the directory is ours to remove (in Drop, or by the watchdog).
        let created = temp.keep();
        let dir = match created.canonicalize() {
            Ok(dir) => dir,
            Err(e) => {
                let _ = fs::remove_dir_all(&created);
                return Err(io_err(format!("resolving {}", created.display()))(e));
            }
        };
        // Build the value right away so that its Drop cleans up after any later failure.
        let mut cluster = Self {
            ctl: Ctl {
                bin,
                run_as,
                layout: Layout::new(dir),
            },
            port: 0,
            watchdog: None,
            watchdog_stdin: None,
        };
        cluster.init_and_start()?;
        info!(
            port = cluster.port,
            dir = %cluster.ctl.layout.dir.display(),
            "started throwaway PostgreSQL cluster"
        );
        Ok(cluster)
    }

    fn init_and_start(&mut self) -> Result<()> {
        let layout = self.ctl.layout.clone();
        set_mode_0700(&layout.dir)?;
        if let Some(user) = &self.ctl.run_as {
            chown_to(&layout.dir, Some(user))?;
            check_traversable(&layout.dir, user)?;
        }
        // Arm the watchdog before anything else exists, so that even a SIGKILL during
        // initdb leaves nothing behind.
        self.spawn_watchdog()?;
        self.ctl.initdb(&layout.pgdata, true)?;
        self.ctl.write_conf(&layout.pgdata, free_port()?)?;
        let first_port = self.ctl.read_port()?.ok_or_else(|| Error::InvalidCluster {
            path: layout.dir.clone(),
            reason: "no port in the settings just written".to_owned(),
        })?;
        self.port = self.ctl.start_with_retries(first_port)?;
        self.ctl.wait_for_tcp(self.port)
    }

    fn spawn_watchdog(&mut self) -> Result<()> {
        let layout = &self.ctl.layout;
        let mut cmd = base_command(Path::new("/bin/sh"), self.ctl.run_as.as_ref(), &layout.dir);
        cmd.arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("tenant-worker-pg-watchdog")
            .arg(self.ctl.bin.join("pg_ctl"))
            .arg(&layout.pgdata)
            .arg(&layout.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: a Ctrl-C in the terminal must not kill it.
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(io_err("spawning the PostgreSQL cleanup watchdog"))?;
        // The write end is close-on-exec, so only this process holds it.
        self.watchdog_stdin = child.stdin.take();
        debug!(pid = child.id(), "armed PostgreSQL cleanup watchdog");
        self.watchdog = Some(child);
        Ok(())
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`: the superuser URL.
    pub fn admin_url(&self) -> String {
        admin_url(self.port)
    }

    /// The TCP port the server listens on (127.0.0.1 only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's temporary directory (holds `data/`, the log and the socket).
    pub fn data_dir(&self) -> &Path {
        &self.ctl.layout.dir
    }

    /// The PostgreSQL data directory (`PGDATA`) inside [`Self::data_dir`].
    pub fn pgdata(&self) -> &Path {
        &self.ctl.layout.pgdata
    }

    /// The server log file.
    pub fn log_file(&self) -> &Path {
        &self.ctl.layout.log
    }

    /// Restarts the server (`pg_ctl restart -m fast -w`) on the same port and waits until it
    /// accepts connections again. Existing client connections are terminated.
    ///
    /// # Errors
    ///
    /// [`Error::CommandFailed`] (with the server log) or [`Error::NotReady`].
    pub fn restart(&self) -> Result<()> {
        let mut cmd = self.ctl.pg_ctl("restart");
        cmd.arg("-l")
            .arg(&self.ctl.layout.log)
            .args(["-m", "fast", "-w", "-t", PG_CTL_TIMEOUT_SECS])
            .process_group(0);
        self.ctl.run_server_command(cmd)?;
        self.ctl.wait_for_tcp(self.port)?;
        info!(port = self.port, "restarted throwaway PostgreSQL cluster");
        Ok(())
    }

    /// Stops the server (`pg_ctl stop -m fast`), keeping the directory, e.g. to test how
    /// callers behave while the database is down. [`Self::start_again`] brings it back.
    ///
    /// # Errors
    ///
    /// [`Error::CommandFailed`] when `pg_ctl stop` fails (e.g. it was not running).
    pub fn stop_now(&self) -> Result<()> {
        self.ctl.stop("fast")?;
        info!(port = self.port, "stopped throwaway PostgreSQL cluster");
        Ok(())
    }

    /// Starts the server again after [`Self::stop_now`], on the same port.
    ///
    /// **Note:** unlike the first start there is no retry on another port, since callers
    /// hold the URL; if something else took the port meanwhile, this fails.
    ///
    /// # Errors
    ///
    /// [`Error::CommandFailed`] (with the server log) or [`Error::NotReady`].
    pub fn start_again(&self) -> Result<()> {
        self.ctl.start_once()?;
        self.ctl.wait_for_tcp(self.port)?;
        info!(
            port = self.port,
            "started throwaway PostgreSQL cluster again"
        );
        Ok(())
    }
}

impl Drop for EphemeralCluster {
    fn drop(&mut self) {
        let layout = &self.ctl.layout;
        // Ask pg_ctl first: stopping a server that crashed would wait for the timeout.
        if layout.pgdata.join("postmaster.pid").exists()
            && matches!(self.ctl.status(), Ok(PgCtlStatus::Running { .. }))
            && let Err(e) = self.ctl.stop("immediate")
        {
            warn!(error = %e, "stopping throwaway PostgreSQL cluster failed");
        }
        match fs::remove_dir_all(&layout.dir) {
            Ok(()) => debug!(dir = %layout.dir.display(), "removed throwaway PostgreSQL cluster"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(
                dir = %layout.dir.display(),
                error = %e,
                "removing throwaway PostgreSQL cluster failed; the watchdog will retry"
            ),
        }
        // Closing the pipe releases the watchdog, which now finds nothing left to do.
        drop(self.watchdog_stdin.take());
        if let Some(mut child) = self.watchdog.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    // Still busy or unwaitable: leave it; it finishes on its own.
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// LocalCluster
// ---------------------------------------------------------------------------------------------

/// What [`LocalCluster::status`] found in a cluster directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterStatus {
    /// There is no cluster in the directory (or the directory does not exist).
    NotInitialized,
    /// The cluster exists and is not running.
    Stopped {
        /// The port it will listen on when started.
        port: u16,
    },
    /// The cluster is running.
    Running {
        /// The port it listens on.
        port: u16,
        /// The PID of the postmaster.
        pid: u32,
    },
}

/// A persistent development cluster in a directory of the caller's choosing.
///
/// Created on first use (`initdb`, a free port that is then kept), started when not running,
/// and left running for the next command. Concurrent commands on the same directory are
/// serialised with a file lock.
#[derive(Debug, Clone)]
pub struct LocalCluster {
    layout: Layout,
    port: u16,
}

impl LocalCluster {
    /// Makes sure a cluster exists in `dir` and is running, and waits until it accepts
    /// connections.
    ///
    /// Creates `dir` (and `initdb`s `dir/data`) on first use, picking a free port that is
    /// stored and reused later; starts the server if `pg_ctl status` says it is not running
    /// (a stale `postmaster.pid` after a crash does not block this). Should the stored port
    /// have been taken by another program, the cluster moves to a new free port.
    ///
    /// # Errors
    ///
    /// [`Error::BinariesNotFound`], [`Error::CommandFailed`] (with the server log),
    /// [`Error::NotReady`], [`Error::Io`]; when run as root, [`Error::DataDirNotAccessible`]
    /// if the unprivileged user cannot reach `dir` (choose a path such as
    /// `/tmp/tenant-worker-pg`) and [`Error::NoUnprivilegedUser`].
    pub fn ensure_running(dir: &Path) -> Result<LocalCluster> {
        let bin = find_binaries()?;
        if !dir.exists() {
            // Check before creating anything, so that a refusal leaves no empty directories
            // behind (the full check follows once symlinks can be resolved).
            let absolute =
                std::path::absolute(dir).map_err(io_err(format!("resolving {}", dir.display())))?;
            if let Some(user) = run_as_for_existing(&[])? {
                check_traversable(&absolute, &user)?;
            }
        }
        fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let dir = dir
            .canonicalize()
            .map_err(io_err(format!("resolving {}", dir.display())))?;
        let layout = Layout::new(dir);
        let run_as = run_as_for_existing(&[&layout.pgdata, &layout.dir])?;
        if let Some(user) = &run_as {
            check_traversable(&layout.dir, user)?;
            take_over_dir(&layout.dir, user)?;
        }
        let ctl = Ctl {
            bin,
            run_as,
            layout,
        };
        let _lock = lock_dir(&ctl)?;

        if !ctl.layout.is_initialized() {
            init_local(&ctl)?;
        }
        let port = match ctl.read_port()? {
            Some(port) => port,
            None => {
                // Initialised elsewhere, or our settings file was lost: (re)write it.
                let port = free_port()?;
                ctl.write_conf(&ctl.layout.pgdata, port)?;
                port
            }
        };
        let port = match ctl.status()? {
            PgCtlStatus::Running { pid } => {
                debug!(port, pid, "local PostgreSQL cluster already running");
                port
            }
            PgCtlStatus::Stopped => {
                let port = ctl.start_with_retries(port)?;
                info!(port, dir = %ctl.layout.dir.display(), "started local PostgreSQL cluster");
                port
            }
        };
        ctl.wait_for_tcp(port)?;
        Ok(LocalCluster {
            layout: ctl.layout,
            port,
        })
    }

    /// Reports whether a cluster exists in `dir` and whether it runs (per `pg_ctl status`).
    ///
    /// # Errors
    ///
    /// [`Error::BinariesNotFound`], [`Error::InvalidCluster`] when the directory holds a
    /// cluster without our settings, [`Error::CommandFailed`] when `pg_ctl status` cannot
    /// inspect it, [`Error::DataDirNotAccessible`] (root only).
    pub fn status(dir: &Path) -> Result<ClusterStatus> {
        let Some(ctl) = existing_ctl(dir)? else {
            return Ok(ClusterStatus::NotInitialized);
        };
        let port = ctl.read_port()?.ok_or_else(|| Error::InvalidCluster {
            path: ctl.layout.dir.clone(),
            reason: format!("no port in {}", ctl.layout.conf().display()),
        })?;
        Ok(match ctl.status()? {
            PgCtlStatus::Running { pid } => ClusterStatus::Running { port, pid },
            PgCtlStatus::Stopped => ClusterStatus::Stopped { port },
        })
    }

    /// Stops the cluster in `dir` (`pg_ctl stop -m fast`: connections are terminated,
    /// committed data is safe). Returns whether it was running.
    ///
    /// # Errors
    ///
    /// [`Error::BinariesNotFound`], [`Error::CommandFailed`], [`Error::Io`],
    /// [`Error::DataDirNotAccessible`] (root only).
    pub fn stop(dir: &Path) -> Result<bool> {
        let Some(ctl) = existing_ctl(dir)? else {
            return Ok(false);
        };
        let _lock = lock_dir(&ctl)?;
        match ctl.status()? {
            PgCtlStatus::Stopped => Ok(false),
            PgCtlStatus::Running { pid } => {
                ctl.stop("fast")?;
                info!(pid, dir = %ctl.layout.dir.display(), "stopped local PostgreSQL cluster");
                Ok(true)
            }
        }
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`: the superuser URL.
    pub fn admin_url(&self) -> String {
        admin_url(self.port)
    }

    /// The TCP port the server listens on (127.0.0.1 only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster directory given to [`Self::ensure_running`] (absolute).
    pub fn data_dir(&self) -> &Path {
        &self.layout.dir
    }

    /// The PostgreSQL data directory (`PGDATA`), `data/` inside [`Self::data_dir`].
    pub fn pgdata(&self) -> &Path {
        &self.layout.pgdata
    }

    /// The server log file.
    pub fn log_file(&self) -> &Path {
        &self.layout.log
    }
}

/// A [`Ctl`] for an existing, initialised cluster directory; `None` if there is none.
fn existing_ctl(dir: &Path) -> Result<Option<Ctl>> {
    let dir = match dir.canonicalize() {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(format!("resolving {}", dir.display()))(e)),
    };
    let layout = Layout::new(dir);
    if !layout.is_initialized() {
        return Ok(None);
    }
    let run_as = run_as_for_existing(&[&layout.pgdata, &layout.dir])?;
    if let Some(user) = &run_as {
        check_traversable(&layout.dir, user)?;
    }
    Ok(Some(Ctl {
        bin: find_binaries()?,
        run_as,
        layout,
    }))
}

/// Root-run: hands a fresh (empty) cluster directory to the unprivileged user, and refuses
/// to take over a non-empty directory that belongs to someone else.
fn take_over_dir(dir: &Path, user: &RunAs) -> Result<()> {
    let meta = fs::metadata(dir).map_err(io_err(format!("inspecting {}", dir.display())))?;
    if meta.uid() == user.uid.as_raw() {
        return Ok(());
    }
    let empty = fs::read_dir(dir)
        .map_err(io_err(format!("listing {}", dir.display())))?
        .next()
        .is_none();
    if !empty {
        return Err(Error::DataDirNotAccessible {
            path: dir.to_path_buf(),
            user: user.name.clone(),
            reason: format!(
                "it is owned by uid {} and not empty, so it is not handed over automatically",
                meta.uid()
            ),
        });
    }
    chown_to(dir, Some(user))?;
    set_mode_0700(dir)
}

/// An exclusive lock on `<dir>/tenant-worker.lock`, held while we init/start/stop.
fn lock_dir(ctl: &Ctl) -> Result<Flock<File>> {
    let path = ctl.layout.dir.join("tenant-worker.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(format!("opening {}", path.display())))?;
    chown_to(&path, ctl.run_as.as_ref())?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| sys_err(format!("locking {}", path.display()))(errno))
}

/// `initdb` into a staging directory, configure it, then rename it to `data`, so that an
/// interrupted first run never leaves a half-made `data/` behind.
fn init_local(ctl: &Ctl) -> Result<()> {
    let staging = ctl.layout.dir.join("data.initdb");
    match fs::remove_dir_all(&staging) {
        Ok(()) => debug!(dir = %staging.display(), "removed leftovers of an interrupted initdb"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format!("removing {}", staging.display()))(e)),
    }
    info!(dir = %ctl.layout.dir.display(), "creating local PostgreSQL cluster");
    ctl.initdb(&staging, false)?;
    ctl.write_conf(&staging, free_port()?)?;
    fs::rename(&staging, &ctl.layout.pgdata).map_err(io_err(format!(
        "renaming {} to {}",
        staging.display(),
        ctl.layout.pgdata.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    fn accepts_tcp(port: u16) -> bool {
        TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            Duration::from_secs(1),
        )
        .is_ok()
    }

    /// Runs `select 1` through psql, or returns `None` when psql is not installed.
    fn psql_select_1(port: u16) -> Option<String> {
        let psql = Path::new("/usr/bin/psql");
        if !psql.exists() {
            eprintln!("psql not installed; skipping the psql check");
            return None;
        }
        let output = Command::new(psql)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .args(["-d", "postgres", "-tAc", "select 1"])
            .env_remove("PGDATABASE")
            .output()
            .expect("running psql");
        assert!(
            output.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Some(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    #[test]
    fn finds_binaries() {
        let dir = find_binaries().expect("PostgreSQL binaries on this machine");
        assert!(is_executable(&dir.join("initdb")));
        assert!(is_executable(&dir.join("postgres")));
    }

    #[test]
    fn missing_binaries_error_says_what_to_install() {
        let empty = tempfile::tempdir().expect("tempdir");
        let err = find_binaries_in(None, Some(empty.path().into()), empty.path())
            .expect_err("nothing to find");
        let message = err.to_string();
        assert!(message.contains("apt-get install postgresql"), "{message}");
        assert!(message.contains("TENANT_WORKER_PG_BIN"), "{message}");

        let err = find_binaries_in(Some(empty.path().into()), None, empty.path())
            .expect_err("override points nowhere");
        assert!(matches!(err, Error::BinariesNotFound { .. }), "{err}");
    }

    #[test]
    fn skips_wrapper_scripts() {
        let dir = tempfile::tempdir().expect("tempdir");
        for tool in ["initdb", "pg_ctl", "postgres"] {
            let path = dir.path().join(tool);
            fs::write(&path, "#!/usr/bin/perl\nexit 0;\n").expect("write");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let err = usable_bin_dir(dir.path()).expect_err("wrapper rejected");
        assert!(err.contains("wrapper"), "{err}");
    }

    #[test]
    fn small_helpers() {
        assert_eq!(
            parse_pid("pg_ctl: server is running (PID: 8759)\n"),
            Some(8759)
        );
        assert_eq!(parse_pid("pg_ctl: no server running"), None);
        assert_eq!(conf_quote("/tmp/it's"), "'/tmp/it''s'");
        assert_eq!(last_lines("a\nb\n\nc\n", 2), "b\nc");
    }

    #[test]
    fn ephemeral_cluster_lifecycle() {
        let cluster = EphemeralCluster::start().expect("start ephemeral cluster");
        let dir = cluster.data_dir().to_path_buf();
        let port = cluster.port();
        assert!(dir.join("data/PG_VERSION").is_file());
        assert_eq!(
            cluster.admin_url(),
            format!("postgres://postgres@127.0.0.1:{port}/postgres")
        );
        assert!(accepts_tcp(port));
        if let Some(out) = psql_select_1(port) {
            assert_eq!(out, "1");
        }
        if dir.as_os_str().len() <= MAX_SOCKET_DIR_LEN {
            assert!(
                dir.join(format!(".s.PGSQL.{port}")).exists(),
                "unix socket lives inside the cluster directory"
            );
        }

        cluster.restart().expect("restart");
        assert!(accepts_tcp(port));
        cluster.stop_now().expect("stop");
        assert!(!accepts_tcp(port));
        cluster.start_again().expect("start again");
        if let Some(out) = psql_select_1(port) {
            assert_eq!(out, "1");
        }

        drop(cluster);
        assert!(!dir.exists(), "{} removed on drop", dir.display());
        assert!(!accepts_tcp(port), "server stopped on drop");
    }

    /// Helper for `watchdog_cleans_up_after_sigkill`: run in a child process of the test
    /// binary, it starts a cluster, reports it on stdout and waits to be killed.
    #[test]
    #[ignore = "helper process for watchdog_cleans_up_after_sigkill"]
    fn watchdog_child() {
        if std::env::var_os("TW_EMBEDDED_WATCHDOG_CHILD").is_none() {
            return;
        }
        let cluster = EphemeralCluster::start().expect("start ephemeral cluster");
        println!(
            "CLUSTER {} {}",
            cluster.port(),
            cluster.data_dir().display()
        );
        io::stdout().flush().expect("flush");
        std::thread::sleep(Duration::from_secs(120));
    }

    #[test]
    fn watchdog_cleans_up_after_sigkill() {
        let exe = std::env::current_exe().expect("current exe");
        let mut child = Command::new(exe)
            .args(["embedded::tests::watchdog_child", "--exact", "--ignored"])
            .args(["--nocapture", "--test-threads=1"])
            .env("TW_EMBEDDED_WATCHDOG_CHILD", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child test process");
        let stdout = child.stdout.take().expect("child stdout");
        let mut reported = None;
        for line in io::BufReader::new(stdout).lines() {
            let line = line.expect("read child stdout");
            // libtest prints "test <name> ... " before the test's own output.
            if let Some(rest) = line.split_once("CLUSTER ").map(|(_, rest)| rest) {
                reported = rest
                    .split_once(' ')
                    .map(|(port, dir)| (port.parse::<u16>().expect("port"), PathBuf::from(dir)));
                break;
            }
        }
        let Some((port, dir)) = reported else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child process did not report its cluster");
        };
        assert!(accepts_tcp(port));
        assert!(dir.exists());

        child.kill().expect("SIGKILL child"); // std's kill() sends SIGKILL
        child.wait().expect("reap child");

        let deadline = Instant::now() + Duration::from_secs(60);
        while (dir.exists() || accepts_tcp(port)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(!dir.exists(), "watchdog removed {}", dir.display());
        assert!(!accepts_tcp(port), "watchdog stopped the server");
    }

    /// Stops the cluster even if an assertion fails half-way.
    struct StopOnDrop<'a>(&'a Path);

    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            let _ = LocalCluster::stop(self.0);
        }
    }

    #[test]
    fn local_cluster_lifecycle() {
        let parent = tempfile::Builder::new()
            .prefix("tenant-worker-local-test-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let dir = parent.path().join("pg");
        let _guard = StopOnDrop(&dir);

        assert_eq!(
            LocalCluster::status(&dir).expect("status"),
            ClusterStatus::NotInitialized
        );

        if nix::unistd::geteuid().is_root() {
            // A 0700 root directory on the way: the unprivileged user cannot get in.
            fs::set_permissions(parent.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
            let err = LocalCluster::ensure_running(&dir).expect_err("not accessible");
            assert!(
                matches!(err, Error::DataDirNotAccessible { .. }),
                "unexpected error: {err}"
            );
            assert!(err.to_string().contains("dev.data_dir"), "{err}");
            fs::set_permissions(parent.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        }

        let first = LocalCluster::ensure_running(&dir).expect("first ensure_running");
        let port = first.port();
        assert!(accepts_tcp(port));
        assert_eq!(first.data_dir(), dir.canonicalize().expect("canonical"));
        if let Some(out) = psql_select_1(port) {
            assert_eq!(out, "1");
        }

        let second = LocalCluster::ensure_running(&dir).expect("second ensure_running");
        assert_eq!(second.port(), port, "port is kept");
        assert_eq!(second.admin_url(), first.admin_url());

        let status = LocalCluster::status(&dir).expect("status");
        let ClusterStatus::Running { port: p, pid } = status else {
            panic!("expected Running, got {status:?}");
        };
        assert_eq!(p, port);
        assert!(pid > 0);

        assert!(LocalCluster::stop(&dir).expect("stop"), "was running");
        assert!(!accepts_tcp(port));
        assert_eq!(
            LocalCluster::status(&dir).expect("status"),
            ClusterStatus::Stopped { port }
        );
        assert!(
            !LocalCluster::stop(&dir).expect("stop again"),
            "already stopped"
        );

        let third = LocalCluster::ensure_running(&dir).expect("restart via ensure_running");
        assert_eq!(third.port(), port);
        assert!(accepts_tcp(port));
        assert!(LocalCluster::stop(&dir).expect("final stop"));
        // `parent` (TempDir) removes everything.
    }
}
