//! A PostgreSQL that the product starts by itself from the installed server binaries.
//!
//! Nothing beyond the PostgreSQL server binaries has to be installed or configured for the
//! demo, the tests or a first try: this module keeps that promise in two flavours:
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
pub(crate) use tracing::{debug, info, warn};

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

mod binaries;
mod command;
mod ctl;
mod ephemeral;
mod local;

#[cfg(test)]
use binaries::*;
use command::*;
use ctl::*;

pub use binaries::find_binaries;
pub use ephemeral::EphemeralCluster;
pub use local::{ClusterStatus, LocalCluster};

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
