//! SoftHSM token fixture: a private SoftHSM configuration and token directory per test, with
//! a token created in it by label with `softhsm2-util`.
//!
//! Why it looks like this. SoftHSM reads `SOFTHSM2_CONF` once, at `C_Initialize`; a process
//! can initialize a module only once (`CKR_CRYPTOKI_ALREADY_INITIALIZED`), and the recovery
//! tests finalize and re-initialize the module, which would pull the rug from under any
//! other test sharing the process. Tests of one binary share a process and its environment.
//! So:
//! - tokens are always created by a separate `softhsm2-util` process with the test's
//!   `SOFTHSM2_CONF` in its environment: the test process never initializes SoftHSM for that;
//! - a test that loads the module in-process runs its body through [`isolated`], which
//!   re-runs the current test binary as a child (`<name> --exact --test-threads=1`) with
//!   `SOFTHSM2_CONF` pointing at this test's configuration. The child recognises itself from
//!   the environment, rebuilds the fixture and runs the body; the parent keeps the temporary
//!   directory alive, shows the child's output and fails unless exactly one test ran and passed;
//! - a test that only runs other programs (the CLI, `pkcs11-tool`) gives them the
//!   configuration through [`SoftHsm::command`].
//!
//! Tokens are found by label, never by slot: SoftHSM moves a token to a new slot id on
//! initialization.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tm_agent::signer::pin::PinSource;
use tm_agent::signer::pkcs11::Pkcs11Settings;

/// SoftHSM's PKCS#11 module.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The security officer PIN of every fixture token.
pub const SO_PIN: &str = "so-pin-5678";
/// The user PIN of every fixture token (also in [`SoftHsm::pin_file`]).
pub const USER_PIN: &str = "user-pin-1234";

const ENV_ROOT: &str = "TM_AGENT_TEST_SOFTHSM_ROOT";
const ENV_LABEL: &str = "TM_AGENT_TEST_SOFTHSM_LABEL";
const ENV_NAME: &str = "TM_AGENT_TEST_ISOLATED";

/// A SoftHSM configuration with its own token directory and one token in it.
pub struct SoftHsm {
    /// Owned by the process that created the fixture (the parent, for [`isolated`]).
    _dir: Option<tempfile::TempDir>,
    /// The fixture's directory: `softhsm2.conf`, `tokens/`, `pin`, `wrong-pin`.
    pub root: PathBuf,
    /// The `SOFTHSM2_CONF` file.
    pub conf: PathBuf,
    /// SoftHSM's `directories.tokendir`.
    pub tokendir: PathBuf,
    /// The token's label.
    pub label: String,
    /// A 0600 file holding [`USER_PIN`].
    pub pin_file: PathBuf,
    /// A 0600 file holding a wrong PIN.
    pub wrong_pin_file: PathBuf,
}

