//! The listening socket: created safely at the configured path, or taken over from systemd.
//!
//! Creating one ([`Listener::bind`]):
//! 1. the parent directory must exist and must not be writable by anyone but the agent's
//!    user and group: not world-writable, and group-writable only if its group is the
//!    agent's own (effective) group. Whoever may write there could replace the socket;
//! 2. an existing file at the path must be a socket nobody answers on (a stale one from a
//!    crashed agent); if something answers, another agent is running and we refuse;
//! 3. the socket is bound inside a fresh temporary directory (mode 0700) in the same
//!    directory, given its mode and group there, and only then renamed onto the path: `bind`
//!    creates the file with the process umask's permissions, and inside that directory
//!    nobody else can reach it before its mode is set.
//!
//! A listener this process created removes its socket file when dropped, unless the file
//! has been replaced since. A socket-activated listener ([`Listener::from_std`]) is never
//! unlinked: systemd owns it. No threads; the blocking calls here are quick metadata calls
//! made once at start-up.

use std::io;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};

/// The default socket path.
pub const DEFAULT_SOCKET: &str = "/run/tm-agent/agent.sock";

/// Where and how to create the socket (the `[socket]` table of the config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SocketSettings {
    pub path: PathBuf,
    /// Permission bits of the socket file (connecting needs write permission).
    pub mode: u32,
    /// Group owning the socket file: a name (`/etc/group`, then NSS) or a numeric gid. `None`
    /// keeps the agent's group.
    pub group: Option<String>,
}

impl Default for SocketSettings {
    fn default() -> Self {
        SocketSettings {
            path: PathBuf::from(DEFAULT_SOCKET),
            mode: 0o660,
            group: None,
        }
    }
}

