//! Names that `/etc/passwd` and `/etc/group` lack, asked of NSS (sssd, nss-systemd, LDAP...)
//! the way `id` and `getent` see them: by running `getent`, which keeps the crate free of
//! `unsafe` and of bindings to libc's `getpwnam_r`/`getgrnam_r`.
//!
//! Owns the [`NameService`] seam (tests put a double behind it), [`Getent`] (the system one:
//! `/usr/bin/getent`, else `/bin/getent`), and the checks that keep a config from passing
//! options to it ([`plausible_name`] for names from the config, and a second check on every
//! key that reaches the command line, which also gets `--` before the keys).
//!
//! Threading: blocking. One [`NameService::getent`] call on [`Getent`] runs one child process
//! (stdin `/dev/null`, stderr discarded) and a short-lived thread that drains its stdout; it
//! waits at most the timeout ([`Getent::TIMEOUT`]), then kills the child and reports. It is
//! used only while access rules are compiled (start, SIGHUP), never while serving a request.

use std::fmt;
use std::io::Read as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The NSS databases asked here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Database {
    Passwd,
    Group,
}

impl Database {
    pub fn as_str(self) -> &'static str {
        match self {
            Database::Passwd => "passwd",
            Database::Group => "group",
        }
    }
}

impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where names that the files lack are looked up.
pub trait NameService {
    /// What `getent <db> <keys>` prints: one line in the file format of `db`
    /// (`name:x:uid:gid:...`, `name:x:gid:member,...`) per key found. Keys that are not found
    /// are left out; that is not an error.
    fn getent(&self, db: Database, keys: &[&str]) -> Result<String, NssError>;
}

/// Why NSS could not answer (as opposed to answering "no such name").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NssError {
    #[error(
        "`{command}` gave no answer within {secs} s and was stopped: the NSS backend (sssd, \
         LDAP...) is slow or unreachable; check it (systemctl status sssd; getent {db} NAME)"
    )]
    Timeout {
        command: String,
        db: Database,
        secs: u64,
    },
    #[error(
        "cannot run getent (tried {tried}): {reason}; install it (Debian/Ubuntu: libc-bin, \
         RHEL: glibc-common)"
    )]
    NoGetent { tried: String, reason: String },
    #[error("`{command}` failed ({status}): check /etc/nsswitch.conf and the NSS backend")]
    Failed { command: String, status: String },
    #[error("`{command}`: {reason}")]
    Output { command: String, reason: String },
    #[error("`{key}` is not passed to getent: {reason}")]
    UnsafeKey { key: String, reason: &'static str },
}

/// Checks that `name` (from the config) may be an account name before it is looked up:
/// `Err` says why not. Beyond what [`Getent`] itself refuses, numbers (all digits, with or
/// without a leading `+`: getent reads them as ids) and `,` (the member separator of the
/// group format) are refused.
pub fn plausible_name(name: &str) -> Result<(), &'static str> {
    unsafe_key(name)?;
    let digits = name.strip_prefix('+').unwrap_or(name);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err("it is a number; give a numeric id as `uid`/`gid`");
    }
    if name.contains(',') {
        return Err("it contains ','");
    }
    Ok(())
}

/// Why `key` must not become an argument of getent, if it must not.
fn unsafe_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        Err("it is empty")
    } else if key.len() > 256 {
        Err("it is longer than 256 bytes")
    } else if key.starts_with('-') {
        Err("it starts with '-'")
    } else if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err("it contains whitespace or a control character")
    } else if key.contains(':') {
        Err("it contains ':'")
    } else {
        Ok(())
    }
}

/// NSS through the `getent` program.
#[derive(Debug, Clone)]
pub struct Getent {
    programs: Vec<PathBuf>,
    timeout: Duration,
}

impl Default for Getent {
    fn default() -> Getent {
        Getent::new()
    }
}

impl Getent {
    /// How long one lookup may take before getent is killed and the lookup reported failed.
    pub const TIMEOUT: Duration = Duration::from_secs(5);
    /// getent's output is read up to this size; a larger answer is refused.
    const MAX_OUTPUT: u64 = 16 << 20;

