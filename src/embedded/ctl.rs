//! One cluster's directory layout and the `initdb`/`pg_ctl` calls on it.

use super::*;

/// Paths of one cluster; see the module docs for the layout.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    pub(super) dir: PathBuf,
    pub(super) pgdata: PathBuf,
    pub(super) log: PathBuf,
}

impl Layout {
    pub(super) fn new(dir: PathBuf) -> Self {
        Self {
            pgdata: dir.join("data"),
            log: dir.join("postgres.log"),
            dir,
        }
    }

    pub(super) fn conf(&self) -> PathBuf {
        self.pgdata.join(CONF_FILE)
    }

    pub(super) fn is_initialized(&self) -> bool {
        self.pgdata.join("PG_VERSION").is_file()
    }
}

/// Context for running PostgreSQL commands against one cluster.
#[derive(Debug, Clone)]
pub(super) struct Ctl {
    pub(super) bin: PathBuf,
    pub(super) run_as: Option<RunAs>,
    pub(super) layout: Layout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PgCtlStatus {
    Running { pid: u32 },
    Stopped,
}

impl Ctl {
    pub(super) fn command(&self, tool: &str) -> Command {
        base_command(&self.bin.join(tool), self.run_as.as_ref(), &self.layout.dir)
    }

    pub(super) fn pg_ctl(&self, action: &str) -> Command {
        let mut cmd = self.command("pg_ctl");
        cmd.arg(action).arg("-D").arg(&self.layout.pgdata);
        cmd
    }

    /// Runs `initdb` into `target` (the data directory or a staging directory).
    pub(super) fn initdb(&self, target: &Path, no_sync: bool) -> Result<()> {
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
    pub(super) fn write_conf(&self, pgdata: &Path, port: u16) -> Result<()> {
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
    pub(super) fn read_port(&self) -> Result<Option<u16>> {
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
    pub(super) fn status(&self) -> Result<PgCtlStatus> {
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
    pub(super) fn start_once(&self) -> Result<()> {
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
    pub(super) fn remove_zombie_lock_files(&self) -> Result<()> {
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
    pub(super) fn run_server_command(&self, mut cmd: Command) -> Result<()> {
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
    pub(super) fn start_with_retries(&self, mut port: u16) -> Result<u16> {
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

    pub(super) fn port_conflict(&self, log_offset: u64) -> bool {
        let log = read_log_from(&self.layout.log, log_offset);
        log.contains("Address already in use")
            || log.contains("could not bind")
            || log.contains("could not create any TCP/IP sockets")
    }

    pub(super) fn stop(&self, mode: &str) -> Result<()> {
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
    pub(super) fn wait_for_tcp(&self, port: u16) -> Result<()> {
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
pub(super) fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// Extracts `N` from pg_ctl's `server is running (PID: N)`.
pub(super) fn parse_pid(text: &str) -> Option<u32> {
    let rest = &text[text.find("PID:")? + 4..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

pub(super) fn pid_from_pid_file(pgdata: &Path) -> Option<u32> {
    pid_from_lock_file(&pgdata.join("postmaster.pid"))
}

/// The PID on the first line of a PostgreSQL lock file.
pub(super) fn pid_from_lock_file(path: &Path) -> Option<u32> {
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
pub(super) fn is_zombie(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "<pid> (<comm>) <state> ...": comm may contain spaces and parentheses.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state == "Z")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub(super) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(io_err("binding 127.0.0.1:0 to find a free port"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("reading the address of a bound socket"))?
        .port();
    Ok(port)
}

pub(super) fn admin_url(port: u16) -> String {
    format!("postgres://{SUPERUSER}@127.0.0.1:{port}/postgres")
}

// ---------------------------------------------------------------------------------------------
// EphemeralCluster
// ---------------------------------------------------------------------------------------------
