//! The configuration file: the serde model of `/etc/tm-agent/config.toml` and `validate()`,
//! which reports every problem at once.
//!
//! Owns the TOML shape documented in `systemd/config.example.toml`. Each table maps onto the
//! settings type of the module that uses it (`[socket]` → `server::listener::SocketSettings`,
//! `[server]` → `server::ServerSettings`, `[keys.NAME]` → the backend's settings,
//! `[[access]]` → `authz::AccessRule`); a profile's optional tuning fields fall back to
//! `auth_api::ApiSettings::default()` and `token::TokenSettings::default()`, so every default
//! lives in exactly one place: the module that owns the setting.
//!
//! Parsing and validation are pure apart from reading the file and resolving user and group
//! names (`/etc/passwd`, `/etc/group`, then NSS through getent, which may ask a directory
//! service: bounded, see `authz`). No hardware, no network of our own. Loaded at start and
//! again on SIGHUP.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::auth_api::{ApiSettings, Environment};
use crate::authz::{AccessRule, Rules, Selector};
use crate::server::listener::SocketSettings;
use crate::server::ServerSettings;
use crate::signer::pin::PinSource;
use crate::signer::piv::PivSettings;
use crate::signer::pkcs11::Pkcs11Settings;
use crate::signer::ActorOptions;
use crate::token::TokenSettings;

/// Where `tm-agent run` and `tm-agent check` look without `--config`.
pub const DEFAULT_CONFIG: &str = "/etc/tm-agent/config.toml";

/// Runtime threads unless `agent.worker_threads` says otherwise. Not one per CPU (tokio's
/// default): the runtime's work per request is a few microseconds, and on a 64-core
/// trading server 64 workers would mostly wake each other. Two keep one thread answering
/// while the other is busy (a TLS handshake of a token renewal, a burst of `status`).
pub const DEFAULT_WORKER_THREADS: usize = 2;

/// The most runtime threads `agent.worker_threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 64;

/// The most signature requests a key may hold waiting (`agent.sign_queue_depth`).
pub const MAX_SIGN_QUEUE_DEPTH: usize = 65_536;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default)]
    pub socket: SocketSettings,
    #[serde(default)]
    pub server: ServerSettings,
    #[serde(default)]
    pub keys: BTreeMap<String, KeyConfig>,
    #[serde(default)]
    pub profiles: BTreeMap<String, ProfileConfig>,
    #[serde(default)]
    pub access: Vec<AccessRule>,
}

/// `[agent]`: logging, signer queues, shutdown.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// A level (`info`) or a tracing filter (`info,audit=info`). Reloaded on SIGHUP.
    pub log_level: String,
    /// `text` (for a terminal or journald) or `json` (for log shippers).
    pub log_format: LogFormat,
    /// Signing requests that may wait per key before callers get `busy`.
    pub sign_queue_depth: usize,
    /// Milliseconds a caller waits for a signature before `timeout`.
    pub sign_timeout_ms: u64,
    /// Seconds that shutdown waits for in-flight requests before giving up on them.
    pub shutdown_grace_secs: u64,
    /// Threads of the async runtime (sockets, tokens, the Auth API). Signers have their
    /// own threads, one per session, besides these.
    pub worker_threads: usize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            log_level: "info".into(),
            log_format: LogFormat::Text,
            sign_queue_depth: ActorOptions::default().queue_depth,
            sign_timeout_ms: ActorOptions::default().timeout.as_millis() as u64,
            shutdown_grace_secs: 10,
            worker_threads: DEFAULT_WORKER_THREADS,
        }
    }
}

impl AgentConfig {
    /// The actor options of the key called `name`.
    pub fn actor_options(&self, name: &str) -> ActorOptions {
        ActorOptions {
            queue_depth: self.sign_queue_depth,
            timeout: Duration::from_millis(self.sign_timeout_ms),
            name: format!("signer-{name}"),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `[keys.NAME]`: where a private key lives, by `backend`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "backend", rename_all = "snake_case")]
pub enum KeyConfig {
    /// A PKCS#11 HSM (or SoftHSM).
    Pkcs11(Pkcs11Settings),
    /// A YubiKey PIV slot (through pcscd).
    Piv(PivSettings),
    /// A software key file: development and migration only.
    Soft(SoftKeyConfig),
}

/// `backend = "soft"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoftKeyConfig {
    /// The website's key bundle JSON, or a PEM private key.
    pub key_file: PathBuf,
}