/// Why the socket could not be set up. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error(
        "refusing to listen in {dir}: the directory is world-writable, so anyone could replace \
         the socket; use a directory only tm-agent can write, e.g. /run/tm-agent \
         (RuntimeDirectory=tm-agent)"
    )]
    WorldWritableDir { dir: PathBuf },
    #[error(
        "refusing to listen in {dir}: the directory is writable by group {gid}, which is not \
         tm-agent's own group, so its members could replace the socket; remove the group's \
         write permission (chmod g-w) or use a directory only tm-agent can write, e.g. \
         /run/tm-agent (RuntimeDirectory=tm-agent)"
    )]
    GroupWritableDir { dir: PathBuf, gid: u32 },
    #[error(
        "socket directory {dir} does not exist: create it (systemd: RuntimeDirectory=tm-agent)"
    )]
    NoDir { dir: PathBuf },
    #[error(
        "cannot create the socket in {dir}: the user tm-agent runs as may not write there; \
         give it the directory (systemd: RuntimeDirectory=tm-agent makes /run/tm-agent) or \
         choose another socket.path"
    )]
    DirNotWritable { dir: PathBuf },
    #[error(
        "cannot create the socket in {dir}: it is on a read-only mount (under systemd, \
         ProtectSystem=strict leaves little writable: use /run/tm-agent, or add the directory \
         to ReadWritePaths= in a drop-in)"
    )]
    ReadOnlyDir { dir: PathBuf },
    #[error("another tm-agent is listening on {path}: stop it first (systemctl stop tm-agent)")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket: remove it or choose another socket path")]
    NotASocket { path: PathBuf },
    #[error(
        "group `{group}` does not exist (not in /etc/group, nor through NSS): create it \
         (systemd-sysusers) or change socket.group"
    )]
    NoGroup { group: String },
    #[error("socket.group: {reason}")]
    GroupLookup { reason: String },
    #[error("socket mode {mode:o} is invalid: give permission bits such as 0o660")]
    BadMode { mode: u32 },
    #[error(
        "cannot give the socket group {gid} (socket.group): permission denied. Only root \
         (with CAP_CHOWN) or a member of the group may: add tm-agent's user to the group \
         (a membership takes effect in the next session or service start), or let the \
         system unit tm-agent.socket create the socket with its group"
    )]
    NotInGroup { gid: u32 },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ListenerError {
    /// True when the operator must change the config or the system before a start can
    /// work (a restart alone cannot fix it): the daemon exits 78 for these.
    pub fn is_config_problem(&self) -> bool {
        match self {
            ListenerError::WorldWritableDir { .. }
            | ListenerError::GroupWritableDir { .. }
            | ListenerError::NoDir { .. }
            | ListenerError::DirNotWritable { .. }
            | ListenerError::ReadOnlyDir { .. }
            | ListenerError::NotASocket { .. }
            | ListenerError::NoGroup { .. }
            | ListenerError::BadMode { .. }
            | ListenerError::NotInGroup { .. } => true,
            // Another agent may stop, NSS may come back, an I/O error may pass.
            ListenerError::InUse { .. }
            | ListenerError::GroupLookup { .. }
            | ListenerError::Io { .. } => false,
        }
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ListenerError + 'a {
    move |source| ListenerError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A listening Unix socket.
#[derive(Debug)]
pub struct Listener {
    inner: UnixListener,
    /// The socket file to remove on drop, with the inode it had when we created it.
    owned_file: Option<(PathBuf, u64, u64)>,
    description: String,
}

impl Listener {
    /// Creates the socket at `settings.path` (see the module docs). Must be called inside a
    /// tokio runtime.
    pub fn bind(settings: &SocketSettings) -> Result<Listener, ListenerError> {
        let path = settings.path.as_path();
        if settings.mode > 0o777 {
            return Err(ListenerError::BadMode {
                mode: settings.mode,
            });
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let dir_meta = std::fs::metadata(&dir).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                ListenerError::NoDir { dir: dir.clone() }
            } else {
                io_err("cannot inspect", &dir)(e)
            }
        })?;
        if dir_meta.mode() & 0o002 != 0 {
            return Err(ListenerError::WorldWritableDir { dir });
        }
        if dir_meta.mode() & 0o020 != 0 && effective_gid() != Some(dir_meta.gid()) {
            return Err(ListenerError::GroupWritableDir {
                dir,
                gid: dir_meta.gid(),
            });
        }
        let gid = settings.group.as_deref().map(resolve_group).transpose()?;
        check_existing(path)?;

        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "agent.sock".into());
        let temp_dir = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
        create_private_dir(&temp_dir)?;
        let temp = temp_dir.join("socket");
        let bound = (|| {
            let listener = std::os::unix::net::UnixListener::bind(&temp)
                .map_err(io_err("cannot bind", &temp))?;
            std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(settings.mode))
                .map_err(io_err("cannot set the mode of", &temp))?;
            if let Some(gid) = gid {
                std::os::unix::fs::chown(&temp, None, Some(gid)).map_err(|e| {
                    if e.kind() == io::ErrorKind::PermissionDenied {
                        ListenerError::NotInGroup { gid }
                    } else {
                        io_err("cannot change the group of", &temp)(e)
                    }
                })?;
            }
            std::fs::rename(&temp, path).map_err(io_err("cannot move the socket onto", path))?;
            Ok(listener)
        })();
        if bound.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        let _ = std::fs::remove_dir(&temp_dir);
        let std_listener = bound?;
        let meta = std::fs::metadata(path).map_err(io_err("cannot inspect", path))?;
        std_listener
            .set_nonblocking(true)
            .map_err(io_err("cannot configure", path))?;
        let inner =
            UnixListener::from_std(std_listener).map_err(io_err("cannot register", path))?;
        Ok(Listener {
            inner,
            owned_file: Some((path.to_path_buf(), meta.dev(), meta.ino())),
            description: path.display().to_string(),
        })
    }

    /// Wraps an already listening socket, e.g. one handed over by systemd
    /// (see [`crate::systemd::take_activated_listener`]). Must be called inside a tokio
    /// runtime. The socket file is left alone on drop.
    pub fn from_std(listener: std::os::unix::net::UnixListener) -> io::Result<Listener> {
        listener.set_nonblocking(true)?;
        let description = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
            .map(|p| format!("{p} (socket-activated)"))
            .unwrap_or_else(|| "socket-activated listener".into());
        Ok(Listener {
            inner: UnixListener::from_std(listener)?,
            owned_file: None,
            description,
        })
    }

    /// Accepts one connection.
    pub async fn accept(&self) -> io::Result<UnixStream> {
        self.inner.accept().await.map(|(stream, _)| stream)
    }

    /// The socket path, for logs.
    pub fn describe(&self) -> &str {
        &self.description
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some((path, dev, ino)) = &self.owned_file {
            // Only remove the file if it is still ours (a successor may have replaced it).
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if meta.dev() == *dev && meta.ino() == *ino {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

/// Creates `dir` with mode 0700 (less, under a stricter umask). A leftover of a crashed
/// agent that had the same pid (common in containers) is removed first: only the agent's
/// user and group can write in the parent, so it is ours.
fn create_private_dir(dir: &Path) -> Result<(), ListenerError> {
    use std::os::unix::fs::DirBuilderExt as _;
    let create = || std::fs::DirBuilder::new().mode(0o700).create(dir);
    match create() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let _ = std::fs::remove_file(dir.join("socket"));
            std::fs::remove_dir(dir).map_err(io_err("cannot remove the leftover", dir))?;
            create()
        }
        other => other,
    }
    .map_err(|e| match (e.kind(), dir.parent()) {
        (io::ErrorKind::PermissionDenied, Some(parent)) => ListenerError::DirNotWritable {
            dir: parent.to_path_buf(),
        },
        (io::ErrorKind::ReadOnlyFilesystem, Some(parent)) => ListenerError::ReadOnlyDir {
            dir: parent.to_path_buf(),
        },
        _ => io_err("cannot create", dir)(e),
    })
}

/// The agent's effective gid, from `/proc/self/status` (this crate calls no libc directly).
fn effective_gid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let gids = status.lines().find_map(|l| l.strip_prefix("Gid:"))?;
    // real, effective, saved, filesystem
    gids.split_whitespace().nth(1)?.parse().ok()
}

