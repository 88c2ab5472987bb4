//! [`EphemeralCluster`]: the private throwaway cluster of the tests and the demo.

use super::*;

/// The watchdog script; `$1` = pg_ctl, `$2` = data directory, `$3` = cluster directory.
///
/// It ignores SIGINT/SIGHUP (a Ctrl-C in the terminal must not kill it), waits until our end
/// of its stdin closes (EOF: we dropped the pipe or died), then stops the server and removes
/// the directory. Both steps tolerate there being nothing left to do.
pub(super) const WATCHDOG_SCRIPT: &str = "trap '' INT HUP; read _ignored; \
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

    pub(super) fn init_and_start(&mut self) -> Result<()> {
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

    pub(super) fn spawn_watchdog(&mut self) -> Result<()> {
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