impl KeyConfig {
    /// `pkcs11`, `piv`, `soft`.
    pub fn backend(&self) -> &'static str {
        match self {
            KeyConfig::Pkcs11(_) => "pkcs11",
            KeyConfig::Piv(_) => "piv",
            KeyConfig::Soft(_) => "soft",
        }
    }
}

/// When a profile counts as ready (systemd's `READY=1` waits for every profile).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadyWhen {
    /// Once a verified access token is held (the default).
    #[default]
    Token,
    /// Once the key answers (the signer's self-test passed).
    Signer,
}

/// `[profiles.NAME]`: a key + its API key_id + an environment, with its own access token.
/// Unset tuning fields take the defaults of `ApiSettings` and `TokenSettings`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// Name of a `[keys.NAME]` table.
    pub key: String,
    /// The API key's id (UUID), issued when the public key was registered.
    pub key_id: String,
    /// `production` or `uat`; leave out and set `base_url` for anything else.
    #[serde(default)]
    pub environment: Option<Environment>,
    /// A custom Auth API base URL, e.g. the simulator's `https://127.0.0.1:8443/v1/auth`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// JWKS URL; default: the base URL's host + `/.well-known/jwks.json`.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Extra CA certificates (PEM) to trust, e.g. a TLS-inspecting proxy's or the simulator's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Seconds to connect (TCP + TLS).
    #[serde(default)]
    pub connect_timeout_secs: Option<f64>,
    /// Seconds for a whole request.
    #[serde(default)]
    pub request_timeout_secs: Option<f64>,
    /// Required `iss` of access tokens; unchecked when absent.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Refresh at this fraction of a token's lifetime.
    #[serde(default)]
    pub refresh_at_fraction: Option<f64>,
    /// ± relative jitter of the refresh point.
    #[serde(default)]
    pub refresh_jitter: Option<f64>,
    /// Refresh no later than this many seconds before expiry.
    #[serde(default)]
    pub refresh_before_expiry_secs: Option<f64>,
    /// First and largest retry delay after failures, seconds.
    #[serde(default)]
    pub backoff_min_secs: Option<f64>,
    #[serde(default)]
    pub backoff_max_secs: Option<f64>,
    /// Seconds a `token` request with `min_ttl` may wait for a renewal.
    #[serde(default)]
    pub renew_timeout_secs: Option<f64>,
    /// When this profile counts as ready for systemd.
    #[serde(default)]
    pub ready_when: ReadyWhen,
}

impl ProfileConfig {
    /// The Auth API client settings.
    pub fn api_settings(&self) -> ApiSettings {
        let defaults = ApiSettings::default();
        ApiSettings {
            environment: self.environment,
            base_url: self.base_url.clone(),
            jwks_url: self.jwks_url.clone(),
            ca_file: self.ca_file.clone(),
            connect_timeout: secs_or(self.connect_timeout_secs, defaults.connect_timeout),
            timeout: secs_or(self.request_timeout_secs, defaults.timeout),
        }
    }

    /// The token manager settings.
    pub fn token_settings(&self) -> TokenSettings {
        let d = TokenSettings::new(self.key_id.clone());
        TokenSettings {
            refresh_at_fraction: self.refresh_at_fraction.unwrap_or(d.refresh_at_fraction),
            jitter: self.refresh_jitter.unwrap_or(d.jitter),
            refresh_before_expiry: secs_or(
                self.refresh_before_expiry_secs,
                d.refresh_before_expiry,
            ),
            backoff_min: secs_or(self.backoff_min_secs, d.backoff_min),
            backoff_max: secs_or(self.backoff_max_secs, d.backoff_max),
            renew_timeout: secs_or(self.renew_timeout_secs, d.renew_timeout),
            issuer: self.issuer.clone(),
            ..d
        }
    }
}

/// Seconds from the file, or the default. Bad values (negative, NaN) are reported by
/// `validate`; here they fall back to the default so that nothing panics.
fn secs_or(value: Option<f64>, default: Duration) -> Duration {
    value
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .unwrap_or(default)
}