    /// `/usr/bin/getent`, else `/bin/getent` (never a `PATH` search), with [`Getent::TIMEOUT`].
    pub fn new() -> Getent {
        Getent {
            programs: vec!["/usr/bin/getent".into(), "/bin/getent".into()],
            timeout: Getent::TIMEOUT,
        }
    }

    /// Another program with getent's interface, or another timeout (tests).
    pub fn with_program(program: PathBuf, timeout: Duration) -> Getent {
        Getent {
            programs: vec![program],
            timeout,
        }
    }
}

impl NameService for Getent {
    fn getent(&self, db: Database, keys: &[&str]) -> Result<String, NssError> {
        if keys.is_empty() {
            return Ok(String::new());
        }
        for key in keys {
            unsafe_key(key).map_err(|reason| NssError::UnsafeKey {
                key: (*key).to_owned(),
                reason,
            })?;
        }
        let command = describe(db, keys);
        let tried = || {
            self.programs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let program =
            self.programs
                .iter()
                .find(|p| p.is_file())
                .ok_or_else(|| NssError::NoGetent {
                    tried: tried(),
                    reason: "not found".into(),
                })?;
        // A clean environment: the agent's may hold a PIN (`pin = { env = … }`), and getent
        // loads NSS modules that have no business seeing it.
        let mut child = Command::new(program)
            .env_clear()
            .env("LC_ALL", "C")
            .arg(db.as_str())
            .arg("--")
            .args(keys)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| NssError::NoGetent {
                tried: program.display().to_string(),
                reason: e.to_string(),
            })?;
        let deadline = Instant::now() + self.timeout;
        let timeout = || NssError::Timeout {
            command: command.clone(),
            db,
            secs: self.timeout.as_secs().max(1),
        };
        let output = match drain(&mut child, deadline) {
            Ok(output) => output,
            Err(e) => {
                stop(&mut child);
                return Err(match e {
                    Drain::TimedOut => timeout(),
                    Drain::Failed(reason) => NssError::Output {
                        command: command.clone(),
                        reason,
                    },
                });
            }
        };
        // Its stdout has closed: getent is exiting (a backend that hangs does so before the
        // answer, which the bounded read above covers), so this wait returns at once.
        let status = child.wait().map_err(|e| NssError::Output {
            command: command.clone(),
            reason: format!("cannot wait for it: {e}"),
        })?;
        // 0: every key found; 2: some key not found (the others are printed).
        match status.code() {
            Some(0 | 2) => String::from_utf8(output).map_err(|_| NssError::Output {
                command,
                reason: "the answer is not UTF-8".into(),
            }),
            _ => Err(NssError::Failed {
                command,
                status: status.to_string(),
            }),
        }
    }
}

/// `getent passwd alice`, shortened when a group has many members.
fn describe(db: Database, keys: &[&str]) -> String {
    const SHOWN: usize = 4;
    let mut text = format!("getent {db} {}", keys[..keys.len().min(SHOWN)].join(" "));
    if keys.len() > SHOWN {
        text.push_str(&format!(" ... ({} names)", keys.len()));
    }
    text
}

enum Drain {
    TimedOut,
    Failed(String),
}

