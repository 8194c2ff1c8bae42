//! A private PostgreSQL 15 cluster in a directory (`./.stageflow` for the demo): created on first
//! use with the system's PostgreSQL, started on a free port of 127.0.0.1 with `stageflow`
//! preloaded, reused while it runs. As root, the cluster runs as the `postgres` user (PostgreSQL
//! refuses root).
//!
//! Every connection needs a password (scram-sha-256, TCP and the unix socket alike): a local user
//! who can reach 127.0.0.1 is not a superuser of it. The password is generated when the cluster is
//! created and kept with its URL in `<dir>/url`, readable by its owner only (0600). A directory
//! given as a symbolic link is refused (as root the command hands the directory to `postgres`,
//! and would hand over wherever the link points).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The PostgreSQL 15 programs: Debian's, or `STAGEFLOW_PG_BINDIR` (a relocated copy of them, or
/// another build of PostgreSQL 15).
pub(crate) fn bin() -> String {
    std::env::var("STAGEFLOW_PG_BINDIR").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".to_string())
}

pub struct Cluster {
    dir: PathBuf,
    settings: Vec<String>,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// A command run as the cluster's owner: `postgres` when we are root, ourselves otherwise.
fn as_owner(program: &str) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--", program]);
        command
    } else {
        Command::new(program)
    }
}

fn run(mut command: Command, what: &str) -> Result<String, String> {
    let output = command.stdin(Stdio::null()).output().map_err(|e| format!("{what}: cannot run: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

impl Cluster {
    pub fn at(dir: impl AsRef<Path>) -> Result<Self, String> {
        let dir = dir.as_ref();
        if dir.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(format!(
                "{} is a symbolic link: a cluster directory must be a directory of its own (remove the link, or name \
                 the directory it points to)",
                dir.display()
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let dir = dir.canonicalize().map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Cluster { dir, settings: Vec::new() })
    }

    /// Extra `name=value` server settings used when this starts the cluster.
    pub fn with_settings(mut self, settings: &[&str]) -> Self {
        self.settings = settings.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn url_file(&self) -> PathBuf {
        self.dir.join("url")
    }

    /// Whether the cluster has been created (initdb ran) in this directory.
    pub fn exists(&self) -> bool {
        self.data().join("PG_VERSION").exists()
    }

    pub fn is_running(&self) -> bool {
        self.data().join("postmaster.pid").exists()
            && as_owner(&format!("{}/pg_ctl", bin()))
                .arg("status")
                .arg("-D")
                .arg(self.data())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    }

    /// The URL of the running cluster's `postgres` database.
    pub fn url(&self) -> Option<String> {
        if !self.is_running() {
            return None;
        }
        std::fs::read_to_string(self.url_file()).ok().map(|url| url.trim().to_owned())
    }

    /// Creates the cluster if needed and starts it if it is not running; returns its URL.
    pub fn ensure_running(&self) -> Result<String, String> {
        if let Some(url) = self.url() {
            return Ok(url);
        }
        if is_root() {
            let mut chown = Command::new("chown");
            chown.arg("postgres:postgres").arg(&self.dir);
            run(chown, "chown")?;
            let reachable = Command::new("runuser")
                .args(["-u", "postgres", "--", "test", "-w"])
                .arg(&self.dir)
                .status()
                .is_ok_and(|s| s.success());
            if !reachable {
                return Err(format!(
                    "the postgres user cannot write to {} (a parent directory is closed to it); \
                     run from a directory every user can reach, or `chmod o+x` its parents",
                    self.dir.display()
                ));
            }
        }
        let mut password = self.password();
        if !self.data().join("PG_VERSION").exists() {
            let generated = generate_password()?;
            // initdb reads the superuser's password from a file the cluster's owner can read; it
            // is removed once initdb has run, whatever the outcome.
            let pwfile = self.dir.join(".initdb-password");
            write_private(&pwfile, &generated)?;
            if is_root() {
                let mut chown = Command::new("chown");
                chown.arg("postgres:postgres").arg(&pwfile);
                run(chown, "chown")?;
            }
            let mut initdb = as_owner(&format!("{}/initdb", bin()));
            initdb.arg("-D").arg(self.data()).args([
                "-U",
                "postgres",
                "-A",
                "scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ]);
            initdb.arg(format!("--pwfile={}", pwfile.display()));
            let created = run(initdb, "initdb");
            let _ = std::fs::remove_file(&pwfile);
            created?;
            password = Some(generated);
        }
        // The port it had before, if still free, so clients reconnect to the same URL after a restart.
        let previous = std::fs::read_to_string(self.url_file())
            .ok()
            .and_then(|url| {
                url.trim().rsplit_once(':').and_then(|(_, rest)| rest.split('/').next()?.parse::<u16>().ok())
            })
            .filter(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok());
        let port = match previous {
            Some(port) => port,
            None => free_port()?,
        };
        let mut options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c shared_preload_libraries=stageflow -c max_connections=200",
            self.dir.display()
        );
        for setting in &self.settings {
            options.push_str(&format!(" -c {setting}"));
        }
        let mut start = as_owner(&format!("{}/pg_ctl", bin()));
        start
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("postgres.log"))
            .args(["-w", "-t", "60", "start", "-o", &options]);
        run(start, "pg_ctl start").map_err(|e| format!("{e}\n(see {})", self.dir.join("postgres.log").display()))?;
        // (A cluster created before passwords keeps its own pg_hba.conf: no password in its URL.)
        let url = match password {
            Some(password) => format!("postgres://postgres:{password}@127.0.0.1:{port}/postgres"),
            None => format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        };
        write_private(&self.url_file(), &url)?;
        Ok(url)
    }

    /// The superuser's password, from the URL the cluster was last started with.
    fn password(&self) -> Option<String> {
        let url = std::fs::read_to_string(self.url_file()).ok()?;
        let userinfo = url.trim().strip_prefix("postgres://")?.split_once('@')?.0.to_owned();
        userinfo.split_once(':').map(|(_, password)| password.to_owned())
    }

    /// Stops the cluster if it runs (`mode`: pg_ctl's smart, fast or immediate); returns whether it did.
    pub fn stop(&self, mode: &str) -> Result<bool, String> {
        if !self.is_running() {
            return Ok(false);
        }
        let mut stop = as_owner(&format!("{}/pg_ctl", bin()));
        stop.arg("-D").arg(self.data()).args(["-m", mode, "-w", "stop"]);
        run(stop, "pg_ctl stop")?;
        Ok(true)
    }
}

/// 32 random bytes from the system, in hex (URL-safe as it is).
fn generate_password() -> Result<String, String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `contents` to a file only its owner can read or write (created so: never readable by
/// others, not even for a moment).
fn write_private(path: &Path, contents: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // (an existing file keeps its mode through open: set it)
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(contents.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
}

/// `url` with its password, if any, shown as `***` (for output that others may read).
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    match rest.split_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            format!("{scheme}://{}:***@{host}", userinfo.split_once(':').map_or(userinfo, |(user, _)| user))
        }
        _ => url.to_owned(),
    }
}