/// Why a config file cannot be used. `Invalid` lists every problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML for tm-agent: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path} has {} problem(s):\n  - {}", .problems.len(), .problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
        /// NSS failed or was too slow while names were resolved: the same file may load
        /// once it answers (see [`ConfigError::may_pass_on_retry`]).
        nss_unavailable: bool,
    },
}

impl ConfigError {
    /// True when the file may load unchanged a little later: an `[[access]]` name or
    /// `socket.group` could not be resolved because NSS (sssd, LDAP) failed or did not answer
    /// in time. `run` exits
    /// with a restartable status then, not 78, which systemd does not restart.
    pub fn may_pass_on_retry(&self) -> bool {
        matches!(
            self,
            ConfigError::Invalid {
                nss_unavailable: true,
                ..
            }
        )
    }
}

/// A validated config and its compiled access rules.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub rules: Rules,
}

impl Config {
    /// Reads, parses and validates `path`, and compiles the access rules.
    pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        let mut problems = config.validate();
        let mut nss_unavailable = false;
        if let Some(group) = &config.socket.group {
            use crate::server::listener::{resolve_group, ListenerError};
            match resolve_group(group) {
                Ok(_) => {}
                Err(e @ ListenerError::GroupLookup { .. }) => {
                    nss_unavailable = true;
                    problems.push(e.to_string());
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        let rules = match Rules::compile(&config.access) {
            Ok(rules) => Some(rules),
            Err(e) => {
                nss_unavailable = e.nss_unavailable;
                problems.extend(e.problems.into_iter().map(|p| format!("[[access]] {p}")));
                None
            }
        };
        match rules {
            Some(rules) if problems.is_empty() => Ok(Loaded { config, rules }),
            _ => Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
                nss_unavailable,
            }),
        }
    }