/// A group name or numeric gid → gid: `/etc/group`, then NSS (as `[[access]]` names).
/// Blocks like a rules compile (getent runs are bounded). `Config::load` calls it too, so
/// that `check` and a start report a missing group as a config problem.
pub fn resolve_group(group: &str) -> Result<u32, ListenerError> {
    match crate::authz::system_group_gid(group) {
        Ok(Some(gid)) => Ok(gid),
        Ok(None) => group.parse::<u32>().map_err(|_| ListenerError::NoGroup {
            group: group.to_owned(),
        }),
        Err(reason) => Err(ListenerError::GroupLookup { reason }),
    }
}

/// Refuses if `path` is in use or not a socket; removes nothing (the rename replaces it).
fn check_existing(path: &Path) -> Result<(), ListenerError> {
    use std::os::unix::fs::FileTypeExt as _;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("cannot inspect", path)(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ListenerError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ListenerError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "replacing a stale socket (nobody listens on it)");
            Ok(())
        }
        Err(e) => Err(io_err("cannot probe the existing socket", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(path: PathBuf) -> SocketSettings {
        SocketSettings {
            path,
            mode: 0o660,
            group: None,
        }
    }

    #[tokio::test]
    async fn creates_with_mode_replaces_stale_and_refuses_live() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o750)).unwrap();
        let path = dir.path().join("agent.sock");
        // A stale socket: bound, then its listener closed.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let first = Listener::bind(&settings(path.clone())).unwrap();
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let err = Listener::bind(&settings(path.clone())).unwrap_err();
        assert!(matches!(err, ListenerError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("another tm-agent is listening on"));
        drop(first);
        assert!(!path.exists(), "our socket file is removed on drop");
    }

    #[tokio::test]
    async fn refuses_world_writable_dir_regular_file_and_missing_group() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let err = Listener::bind(&settings(dir.path().join("a.sock"))).unwrap_err();
        assert!(
            matches!(err, ListenerError::WorldWritableDir { .. }),
            "{err}"
        );

        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = Listener::bind(&settings(file)).unwrap_err();
        assert!(matches!(err, ListenerError::NotASocket { .. }), "{err}");

        let mut s = settings(dir.path().join("b.sock"));
        s.group = Some("no-such-group-tm-agent".into());
        let err = Listener::bind(&s).unwrap_err();
        assert!(err
            .to_string()
            .contains("group `no-such-group-tm-agent` does not exist"));

        let err = Listener::bind(&settings(dir.path().join("missing/c.sock"))).unwrap_err();
        assert!(matches!(err, ListenerError::NoDir { .. }), "{err}");
    }

    #[tokio::test]
    async fn group_writable_dir_only_of_the_agent_s_own_group() {
        let dir = tempfile::tempdir().unwrap();
        let own = effective_gid().expect("/proc/self/status has our gids");
        std::os::unix::fs::chown(dir.path(), None, Some(own)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o770)).unwrap();
        let l = Listener::bind(&settings(dir.path().join("a.sock"))).unwrap();
        drop(l);
        let other = if own == 65534 { 65533 } else { 65534 };
        if std::os::unix::fs::chown(dir.path(), None, Some(other)).is_ok() {
            let err = Listener::bind(&settings(dir.path().join("b.sock"))).unwrap_err();
            assert!(
                matches!(err, ListenerError::GroupWritableDir { gid, .. } if gid == other),
                "{err}"
            );
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o750)).unwrap();
            drop(Listener::bind(&settings(dir.path().join("c.sock"))).unwrap());
        }
    }

    #[tokio::test]
    async fn binds_in_a_private_temporary_directory_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        // A leftover of a crashed agent with our pid.
        let leftover = dir
            .path()
            .join(format!(".agent.sock.{}.tmp", std::process::id()));
        std::fs::create_dir(&leftover).unwrap();
        drop(std::os::unix::net::UnixListener::bind(leftover.join("socket")).unwrap());
        let _l = Listener::bind(&settings(path.clone())).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["agent.sock"]);
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o660);
    }

    /// Set in the child run of the test below.
    const CHILD_ENV: &str = "TM_AGENT_TEST_NO_CHOWN";

    /// An agent that may not give the socket its group (not root, not a member) is told so.
    /// As root (CI), the test runs itself again without CAP_CHOWN and with no supplementary
    /// groups, where the kernel's rule for other users applies to it.
    #[tokio::test]
    async fn a_group_the_agent_may_not_give_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let uid = std::fs::metadata(dir.path()).unwrap().uid();
        if uid == 0 && std::env::var_os(CHILD_ENV).is_none() {
            let name =
                "server::listener::tests::a_group_the_agent_may_not_give_is_named_in_the_error";
            let out = std::process::Command::new("setpriv")
                .args([
                    "--clear-groups",
                    "--inh-caps=-chown",
                    "--bounding-set=-chown",
                ])
                .arg(std::env::current_exe().unwrap())
                .args([name, "--exact", "--test-threads=1"])
                .env(CHILD_ENV, "1")
                .output()
                .expect("setpriv (util-linux)");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let own = effective_gid().expect("/proc/self/status has our gids");
        let other = if own == 65534 { 65533 } else { 65534 };
        let path = dir.path().join("n.sock");
        let mut s = settings(path.clone());
        s.group = Some(other.to_string());
        let err = Listener::bind(&s).unwrap_err();
        assert!(
            matches!(err, ListenerError::NotInGroup { gid } if gid == other),
            "{err}"
        );
        assert!(err.to_string().contains("a member of the group"), "{err}");
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn sets_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sock");
        let mut s = settings(path.clone());
        // gid 0 exists everywhere as `root`; numeric gids are accepted too.
        s.group = Some("65534".into());
        let _l = Listener::bind(&s).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().gid(), 65534);
    }
}