impl SoftHsm {
    /// A fresh configuration and token directory in a temporary directory, and a token
    /// labelled `label` (at most 32 bytes) with [`SO_PIN`] and [`USER_PIN`].
    pub fn new(label: &str) -> SoftHsm {
        assert!(
            Path::new(MODULE).exists(),
            "{MODULE} is missing: install softhsm2"
        );
        let dir = tempfile::Builder::new()
            .prefix("tm-agent-softhsm-")
            .tempdir()
            .expect("temp dir");
        let root = dir.path().to_path_buf();
        let tokendir = root.join("tokens");
        std::fs::create_dir(&tokendir).expect("token dir");
        let conf = root.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokendir.display()
            ),
        )
        .expect("softhsm2.conf");
        write_private(&root.join("pin"), &format!("{USER_PIN}\n"));
        write_private(&root.join("wrong-pin"), "not-the-pin\n");
        let hsm = SoftHsm::at(root, label.to_string(), Some(dir));
        hsm.add_token(label);
        hsm
    }

    fn at(root: PathBuf, label: String, dir: Option<tempfile::TempDir>) -> SoftHsm {
        SoftHsm {
            _dir: dir,
            conf: root.join("softhsm2.conf"),
            tokendir: root.join("tokens"),
            pin_file: root.join("pin"),
            wrong_pin_file: root.join("wrong-pin"),
            label,
            root,
        }
    }

    /// Creates another token in this configuration.
    pub fn add_token(&self, label: &str) {
        assert!(label.len() <= 32, "token labels are at most 32 bytes");
        let out = self
            .command("softhsm2-util")
            .args(["--init-token", "--free", "--label", label])
            .args(["--so-pin", SO_PIN, "--pin", USER_PIN])
            .output()
            .expect("run softhsm2-util (install softhsm2)");
        assert!(
            out.status.success(),
            "softhsm2-util --init-token failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The module path.
    pub fn module(&self) -> PathBuf {
        PathBuf::from(MODULE)
    }

    /// Backend settings for this token (by label), the key labelled `key_label` (if any),
    /// the PIN from [`Self::pin_file`], one session.
    pub fn settings(&self, key_label: Option<&str>) -> Pkcs11Settings {
        let mut s = Pkcs11Settings::new(MODULE, PinSource::File(self.pin_file.clone()));
        s.token_label = Some(self.label.clone());
        s.key_label = key_label.map(str::to_string);
        s
    }

    /// A command for `program` with this fixture's `SOFTHSM2_CONF`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("SOFTHSM2_CONF", &self.conf);
        cmd
    }

    /// Runs OpenSC's `pkcs11-tool` on this token, logged in as the user, with `args`.
    pub fn pkcs11_tool(&self, args: &[&str]) -> Output {
        self.command("pkcs11-tool")
            .args(["--module", MODULE, "--token-label", &self.label])
            .args(["--login", "--pin", USER_PIN])
            .args(args)
            .output()
            .expect("run pkcs11-tool (install opensc)")
    }

    /// The directory SoftHSM keeps this token in (one subdirectory of the token dir per
    /// token; the fixture token is the only one unless [`Self::add_token`] was used).
    pub fn token_dir(&self) -> PathBuf {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&self.tokendir)
            .expect("read token dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        assert_eq!(dirs.len(), 1, "expected exactly one token directory");
        dirs.remove(0)
    }
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// Runs `body` with a fresh SoftHSM token in a child process of this test binary, whose
/// `SOFTHSM2_CONF` points at the token's configuration (see the module docs). `name` must be
/// the exact name of the calling test function (a top-level `#[test]` in the test file).
pub fn isolated(name: &str, body: impl FnOnce(&SoftHsm)) {
    if std::env::var(ENV_NAME).as_deref() == Ok(name) {
        let root = PathBuf::from(std::env::var_os(ENV_ROOT).expect("fixture root in env"));
        let label = std::env::var(ENV_LABEL).expect("fixture label in env");
        let hsm = SoftHsm::at(root, label, None);
        assert_eq!(
            std::env::var_os("SOFTHSM2_CONF").as_deref(),
            Some(hsm.conf.as_os_str()),
            "the child must see its own SOFTHSM2_CONF"
        );
        // The backend's logs (recovery steps) end up in the child's output, shown on failure.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_ansi(false)
            .with_env_filter("tm_agent=debug")
            .try_init();
        body(&hsm);
        return;
    }
    if let Some(thread) = std::thread::current().name() {
        // libtest names each test's thread after the test: catch a copy-pasted name.
        if thread != "main" {
            assert_eq!(thread, name, "isolated() must be given the test's own name");
        }
    }
    let label: String = format!("t-{name}").chars().take(32).collect();
    let hsm = SoftHsm::new(&label);
    let exe = std::env::current_exe().expect("current test binary");
    let out = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &hsm.conf)
        .env(ENV_ROOT, &hsm.root)
        .env(ENV_LABEL, &hsm.label)
        .env(ENV_NAME, name)
        .output()
        .expect("re-run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Shown by libtest when the test fails (and with --nocapture).
    println!("--- child stdout ---\n{stdout}\n--- child stderr ---\n{stderr}");
    assert!(
        out.status.success(),
        "isolated test {name} failed in its child process ({})",
        out.status
    );
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "the child process did not run exactly one test: is {name:?} the test's exact name?"
    );
}