    /// Parses TOML text (types only; see [`Config::validate`]). The error names the line
    /// and column but never quotes the file: a PIN pasted into it must not reach a log.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| {
            let inside_key =
                toml_error_position(text, &e).and_then(|(line, _)| reread_key_table(text, line));
            match inside_key {
                Some((doc, e)) => describe_toml_error(&doc, &e),
                None => describe_toml_error(text, &e),
            }
        })
    }

    /// Every problem apart from user and group names, one sentence each saying what to
    /// change. Empty when valid.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let a = &self.agent;
        if tracing_subscriber::EnvFilter::try_new(&a.log_level).is_err() {
            problems.push(format!(
                "agent.log_level {:?} is neither a level (info, debug, …) nor a tracing filter",
                a.log_level
            ));
        }
        if !(1..=MAX_SIGN_QUEUE_DEPTH).contains(&a.sign_queue_depth) {
            problems.push(format!(
                "agent.sign_queue_depth must be between 1 and {MAX_SIGN_QUEUE_DEPTH} (its slots \
                 are allocated at start)"
            ));
        }
        if self.server.max_connections == 0 {
            problems.push("server.max_connections must be at least 1".into());
        }
        if self.server.max_in_flight == 0 {
            problems.push("server.max_in_flight must be at least 1".into());
        }
        if let Some(n) = self.server.max_connections_per_uid {
            if n == 0 || n > self.server.max_connections {
                problems.push(format!(
                    "server.max_connections_per_uid {n} must be between 1 and \
                     server.max_connections ({})",
                    self.server.max_connections
                ));
            }
        }
        if !(1..=600_000).contains(&a.sign_timeout_ms) {
            problems.push("agent.sign_timeout_ms must be between 1 and 600000 (10 min)".into());
        }
        if a.shutdown_grace_secs > 3600 {
            problems.push("agent.shutdown_grace_secs must be at most 3600".into());
        }
        if !(1..=MAX_WORKER_THREADS).contains(&a.worker_threads) {
            problems.push(format!(
                "agent.worker_threads must be between 1 and {MAX_WORKER_THREADS} (2 suits most \
                 machines; signers have their own threads)"
            ));
        }
        if self.socket.mode & 0o007 != 0 || self.socket.mode > 0o777 {
            problems.push(format!(
                "socket.mode {:o} must be a mode without access for others, like 0o660",
                self.socket.mode
            ));
        }
        for (field, value) in [
            ("idle_timeout_secs", self.server.idle_timeout),
            ("line_timeout_secs", self.server.line_timeout),
            ("write_timeout_secs", self.server.write_timeout),
        ] {
            if value > Duration::from_secs(86_400) {
                problems.push(format!("server.{field} must be at most 86400 (a day)"));
            }
        }
        for (name, key) in &self.keys {
            match key {
                KeyConfig::Pkcs11(settings) => {
                    if let Err(e) = settings.validate() {
                        problems.push(format!("keys.{name}: {e}"));
                    }
                    if settings.pin == PinSource::Prompt {
                        problems.push(format!(
                            "keys.{name}.pin: the daemon cannot prompt; use {{ credential = \"pin\" }}, \
                             {{ file = \"/etc/tm-agent/pin\" }} or {{ env = \"NAME\" }}"
                        ));
                    }
                }
                KeyConfig::Piv(settings) => {
                    if let Err(e) = settings.validate() {
                        problems.push(format!("keys.{name}: {e}"));
                    }
                    if settings.pin == PinSource::Prompt {
                        problems.push(format!(
                            "keys.{name}.pin: the daemon cannot prompt; use {{ credential = \"piv-pin\" }}, \
                             {{ file = \"/etc/tm-agent/piv-pin\" }} or {{ env = \"NAME\" }}"
                        ));
                    }
                }
                KeyConfig::Soft(soft) => {
                    if !soft.key_file.is_file() {
                        problems.push(format!(
                            "keys.{name}.key_file {} does not exist",
                            soft.key_file.display()
                        ));
                    }
                }
            }
            if !self.profiles.values().any(|p| &p.key == name) {
                problems.push(format!("keys.{name} is used by no profile"));
            }
        }
        if self.profiles.is_empty() {
            problems.push("no [profiles.NAME] table: define at least one profile".into());
        }
        for (name, p) in &self.profiles {
            if !self.keys.contains_key(&p.key) {
                problems.push(format!(
                    "profiles.{name}.key = {:?} names no [keys.{}] table",
                    p.key, p.key
                ));
            }
            if !crate::jose::is_uuid(&p.key_id) {
                problems.push(format!(
                    "profiles.{name}.key_id {:?} is not a UUID (copy it from the API Keys page)",
                    p.key_id
                ));
            }
            for (field, value) in [
                ("connect_timeout_secs", p.connect_timeout_secs),
                ("request_timeout_secs", p.request_timeout_secs),
                ("refresh_before_expiry_secs", p.refresh_before_expiry_secs),
                ("backoff_min_secs", p.backoff_min_secs),
                ("backoff_max_secs", p.backoff_max_secs),
                ("renew_timeout_secs", p.renew_timeout_secs),
            ] {
                if let Some(v) = value {
                    if !(v.is_finite() && v > 0.0) {
                        problems.push(format!("profiles.{name}.{field} must be a positive number"));
                    }
                }
            }
            if let Err(e) = p.api_settings().endpoints() {
                problems.push(format!("profiles.{name}: {e}"));
            }
            if let Some(ca) = &p.ca_file {
                if !ca.is_file() {
                    problems.push(format!(
                        "profiles.{name}.ca_file {} does not exist",
                        ca.display()
                    ));
                }
            }
            if let Err(list) = p.token_settings().validate() {
                problems.extend(list.into_iter().map(|e| format!("profiles.{name}: {e}")));
            }
        }
        for (i, rule) in self.access.iter().enumerate() {
            if let Selector::List(names) = &rule.profiles {
                // "*" inside a list means every profile, as a bare "*" does (see `authz`).
                let unknown = names
                    .iter()
                    .filter(|n| n.as_str() != "*" && !self.profiles.contains_key(*n));
                for unknown in unknown {
                    problems.push(format!(
                        "[[access]] rule {}: profile {unknown:?} is not defined",
                        i + 1
                    ));
                }
            }
        }
        problems
    }
}

/// `line L, column C: message`, from a TOML error, without the source snippet that its
/// `Display` would print.
pub fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    match toml_error_position(text, err) {
        Some((line, column)) => format!("line {line}, column {column}: {}", err.message()),
        None => err.message().to_string(),
    }
}