/// Reads the child's stdout to its end (on a thread, so that the wait is bounded).
fn drain(child: &mut Child, deadline: Instant) -> Result<Vec<u8>, Drain> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Drain::Failed("no stdout pipe".into()))?;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("tm-agent-getent".into())
        .spawn(move || {
            let mut output = Vec::new();
            let read = stdout
                .take(Getent::MAX_OUTPUT + 1)
                .read_to_end(&mut output)
                .map(|_| output);
            let _ = tx.send(read);
        })
        .map_err(|e| Drain::Failed(format!("cannot start a thread to read it: {e}")))?;
    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(Ok(output)) if output.len() as u64 > Getent::MAX_OUTPUT => Err(Drain::Failed(format!(
            "the answer is larger than {} MiB",
            Getent::MAX_OUTPUT >> 20
        ))),
        Ok(Ok(output)) => Ok(output),
        Ok(Err(e)) => Err(Drain::Failed(format!("cannot read its output: {e}"))),
        // The reader ends once the killed child's pipe closes.
        Err(_) => Err(Drain::TimedOut),
    }
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implausible_names_are_refused() {
        for name in [
            "", "-s", "--help", "a b", "a\tb", "a\nb", "a:b", "a\0b", "1000", "+1000", "a,b",
        ] {
            assert!(plausible_name(name).is_err(), "{name:?}");
        }
        for name in [
            "alice",
            "+",
            "svc-mm_bot",
            "alice@corp.example",
            "CORP\\alice",
            "host$",
        ] {
            assert_eq!(plausible_name(name), Ok(()), "{name:?}");
        }
    }

    #[test]
    fn getent_itself_refuses_unsafe_keys() {
        // A program that would succeed if it ran: the refusal comes first.
        let getent = Getent::with_program("/bin/true".into(), Duration::from_secs(1));
        for key in ["-s", "a b", "a:b"] {
            assert!(matches!(
                getent.getent(Database::Passwd, &["root", key]),
                Err(NssError::UnsafeKey { .. })
            ));
        }
    }

    #[test]
    fn missing_program_says_what_to_install() {
        let getent = Getent::with_program("/nonexistent/getent".into(), Duration::from_secs(1));
        let err = getent.getent(Database::Group, &["x"]).unwrap_err();
        assert!(err.to_string().contains("install it"), "{err}");
    }

    /// Writes an executable script (see `run` for running it).
    fn script(dir: &std::path::Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// Runs `getent`, again while another test's fork still holds the script open for
    /// writing (ETXTBSY, "Text file busy").
    fn run(getent: &Getent, db: Database, keys: &[&str]) -> Result<String, NssError> {
        for _ in 0..50 {
            match getent.getent(db, keys) {
                Err(NssError::NoGetent { reason, .. }) if reason.contains("busy") => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                other => return other,
            }
        }
        panic!("the test script stayed busy")
    }

    #[test]
    fn arguments_stdin_and_exit_codes() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let fake = script(
            dir.path(),
            "getent",
            &format!(
                "printf '%s|' \"$@\" > {log}; readlink /proc/$$/fd/0 >> {log}\n\
                 echo 'alice:x:1000:1000::/home/alice:/bin/sh'; exit 2",
                log = log.display()
            ),
        );
        let getent = Getent::with_program(fake, Duration::from_secs(5));
        let out = run(&getent, Database::Passwd, &["alice", "nobody-here"]).unwrap();
        assert_eq!(out, "alice:x:1000:1000::/home/alice:/bin/sh\n");
        let seen = std::fs::read_to_string(&log).unwrap();
        assert_eq!(seen, "passwd|--|alice|nobody-here|/dev/null\n");

        let failing = script(dir.path(), "failing", "exit 1");
        let getent = Getent::with_program(failing, Duration::from_secs(5));
        let err = run(&getent, Database::Group, &["traders"]).unwrap_err();
        assert!(matches!(err, NssError::Failed { .. }), "{err}");
        assert!(err.to_string().contains("getent group traders"), "{err}");
    }

    #[test]
    fn a_hanging_backend_is_killed_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let hang = script(
            dir.path(),
            "hang",
            &format!("echo $$ > {}; exec sleep 60", pid_file.display()),
        );
        let getent = Getent::with_program(hang, Duration::from_millis(300));
        let started = Instant::now();
        let err = run(&getent, Database::Passwd, &["alice"]).unwrap_err();
        let took = started.elapsed();
        assert!(matches!(err, NssError::Timeout { .. }), "{err}");
        assert!(took < Duration::from_secs(3), "took {took:?}");
        assert!(err.to_string().contains("getent passwd alice"), "{err}");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim()));
        assert!(status.is_err(), "the child still exists: {status:?}");
    }
}
