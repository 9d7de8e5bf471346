//! The static systemd integration: unit files, sysusers.d and tmpfiles.d entries, and the
//! Debian package layout, checked with systemd's own tools.
//!
//! Runs offline, without systemd as PID 1 (CI runs in a container): `systemd-analyze verify`
//! on copies of the units whose `ExecStart=` points at the freshly built `tm-agent`,
//! `systemd-analyze security --offline=yes` for the exposure score, and `systemd-sysusers` /
//! `systemd-tmpfiles --root=<temp dir>` to apply the entries to a scratch root. Needs the
//! Debian package `systemd` (252 or later), and root for the tmpfiles ownership checks; a
//! missing tool fails the test with the package to install, it never skips.
//!
//! The `[package.metadata.deb]` assets are checked against the files and the documented
//! destinations, and the .deb is built with cargo-deb from the debug binary of the test run
//! (`scripts/deb.sh` builds the release one) and listed with dpkg.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_tm-agent");
const EXEC_START: &str = "/usr/bin/tm-agent run --config /etc/tm-agent/config.toml";
const MAX_EXPOSURE: f64 = 2.0;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Fails (never skips) when a tool is missing, naming the Debian package to install.
fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain(["/usr/bin".into(), "/usr/sbin".into()]) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{name}` not found: install the Debian package `{package}` (apt-get install -y {package})"
    );
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| panic!("{shown}: {e}"));
    eprintln!("$ {shown}\n  exit: {}", out.status);
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn is_root() -> bool {
    // /proc/self belongs to the effective uid of the reader.
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// `(section, key, value)` of every assignment in a unit file.
fn unit_entries(unit: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some((k, v)) = line.split_once('=') {
            out.push((section.clone(), k.trim().to_owned(), v.trim().to_owned()));
        } else {
            panic!("not an assignment: {line:?}");
        }
    }
    out
}

fn values(unit: &str, section: &str, key: &str) -> Vec<String> {
    unit_entries(unit)
        .into_iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v)
        .collect()
}

fn value(unit: &str, section: &str, key: &str) -> String {
    let v = values(unit, section, key);
    assert_eq!(
        v.len(),
        1,
        "[{section}] {key}= should appear once, found {v:?}"
    );
    v.into_iter().next().unwrap_or_default()
}

/// Copies the units named into a fresh temp dir, with ExecStart= pointing at the test build
/// (`systemd-analyze verify` insists that the binary exists and is executable).
fn staged(units: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (src, name) in units {
        let body = read(src);
        let body = body.replace("ExecStart=/usr/bin/tm-agent ", &format!("ExecStart={BIN} "));
        fs::write(dir.path().join(name), body).unwrap();
    }
    dir
}

fn system_units() -> tempfile::TempDir {
    staged(&[
        ("systemd/tm-agent.service", "tm-agent.service"),
        ("systemd/tm-agent.socket", "tm-agent.socket"),
    ])
}

fn user_units() -> tempfile::TempDir {
    staged(&[
        ("systemd/user/tm-agent.service", "tm-agent.service"),
        ("systemd/user/tm-agent.socket", "tm-agent.socket"),
    ])
}

/// `systemd-analyze verify` only warns about unknown keys and bad values, with exit
/// status 0: any output at all counts as a failure.
fn assert_verifies(dir: &Path, user: bool) {
    let analyze = tool("systemd-analyze", "systemd");
    let mut cmd = Command::new(analyze);
    cmd.current_dir(dir).args([
        "verify",
        "--man=no",
        "--generators=no",
        "--recursive-errors=no",
    ]);
    if user {
        // A user manager needs $XDG_RUNTIME_DIR (0700) even offline.
        let runtime = dir.join("xdg-runtime");
        fs::create_dir(&runtime).unwrap();
        fs::set_permissions(&runtime, fs::Permissions::from_mode(0o700)).unwrap();
        cmd.arg("--user")
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("HOME", dir);
    }
    cmd.args(["./tm-agent.socket", "./tm-agent.service"]);
    let out = run(&mut cmd);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success() && stdout.trim().is_empty() && stderr.trim().is_empty(),
        "systemd-analyze verify complained:\n{stdout}{stderr}"
    );
}

#[test]
fn system_units_verify() {
    let dir = system_units();
    assert_verifies(dir.path(), false);
}

#[test]
fn user_units_verify() {
    let dir = user_units();
    assert_verifies(dir.path(), true);
}

/// The exposure score from `systemd-analyze security`'s last line,
/// `→ Overall exposure level for tm-agent.service: 1.2 OK 🙂`.
fn exposure(dir: &Path, user: bool) -> (f64, String) {
    let mut cmd = Command::new(tool("systemd-analyze", "systemd"));
    cmd.current_dir(dir)
        .args(["security", "--offline=yes", "--no-pager"]);
    if user {
        let runtime = dir.join("xdg-runtime-security");
        fs::create_dir(&runtime).unwrap();
        fs::set_permissions(&runtime, fs::Permissions::from_mode(0o700)).unwrap();
        cmd.arg("--user").env("XDG_RUNTIME_DIR", &runtime);
    }
    cmd.arg("./tm-agent.service");
    let out = run(&mut cmd);
    let report = text(&out.stdout);
    assert!(
        out.status.success(),
        "systemd-analyze security failed (needs systemd >= 250 for --offline):\n{report}{}",
        text(&out.stderr)
    );
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure line in:\n{report}"));
    let score = line
        .rsplit_once(": ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    (score, report)
}

#[test]
fn service_exposure_is_at_most_two() {
    let dir = system_units();
    let (score, report) = exposure(dir.path(), false);
    let open: Vec<&str> = report.lines().filter(|l| l.starts_with('✗')).collect();
    eprintln!(
        "tm-agent.service exposure: {score} (limit {MAX_EXPOSURE}); not applied:\n{}",
        open.join("\n")
    );
    assert!(
        score <= MAX_EXPOSURE,
        "exposure {score} > {MAX_EXPOSURE}:\n{report}"
    );
}

#[test]
fn user_service_exposure_is_reported() {
    // User managers cannot apply mount-namespace sandboxing everywhere (see the unit's
    // comments), so the score is only shown, not bounded.
    let dir = user_units();
    let (score, _) = exposure(dir.path(), true);
    eprintln!("user tm-agent.service exposure: {score} (informational)");
    assert!(score > 0.0 && score <= 10.0);
}

#[test]
fn service_contract() {
    let unit = read("systemd/tm-agent.service");
    assert_eq!(value(&unit, "Service", "ExecStart"), EXEC_START);
    for (key, want) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("WatchdogSec", "30s"),
        ("User", "tm-agent"),
        ("Group", "tm-agent"),
        ("RuntimeDirectory", "tm-agent"),
        // The socket lives in the runtime directory: it must survive a stop.
        ("RuntimeDirectoryPreserve", "yes"),
        ("ConfigurationDirectory", "tm-agent"),
        ("StateDirectory", "tm-agent"),
        ("LoadCredential", "pin:/etc/tm-agent/pin"),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "77 78"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("DevicePolicy", "closed"),
        ("ProtectProc", "invisible"),
        ("ProcSubset", "pid"),
        // Peer credentials of clients must stay real uids/gids.
        ("PrivateUsers", "no"),
        ("CapabilityBoundingSet", ""),
        ("UMask", "0077"),
        // A core dump would hold the PIN and the tokens.
        ("LimitCORE", "0"),
        ("SystemCallArchitectures", "native"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
    ] {
        assert_eq!(value(&unit, "Service", key), want, "[Service] {key}=");
    }
    assert_eq!(
        values(&unit, "Service", "SystemCallFilter"),
        ["@system-service", "~@privileged @resources"]
    );
    assert!(values(&unit, "Unit", "Requires").contains(&"tm-agent.socket".to_owned()));
    assert!(value(&unit, "Unit", "StartLimitBurst")
        .parse::<u32>()
        .is_ok());
    assert!(!value(&unit, "Unit", "StartLimitIntervalSec").is_empty());
    assert!(unit.contains("# LoadCredentialEncrypted=pin:"));
    assert!(unit.contains("#   IPAddressDeny=any"));
    // The user unit runs the same daemon against the per-user config.
    let user = read("systemd/user/tm-agent.service");
    assert_eq!(
        value(&user, "Service", "ExecStart"),
        "/usr/bin/tm-agent run --config %E/tm-agent/config.toml"
    );
    assert_eq!(value(&user, "Service", "Type"), "notify");
    assert_eq!(value(&user, "Service", "LimitCORE"), "0");
}

/// The socket unit, the example config and the service agree on paths, modes and names.
#[test]
fn socket_matches_the_example_config() {
    let socket = read("systemd/tm-agent.socket");
    let service = read("systemd/tm-agent.service");
    let config: toml::Value = toml::from_str(&read("systemd/config.example.toml")).unwrap();
    let sock = &config["socket"];
    assert_eq!(
        value(&socket, "Socket", "ListenStream"),
        sock["path"].as_str().unwrap()
    );
    assert_eq!(
        value(&socket, "Socket", "SocketGroup"),
        sock["group"].as_str().unwrap()
    );
    assert_eq!(
        u32::from_str_radix(&value(&socket, "Socket", "SocketMode"), 8).unwrap(),
        sock["mode"].as_integer().unwrap() as u32
    );
    assert_eq!(value(&socket, "Socket", "SocketUser"), "tm-agent");
    assert_eq!(value(&socket, "Socket", "RemoveOnStop"), "yes");
    assert_eq!(value(&socket, "Install", "WantedBy"), "sockets.target");
    // The socket sits in the service's RuntimeDirectory.
    let listen = value(&socket, "Socket", "ListenStream");
    let runtime = value(&service, "Service", "RuntimeDirectory");
    assert_eq!(
        Path::new(&listen).parent(),
        Some(Path::new("/run").join(runtime).as_path())
    );
    // Every pin_credential of the example config is loaded by the unit.
    let creds: Vec<String> = values(&service, "Service", "LoadCredential");
    for key in config["keys"].as_table().unwrap().values() {
        if let Some(name) = key.get("pin_credential").and_then(|v| v.as_str()) {
            assert!(
                creds.iter().any(|c| c.starts_with(&format!("{name}:"))),
                "pin_credential {name:?} has no LoadCredential={name}:… in the unit"
            );
        }
    }
    let user_socket = read("systemd/user/tm-agent.socket");
    assert_eq!(
        value(&user_socket, "Socket", "ListenStream"),
        "%t/tm-agent/agent.sock"
    );
    assert_eq!(value(&user_socket, "Socket", "SocketMode"), "0600");
}

/// A scratch root with users from sysusers.d applied.
fn sysusers_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    fs::create_dir(root.path().join("etc")).unwrap();
    let sysusers = tool("systemd-sysusers", "systemd");
    let out = run(Command::new(sysusers)
        .arg(format!("--root={}", root.path().display()))
        .arg(repo().join("systemd/tm-agent.sysusers")));
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "systemd-sysusers failed:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    root
}

/// name -> fields of a passwd(5)/group(5) file.
fn db(path: &Path) -> BTreeMap<String, Vec<String>> {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| {
            let f: Vec<String> = l.split(':').map(str::to_owned).collect();
            (f[0].clone(), f)
        })
        .collect()
}

#[test]
fn sysusers_creates_the_users_and_groups() {
    let root = sysusers_root();
    let passwd = db(&root.path().join("etc/passwd"));
    let group = db(&root.path().join("etc/group"));
    let user = passwd.get("tm-agent").expect("user tm-agent");
    let uid: u32 = user[2].parse().unwrap();
    assert!(uid > 0 && uid < 1000, "a system uid, got {uid}");
    assert_eq!(user[3], group["tm-agent"][2], "primary group tm-agent");
    assert_eq!(user[5], "/var/lib/tm-agent");
    assert_eq!(user[6], "/usr/sbin/nologin");
    let clients = group
        .get("tm-agent-clients")
        .expect("group tm-agent-clients");
    assert!(clients[2].parse::<u32>().unwrap() < 1000);
    assert_eq!(clients[3], "", "nobody is a client by default");
}

#[test]
fn tmpfiles_creates_the_directories() {
    assert!(
        is_root(),
        "this test checks owners set by systemd-tmpfiles: run it as root (CI does)"
    );
    let root = sysusers_root();
    let r = root.path();
    // As dpkg leaves it before postinst runs: /etc/tm-agent 0755, config.toml 0640 root:root.
    fs::create_dir(r.join("etc/tm-agent")).unwrap();
    fs::set_permissions(r.join("etc/tm-agent"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(r.join("etc/tm-agent/config.toml"), "").unwrap();
    fs::set_permissions(
        r.join("etc/tm-agent/config.toml"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let tmpfiles = tool("systemd-tmpfiles", "systemd");
    let out = run(Command::new(tmpfiles)
        .arg("--create")
        .arg(format!("--root={}", r.display()))
        .arg(repo().join("systemd/tm-agent.tmpfiles")));
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-tmpfiles failed:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let passwd = db(&r.join("etc/passwd"));
    let group = db(&r.join("etc/group"));
    let uid: u32 = passwd["tm-agent"][2].parse().unwrap();
    let gid: u32 = group["tm-agent"][2].parse().unwrap();
    for (path, mode, owner, grp) in [
        ("etc/tm-agent", 0o750, 0, gid),
        ("etc/tm-agent/config.toml", 0o640, 0, gid),
        ("var/lib/tm-agent", 0o700, uid, gid),
        ("run/tm-agent", 0o755, uid, gid),
    ] {
        let m = fs::metadata(r.join(path)).unwrap();
        assert_eq!(
            m.mode() & 0o7777,
            mode,
            "/{path} mode {:o}",
            m.mode() & 0o7777
        );
        assert_eq!((m.uid(), m.gid()), (owner, grp), "/{path} owner");
    }
    // The unit's directory modes agree with tmpfiles.d, so neither rewrites the other.
    let unit = read("systemd/tm-agent.service");
    assert_eq!(
        value(&unit, "Service", "ConfigurationDirectoryMode"),
        "0750"
    );
    assert_eq!(value(&unit, "Service", "StateDirectoryMode"), "0700");
    assert_eq!(value(&unit, "Service", "RuntimeDirectoryMode"), "0755");
}

/// Where each shipped file lands (docs/systemd.md lists the same paths).
const DEB_LAYOUT: &[(&str, &str, &str)] = &[
    ("target/release/tm-agent", "usr/bin/tm-agent", "755"),
    (
        "systemd/tm-agent.service",
        "lib/systemd/system/tm-agent.service",
        "644",
    ),
    (
        "systemd/tm-agent.socket",
        "lib/systemd/system/tm-agent.socket",
        "644",
    ),
    (
        "systemd/user/tm-agent.service",
        "usr/lib/systemd/user/tm-agent.service",
        "644",
    ),
    (
        "systemd/user/tm-agent.socket",
        "usr/lib/systemd/user/tm-agent.socket",
        "644",
    ),
    (
        "systemd/tm-agent.sysusers",
        "usr/lib/sysusers.d/tm-agent.conf",
        "644",
    ),
    (
        "systemd/tm-agent.tmpfiles",
        "usr/lib/tmpfiles.d/tm-agent.conf",
        "644",
    ),
    (
        "systemd/config.example.toml",
        "etc/tm-agent/config.toml",
        "640",
    ),
    (
        "systemd/config.example.toml",
        "usr/share/doc/tm-agent/config.example.toml",
        "644",
    ),
    (
        "docs/systemd.md",
        "usr/share/doc/tm-agent/systemd.md",
        "644",
    ),
    (
        "docs/yubikey.md",
        "usr/share/doc/tm-agent/yubikey.md",
        "644",
    ),
    ("README.md", "usr/share/doc/tm-agent/README.md", "644"),
];

fn deb_metadata() -> toml::Value {
    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    manifest["package"]["metadata"]["deb"].clone()
}

#[test]
fn deb_assets_exist_and_land_where_documented() {
    let deb = deb_metadata();
    let mut got = Vec::new();
    for asset in deb["assets"].as_array().expect("assets") {
        let a: Vec<&str> = asset
            .as_array()
            .expect("[source, dest, mode]")
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let [src, dest, mode] = a[..] else {
            panic!("asset {a:?} is not [source, dest, mode]")
        };
        // cargo-deb: a destination ending in '/' is a directory, the file keeps its name.
        let dest = match dest.strip_suffix('/') {
            Some(dir) => format!(
                "{dir}/{}",
                Path::new(src).file_name().unwrap().to_str().unwrap()
            ),
            None => dest.to_owned(),
        };
        if let Some(bin) = src.strip_prefix("target/release/") {
            let manifest = read("Cargo.toml");
            assert!(
                manifest.contains(&format!("name = \"{bin}\"")),
                "{src} is not a binary of this package"
            );
        } else {
            assert!(repo().join(src).is_file(), "asset source {src} is missing");
        }
        got.push((src.to_owned(), dest, mode.to_owned()));
    }
    let want: Vec<(String, String, String)> = DEB_LAYOUT
        .iter()
        .map(|(s, d, m)| (s.to_string(), d.to_string(), m.to_string()))
        .collect();
    assert_eq!(got, want);
    assert!(
        !got.iter().any(|(s, _, _)| s.contains("tm-auth-sim")),
        "the simulator is a test tool, not shipped"
    );
    // The docs name every installed path.
    let docs = read("docs/systemd.md");
    for (_, dest, _) in &got {
        assert!(
            docs.contains(&format!("/{dest}")),
            "docs/systemd.md does not mention /{dest}"
        );
    }
    // The binary path is the one the units start.
    assert!(EXEC_START.starts_with("/usr/bin/tm-agent "));
    let conf: Vec<&str> = deb["conf-files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(conf, ["/etc/tm-agent/config.toml"]);
    assert!(deb["depends"].as_str().unwrap().contains("systemd"));
}

/// `rwxr-xr-x` for `755`.
fn mode_string(octal: &str) -> String {
    let bits = u32::from_str_radix(octal, 8).unwrap();
    (0..9)
        .map(|i| {
            let on = bits & (0o400 >> i) != 0;
            match (on, i % 3) {
                (false, _) => '-',
                (true, 0) => 'r',
                (true, 1) => 'w',
                (true, _) => 'x',
            }
        })
        .collect()
}

/// Builds the real .deb with cargo-deb (from the debug binary this test run built: a release
/// build would take minutes), then checks `dpkg-deb -c` and the control fields.
#[test]
fn the_deb_builds_and_dpkg_lists_the_documented_layout() {
    let have = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        have,
        "cargo-deb is missing: scripts/test.sh installs it (cargo install cargo-deb --locked)"
    );
    let out_dir = tempfile::tempdir().unwrap();
    // The binary cargo-deb packs is the one Cargo built for these tests.
    let bin = Path::new(env!("CARGO_BIN_EXE_tm-agent"));
    assert!(bin.ends_with("debug/tm-agent"), "{}", bin.display());
    let built = Command::new("cargo")
        .current_dir(repo())
        .args([
            "deb",
            "--no-build",
            "--profile",
            "dev",
            "--no-strip",
            "--fast",
            "-o",
        ])
        .arg(out_dir.path())
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "cargo deb failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let deb = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb was written");
    let listing = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .unwrap();
    assert!(listing.status.success());
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    eprintln!("dpkg-deb -c {}:\n{listing}", deb.display());
    let files: Vec<(String, String)> = listing
        .lines()
        .filter(|l| l.starts_with('-'))
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let path = cols.last().unwrap().trim_start_matches("./").to_string();
            (path, cols[0][1..].to_string())
        })
        .collect();
    let mut want: Vec<(String, String)> = DEB_LAYOUT
        .iter()
        .map(|(_, dest, mode)| (dest.to_string(), mode_string(mode)))
        .collect();
    want.push((
        "usr/share/doc/tm-agent/copyright".into(),
        mode_string("644"),
    ));
    let mut got = files.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want, "the .deb holds exactly the documented files");
    let control = Command::new("dpkg-deb")
        .arg("-f")
        .arg(&deb)
        .output()
        .unwrap();
    let control = String::from_utf8_lossy(&control.stdout).into_owned();
    assert!(control.contains("Package: tm-agent"), "{control}");
    assert!(
        control.contains("systemd"),
        "Depends names systemd: {control}"
    );
    let conffiles = Command::new("dpkg-deb")
        .arg("--ctrl-tarfile")
        .arg(&deb)
        .output()
        .unwrap();
    let ctrl = String::from_utf8_lossy(&conffiles.stdout);
    for script in ["postinst", "prerm", "postrm", "conffiles"] {
        assert!(ctrl.contains(script), "control archive lacks {script}");
    }
}

#[test]
fn deb_maintainer_scripts_are_sound() {
    let deb = deb_metadata();
    let dir = repo().join(deb["maintainer-scripts"].as_str().unwrap());
    for (name, must) in [
        (
            "postinst",
            &[
                "systemd-sysusers /usr/lib/sysusers.d/tm-agent.conf",
                "systemd-tmpfiles --create /usr/lib/tmpfiles.d/tm-agent.conf",
                "systemctl daemon-reload",
            ][..],
        ),
        (
            "prerm",
            &["systemctl stop tm-agent.service tm-agent.socket"][..],
        ),
        (
            "postrm",
            &["systemctl daemon-reload", "rm -rf /var/lib/tm-agent"][..],
        ),
    ] {
        let path = dir.join(name);
        let body = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o111, 0o111, "{name} must be executable");
        assert!(body.starts_with("#!/bin/sh\n"), "{name}: #!/bin/sh");
        assert!(body.contains("\nset -e\n"), "{name}: set -e");
        for m in must {
            assert!(body.contains(m), "{name} lacks `{m}`");
        }
        // Nothing is enabled or started by the package itself (the postinst only tells
        // the admin how to).
        for line in body.lines().map(str::trim_start) {
            for verb in [
                "systemctl enable",
                "systemctl start",
                "deb-systemd-invoke start",
            ] {
                assert!(!line.starts_with(verb), "{name} runs `{line}`");
            }
        }
        let out = run(Command::new(tool("sh", "dash")).arg("-n").arg(&path));
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
    }
    // sysusers runs before tmpfiles (tmpfiles names the users).
    let postinst = fs::read_to_string(dir.join("postinst")).unwrap();
    let (su, tf) = (
        postinst.find("systemd-sysusers").unwrap(),
        postinst.find("systemd-tmpfiles").unwrap(),
    );
    assert!(su < tf);
}