/// serde reads `[keys.NAME]` through its `backend` tag, which loses the positions inside
/// the table: its errors point at the table's header, and a value of the wrong type does
/// not even name its field. For a table whose header is on line `header` (1-based) of
/// `text`, this reads the table's body again, straight into its backend's settings, and
/// returns that error with the text it was read from: the file with everything but the
/// body's lines blanked (the `backend` line too), so that its positions are the file's.
///
/// None, so that the header's position stands, unless the file is valid TOML (a syntax
/// error has its own position), the header is a `[keys.NAME]` with no sub-tables after it,
/// its `backend` is known, and the re-read fails at a place inside the body (a missing field
/// has no place of its own: the header is where to add it). The text is wiped after use.
pub fn reread_key_table(
    text: &str,
    header: usize,
) -> Option<(zeroize::Zeroizing<String>, toml::de::Error)> {
    let lines: Vec<&str> = text.split('\n').collect();
    let name = key_table_name(lines.get(header.checked_sub(1)?)?)?;
    let sub_table = format!("[keys.{name}.");
    if lines.iter().any(|l| l.trim_start().starts_with(&sub_table)) {
        return None;
    }
    if text.parse::<toml::Table>().is_err() {
        return None;
    }
    let end = lines[header..]
        .iter()
        .position(|l| l.trim_start().starts_with('['))
        .map_or(lines.len(), |i| header + i);
    let mut backend = None;
    let mut doc = zeroize::Zeroizing::new(String::with_capacity(text.len()));
    let mut body_start = None;
    for (i, line) in lines.iter().enumerate() {
        if (header..end).contains(&i) {
            body_start.get_or_insert(doc.len());
            let line = line.trim_end_matches('\r');
            // Only the `backend` line is parsed on its own (a PIN pasted into another line
            // is not copied into a table that is never wiped).
            let tag = line
                .trim_start()
                .starts_with("backend")
                .then(|| toml::from_str::<toml::Table>(line).ok())
                .flatten()
                .and_then(|t| t.get("backend").and_then(|v| v.as_str()).map(str::to_owned));
            match tag {
                Some(tag) => backend = Some(tag),
                None => doc.push_str(line),
            }
        }
        doc.push('\n');
    }
    let err = match backend?.as_str() {
        "pkcs11" => toml::from_str::<Pkcs11Settings>(&doc).err(),
        "piv" => toml::from_str::<PivSettings>(&doc).err(),
        "soft" => toml::from_str::<SoftKeyConfig>(&doc).err(),
        _ => None,
    }?;
    let body_start = body_start?;
    let inside = err.span().is_some_and(|span| span.start >= body_start);
    inside.then_some((doc, err))
}

/// The `NAME` of a `[keys.NAME]` header line (a comment after it allowed), else None.
pub fn key_table_name(line: &str) -> Option<&str> {
    let head = line.split_once('#').map_or(line, |(h, _)| h).trim();
    let name = head.strip_prefix("[keys.")?.strip_suffix(']')?;
    (!name.is_empty()).then_some(name)
}

