//! Process hardening for the commands that hold secrets in memory: `run` (PINs, access and
//! refresh tokens, and with SoftHSM the key's library and its decrypted key), `check`
//! (a PIN, a minted token) and `key` (a PIN, an imported private key).
//!
//! [`keep_memory_private`] marks the process not dumpable (`prctl(PR_SET_DUMPABLE, 0)`):
//! the kernel writes no core dump of it (when `fs.suid_dumpable` is 0, the default), and no
//! other process of the same user may attach to it with `ptrace` or read its
//! `/proc/PID/mem`, `environ` (where a PIN from `pin = { env = … }` lives) or `maps`; only
//! root (`CAP_SYS_PTRACE`) still can. The attribute holds for the whole process, every
//! thread; an `exec` resets it (the agent only runs `getent`, which holds no secret).
//!
//! The client commands (`token`, `sign`, …) are left dumpable on purpose: the agent reads
//! each client's `/proc/PID/exe` for the audit log, and the kernel refuses that for a
//! process that is not dumpable.
//!
//! It also sets the core file size limit to 0, soft and hard (`prlimit64`, which the unit's
//! system-call filter allows), for hosts that set `fs.suid_dumpable=2` and so dump even
//! processes that are not dumpable, readable by root. The units set `LimitCORE=0` as well.

use std::fmt;

/// The process could not be marked not dumpable, or its core limit not lowered.
#[derive(Debug)]
pub struct HardeningError {
    call: &'static str,
    error: std::io::Error,
}

impl fmt::Display for HardeningError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot keep this process's memory private ({}: {}): other processes of this user \
             may read it, or a crash may write a core dump holding secrets; check that no \
             seccomp filter refuses the call",
            self.call, self.error
        )
    }
}

impl std::error::Error for HardeningError {}

/// Closes this process's memory to core dumps and to other processes of its user (see the
/// module documentation). Idempotent; safe to call from any thread.
pub fn keep_memory_private() -> Result<(), HardeningError> {
    use rustix::process::{set_dumpable_behavior, setrlimit, DumpableBehavior, Resource, Rlimit};
    let failed = |call| {
        move |e: rustix::io::Errno| HardeningError {
            call,
            error: std::io::Error::from(e),
        }
    };
    set_dumpable_behavior(DumpableBehavior::NotDumpable)
        .map_err(failed("prctl PR_SET_DUMPABLE"))?;
    let none = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    setrlimit(Resource::Core, none).map_err(failed("setrlimit RLIMIT_CORE"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_says_what_is_exposed_and_what_to_check() {
        let err = HardeningError {
            call: "prctl PR_SET_DUMPABLE",
            error: std::io::Error::from_raw_os_error(1),
        };
        let text = err.to_string();
        assert!(text.contains("PR_SET_DUMPABLE"), "{text}");
        assert!(text.contains("core dump"), "{text}");
        assert!(text.contains("seccomp"), "{text}");
    }
}
