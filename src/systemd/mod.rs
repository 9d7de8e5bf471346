//! systemd integration.
//!
//! Owns (so far) socket activation: taking over the listening socket that systemd passes
//! as fd 3 with `LISTEN_FDS`/`LISTEN_PID` (see sd_listen_fds(3)). The environment check
//! ([`activation_fds`]) is a pure function so that it can be tested without systemd; the fd
//! itself is wrapped by the `listenfd` crate, which checks that it is a listening Unix
//! stream socket and keeps the one `unsafe` conversion out of this crate
//! (`#![forbid(unsafe_code)]`).
//!
//! Call [`take_activated_listener`] once, early in `main`, before any other thread reads or
//! writes the environment: it removes `LISTEN_FDS`/`LISTEN_PID` so that child processes do
//! not inherit them.
//!
//! The sd_notify sender (READY/STATUS/RELOADING/STOPPING/WATCHDOG) is in [`notify`].

pub mod notify;

use std::os::unix::net::UnixListener;

/// Why the socket handed over by systemd cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a number")]
    BadCount(String),
    #[error("LISTEN_PID={0:?} is not a number")]
    BadPid(String),
    #[error(
        "systemd passed {0} sockets; tm-agent takes exactly one (check ListenStream= in \
         tm-agent.socket)"
    )]
    WrongCount(usize),
    #[error("the socket passed by systemd is unusable: {0} (tm-agent.socket must use ListenStream=/path)")]
    NotAUnixListener(#[source] std::io::Error),
}

/// How many fds were passed to *this* process, from the values of `LISTEN_PID` and
/// `LISTEN_FDS` and our pid. `Ok(0)`: not socket-activated (variables absent, or meant for
/// another process, e.g. inherited from a parent).
pub fn activation_fds(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    own_pid: u32,
) -> Result<usize, ActivationError> {
    let (Some(pid), Some(fds)) = (listen_pid, listen_fds) else {
        return Ok(0);
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadPid(pid.to_owned()))?;
    if pid != own_pid {
        return Ok(0);
    }
    fds.trim()
        .parse()
        .map_err(|_| ActivationError::BadCount(fds.to_owned()))
}

/// The listener passed by systemd socket activation, if this process was started that
/// way; `Ok(None)` otherwise. Expects exactly one fd (fd 3). Removes the variables.
pub fn take_activated_listener() -> Result<Option<UnixListener>, ActivationError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let count = activation_fds(pid.as_deref(), fds.as_deref(), std::process::id())?;
    if count == 0 {
        return Ok(None);
    }
    if count != 1 {
        return Err(ActivationError::WrongCount(count));
    }
    // listenfd re-reads the same variables, accepts them (the pid matched above), and
    // removes them from the environment.
    let mut fds = listenfd::ListenFd::from_env();
    fds.take_unix_listener(0)
        .map_err(ActivationError::NotAUnixListener)?
        .map(Some)
        .ok_or_else(|| {
            ActivationError::NotAUnixListener(std::io::Error::other("fd 3 was already taken"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_env_is_checked() {
        assert_eq!(activation_fds(None, None, 42).unwrap(), 0);
        assert_eq!(activation_fds(Some("42"), None, 42).unwrap(), 0);
        assert_eq!(activation_fds(Some("42"), Some("1"), 42).unwrap(), 1);
        assert_eq!(
            activation_fds(Some("41"), Some("1"), 42).unwrap(),
            0,
            "another pid's"
        );
        assert!(matches!(
            activation_fds(Some("x"), Some("1"), 42),
            Err(ActivationError::BadPid(_))
        ));
        assert!(matches!(
            activation_fds(Some("42"), Some("one"), 42),
            Err(ActivationError::BadCount(_))
        ));
    }
}