/// The 1-based line and column where a TOML error starts in `text`, when toml knows it.
pub fn toml_error_position(text: &str, err: &toml::de::Error) -> Option<(usize, usize)> {
    let before = err.span().and_then(|span| text.get(..span.start))?;
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    Some((line, column))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[keys.prod]
backend = "pkcs11"
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "t"
key_label = "k"
pin = { file = "/etc/tm-agent/pin" }

[profiles.prod]
key = "prod"
key_id = "0b9b3f3e-8d4c-4c1e-9f1a-2b3c4d5e6f70"
"#;

    #[test]
    fn a_star_in_a_profile_list_is_every_profile_not_an_unknown_one() {
        let text = format!(
            "{MINIMAL}\n[[access]]\nuid = 0\nops = [\"token\"]\nprofiles = [\"*\"]\n\
             [[access]]\nuid = 1\nops = [\"token\"]\nprofiles = [\"nope\"]\n"
        );
        let problems = Config::parse(&text).unwrap().validate();
        assert_eq!(
            problems,
            ["[[access]] rule 2: profile \"nope\" is not defined"],
            "{problems:#?}"
        );
    }

    /// What `check` and `run` load: the socket's group and the server's limits are checked
    /// with everything else, so a config that cannot serve fails as a config (78).
    #[test]
    fn load_reports_a_missing_socket_group_and_zero_limits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let text = format!(
            "[socket]\ngroup = \"tm-no-such-group-xyz\"\n[server]\nmax_connections = 0\n\
             max_in_flight = 0\n{MINIMAL}"
        );
        std::fs::write(&path, text).unwrap();
        let err = Config::load(&path).unwrap_err();
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("{err}");
        };
        assert!(!err.may_pass_on_retry(), "{err}");
        for expected in [
            "group `tm-no-such-group-xyz` does not exist",
            "server.max_connections must be at least 1",
            "server.max_in_flight must be at least 1",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(expected)),
                "{problems:#?}"
            );
        }
        // A group that exists, and a bare gid, load (MINIMAL's key file need not exist).
        for group in ["root", "4242"] {
            let text = format!("[socket]\ngroup = \"{group}\"\n{MINIMAL}");
            std::fs::write(&path, text).unwrap();
            Config::load(&path).unwrap();
        }
    }

    #[test]
    fn the_shipped_example_parses_and_validates() {
        let text = include_str!("../systemd/config.example.toml");
        let config = Config::parse(text).expect("example parses");
        let problems = config.validate();
        assert!(problems.is_empty(), "{problems:#?}");
        assert!(matches!(config.keys["prod"], KeyConfig::Pkcs11(_)));
        assert_eq!(
            config.socket.path,
            PathBuf::from("/run/tm-agent/agent.sock")
        );
    }

    #[test]
    fn defaults_come_from_the_owning_modules() {
        let config = Config::parse(MINIMAL).unwrap();
        assert!(config.validate().is_empty(), "{:?}", config.validate());
        let p = &config.profiles["prod"];
        let t = p.token_settings();
        let d = TokenSettings::default();
        assert_eq!(t.refresh_at_fraction, d.refresh_at_fraction);
        assert_eq!(t.backoff_max, d.backoff_max);
        assert_eq!(t.key_id, p.key_id);
        assert_eq!(p.api_settings().timeout, ApiSettings::default().timeout);
        assert_eq!(config.server, ServerSettings::default());
    }

    #[test]
    fn worker_threads_defaults_to_two_and_is_bounded() {
        let config = Config::parse(MINIMAL).unwrap();
        assert_eq!(config.agent.worker_threads, 2);
        for (threads, ok) in [(0, false), (1, true), (64, true), (65, false)] {
            let text = format!("[agent]\nworker_threads = {threads}\n{MINIMAL}");
            let problems = Config::parse(&text).unwrap().validate();
            assert_eq!(problems.is_empty(), ok, "{threads}: {problems:?}");
            if !ok {
                assert!(problems[0].contains("agent.worker_threads"), "{problems:?}");
            }
        }
    }

    #[test]
    fn unknown_fields_are_rejected_everywhere() {
        for (table, extra) in [
            ("[agent]", "colour = 1"),
            ("[profiles.prod]", "refresh_at = 0.5"),
            ("[keys.prod]", "pin_code = \"1234\""),
            ("[socket]", "owner = \"x\""),
        ] {
            let text = MINIMAL.replace(table, &format!("{table}\n{extra}"));
            let text = if text == MINIMAL {
                format!("{MINIMAL}\n{table}\n{extra}\n")
            } else {
                text
            };
            assert!(Config::parse(&text).is_err(), "{table} {extra} accepted");
        }
    }

    #[test]
    fn validate_reports_every_problem_at_once() {
        let text = r#"
[agent]
log_level = "loud=="
[keys.a]
backend = "pkcs11"
module = "/m.so"
pin = "prompt"
[profiles.p]
key = "missing"
key_id = "not-a-uuid"
base_url = "ftp://x"
refresh_at_fraction = 1.5
backoff_min_secs = -1
[server]
idle_timeout_secs = 99999999999
[[access]]
uid = 1000
ops = ["token"]
profiles = ["nope"]
"#;
        let problems = Config::parse(text).unwrap().validate();
        let all = problems.join("\n");
        for needle in [
            "agent.log_level",
            "keys.a",
            "cannot prompt",
            "names no [keys.missing]",
            "not a UUID",
            "base_url",
            "backoff_min_secs",
            "profile \"nope\"",
            "used by no profile",
            "server.idle_timeout_secs",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert!(problems.len() >= 10, "{problems:#?}");
    }

    #[test]
    fn parse_errors_never_quote_the_file() {
        for (line, pasted) in [
            ("pin = \"987654\"", "987654"),
            ("pin = 987654", "987654"),
            ("pin = { file = \"/p\" } 987654", "987654"),
        ] {
            let text = MINIMAL.replace("pin = { file = \"/etc/tm-agent/pin\" }", line);
            let err = Config::parse(&text).unwrap_err();
            assert!(!err.contains(pasted), "{line}: {err}");
            assert!(err.starts_with("line "), "{line}: {err}");
            assert!(
                err.contains("never the PIN itself") || err.contains("column"),
                "{err}"
            );
        }
    }

    #[test]
    fn errors_inside_a_key_table_point_at_the_field_not_the_header() {
        // MINIMAL: [keys.prod] on line 2, key_label on line 6, pin on line 7.
        for (from, to, line, says) in [
            (
                "key_label = \"k\"",
                "key_lable = \"k\"",
                6,
                "unknown field `key_lable`",
            ),
            ("key_label = \"k\"", "sessions = \"x\"", 6, "expected usize"),
            (
                "pin = { file = \"/etc/tm-agent/pin\" }",
                "pin = \"123456\"",
                7,
                "never the PIN itself",
            ),
            ("key_label = \"k\"", "key_id = \"zz\"", 6, "is not hex"),
        ] {
            let err = Config::parse(&MINIMAL.replace(from, to)).unwrap_err();
            assert!(err.starts_with(&format!("line {line}, ")), "{to}: {err}");
            assert!(err.contains(says), "{to}: {err}");
            assert!(!err.contains("123456"), "{err}");
        }
        // `backend` after the field, and a comment on the header.
        let text = "[keys.y] # the card\nserial = \"x\"\nbackend = \"piv\"\n";
        let err = Config::parse(text).unwrap_err();
        assert!(err.starts_with("line 2, "), "{err}");
        // CRLF line ends.
        let text = MINIMAL
            .replace("key_label = \"k\"", "sessions = \"x\"")
            .replace('\n', "\r\n");
        let err = Config::parse(&text).unwrap_err();
        assert!(err.starts_with("line 6, "), "{err}");
        // A missing field has no line of its own: the header is where to add it.
        let text = MINIMAL.replace("pin = { file = \"/etc/tm-agent/pin\" }", "");
        let err = Config::parse(&text).unwrap_err();
        assert!(err.starts_with("line 2, ") && err.contains("pin"), "{err}");
        // A sub-table keeps serde's own answer (its `pin` is there, not missing).
        let text = MINIMAL.replace(
            "pin = { file = \"/etc/tm-agent/pin\" }",
            "[keys.prod.pin]\nfiel = \"/p\"",
        );
        let err = Config::parse(&text).unwrap_err();
        assert!(!err.contains("missing field"), "{err}");
        // A syntax error keeps its own message: a second [keys.prod].
        let text = format!("{MINIMAL}\n[keys.prod]\nbackend = \"soft\"\n");
        let err = Config::parse(&text).unwrap_err();
        assert!(!err.contains("key_file"), "{err}");
        // Without a backend the header is the place to look; an unknown one is pointed at.
        let err = Config::parse("[keys.y]\nslot = \"9a\"\n").unwrap_err();
        assert!(
            err.starts_with("line 1, ") && err.contains("backend"),
            "{err}"
        );
        let err = Config::parse("[keys.y]\nbackend = \"tpm\"\n").unwrap_err();
        assert!(err.starts_with("line 2, ") && err.contains("tpm"), "{err}");
    }

    #[test]
    fn a_yubikey_key_parses_and_validates() {
        let text = MINIMAL.replace(
            "backend = \"pkcs11\"\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"t\"\nkey_label = \"k\"",
            "backend = \"piv\"\nserial = 12345678\nslot = \"9a\"",
        );
        let config = Config::parse(&text).expect("piv key parses");
        assert!(config.validate().is_empty(), "{:?}", config.validate());
        let KeyConfig::Piv(piv) = &config.keys["prod"] else {
            panic!("piv expected")
        };
        assert_eq!(piv.serial, Some(12345678));
        assert_eq!(piv.slot, "9a");
        assert_eq!(config.keys["prod"].backend(), "piv");
        let bad = text.replace("slot = \"9a\"", "slot = \"9b\"\ntouch = 1");
        assert!(Config::parse(&bad).is_err(), "unknown field accepted");
        let bad = text.replace("slot = \"9a\"", "slot = \"f9\"");
        let problems = Config::parse(&bad).unwrap().validate().join("\n");
        assert!(problems.contains("keys.prod"), "{problems}");
    }
}
