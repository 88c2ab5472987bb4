//! [`LocalCluster`]: the persistent development cluster.

use super::*;

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
pub(super) fn existing_ctl(dir: &Path) -> Result<Option<Ctl>> {
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
pub(super) fn take_over_dir(dir: &Path, user: &RunAs) -> Result<()> {
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
pub(super) fn lock_dir(ctl: &Ctl) -> Result<Flock<File>> {
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
pub(super) fn init_local(ctl: &Ctl) -> Result<()> {
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
