//! The configuration file: serde model, every default in one place, and `validate()` that
//! reports every problem at once.
//!
//! Owns the TOML shape documented in `systemd/config.example.toml`. Parsing and validation
//! are pure (no hardware, no network); the `check` command and `run` turn a validated
//! [`Config`] into signers, token managers and the server. Loaded once at start and again on
//! SIGHUP (only `[[access]]` and the log level are applied on reload).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::signer::pin::PinSource;

/// Default socket path (the systemd unit's `RuntimeDirectory=tm-agent`).
pub const DEFAULT_SOCKET: &str = "/run/tm-agent/agent.sock";

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default)]
    pub keys: BTreeMap<String, KeyConfig>,
    #[serde(default)]
    pub profiles: BTreeMap<String, ProfileConfig>,
    #[serde(default)]
    pub access: Vec<crate::authz::AccessRule>,
}

/// `[agent]`: the socket, limits and logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Where to listen (ignored under systemd socket activation).
    pub socket: PathBuf,
    /// Socket file mode, octal as a string (`"0660"`).
    pub socket_mode: String,
    /// Group that owns the socket (clients join it). None: the agent's primary group.
    pub socket_group: Option<String>,
    /// Concurrent connections at most.
    pub max_connections: usize,
    /// Seconds a connection may sit idle between requests.
    pub idle_timeout_secs: u64,
    /// Seconds a client has to finish a line it has started.
    pub line_timeout_secs: u64,
    /// `error`, `warn`, `info`, `debug` or `trace` (or a tracing filter directive).
    pub log_level: String,
    /// `text` or `json`.
    pub log_format: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_mode: "0660".into(),
            socket_group: None,
            max_connections: 4096,
            idle_timeout_secs: 3600,
            line_timeout_secs: 10,
            log_level: "info".into(),
            log_format: "text".into(),
        }
    }
}

impl AgentConfig {
    /// The socket mode as a number (validated by [`Config::validate`]).
    pub fn socket_mode_bits(&self) -> Option<u32> {
        u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8).ok()
    }
}

/// `[keys.NAME]`: where a private key lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "backend", rename_all = "snake_case", deny_unknown_fields)]
pub enum KeyConfig {
    /// A PKCS#11 HSM (or SoftHSM).
    Pkcs11 {
        /// Path of the PKCS#11 module (`.so`).
        module: PathBuf,
        #[serde(default)]
        token_label: Option<String>,
        #[serde(default)]
        token_serial: Option<String>,
        #[serde(default)]
        key_label: Option<String>,
        /// CKA_ID as hex.
        #[serde(default)]
        key_id: Option<String>,
        #[serde(flatten)]
        pin: PinConfig,
        /// Worker threads, each with its own session.
        #[serde(default = "default_sessions")]
        sessions: usize,
        #[serde(flatten)]
        actor: ActorConfig,
    },
    /// A software key file (development and migration only).
    Soft {
        key_file: PathBuf,
        #[serde(flatten)]
        actor: ActorConfig,
    },
}

fn default_sessions() -> usize {
    1
}

/// Where the PIN comes from: exactly one of the three (never the PIN itself).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PinConfig {
    /// A file readable by its owner only (mode 0600 or stricter).
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// A systemd credential name (`LoadCredential=pin:/etc/tm-agent/pin` → `"pin"`).
    #[serde(default)]
    pub pin_credential: Option<String>,
    /// An environment variable, named explicitly.
    #[serde(default)]
    pub pin_env: Option<String>,
}

impl PinConfig {
    /// The one configured source, or None when none is set. Several set is a validation error.
    pub fn source(&self) -> Option<PinSource> {
        if let Some(p) = &self.pin_file {
            return Some(PinSource::File(p.clone()));
        }
        if let Some(c) = &self.pin_credential {
            return Some(PinSource::Credential(c.clone()));
        }
        self.pin_env.clone().map(PinSource::Env)
    }

    fn count(&self) -> usize {
        [
            self.pin_file.is_some(),
            self.pin_credential.is_some(),
            self.pin_env.is_some(),
        ]
        .iter()
        .filter(|set| **set)
        .count()
    }
}

/// Signer actor tuning, shared by every backend.
#[derive(Debug, Clone, Deserialize)]
pub struct ActorConfig {
    /// Requests that may wait for the signer before callers get `busy`.
    #[serde(default = "default_queue_depth")]
    pub queue_depth: usize,
    /// Milliseconds a caller waits for a signature.
    #[serde(default = "default_sign_timeout_ms")]
    pub sign_timeout_ms: u64,
}

impl Default for ActorConfig {
    fn default() -> Self {
        ActorConfig {
            queue_depth: default_queue_depth(),
            sign_timeout_ms: default_sign_timeout_ms(),
        }
    }
}

fn default_queue_depth() -> usize {
    256
}
fn default_sign_timeout_ms() -> u64 {
    5000
}

impl ActorConfig {
    pub fn options(&self, name: &str) -> crate::signer::ActorOptions {
        crate::signer::ActorOptions {
            queue_depth: self.queue_depth,
            timeout: Duration::from_millis(self.sign_timeout_ms),
            name: format!("signer-{name}"),
        }
    }
}

/// `[profiles.NAME]`: a key + key_id + environment, with its own access token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// Name of a `[keys.NAME]` table.
    pub key: String,
    /// The API key's id (UUID) issued when the public key was registered.
    pub key_id: String,
    /// `production`, `uat` or `custom` (then `base_url` is required).
    #[serde(default = "default_environment")]
    pub environment: String,
    /// Auth API base URL, e.g. `https://127.0.0.1:8443/v1/auth` (custom only).
    #[serde(default)]
    pub base_url: Option<String>,
    /// JWKS URL; default: the base URL's host + `/.well-known/jwks.json`.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Extra CA certificate (PEM) to trust, e.g. the simulator's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Expected `iss` of access tokens; unchecked when absent.
    #[serde(default)]
    pub issuer: Option<String>,
    /// HTTP timeouts.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Refresh at this fraction of the token's lifetime (0 < f < 1).
    #[serde(default = "default_refresh_at")]
    pub refresh_at: f64,
    /// ± jitter around the refresh point, as a fraction of the lifetime.
    #[serde(default = "default_refresh_jitter")]
    pub refresh_jitter: f64,
    /// Never refresh later than this many seconds before expiry.
    #[serde(default = "default_refresh_before_expiry_secs")]
    pub refresh_before_expiry_secs: u64,
    /// `token` (default): READY once a token is held; `signer`: once the key answers.
    #[serde(default = "default_ready_when")]
    pub ready_when: String,
}

fn default_environment() -> String {
    "production".into()
}
fn default_connect_timeout_ms() -> u64 {
    3000
}
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_refresh_at() -> f64 {
    2.0 / 3.0
}
fn default_refresh_jitter() -> f64 {
    0.1
}
fn default_refresh_before_expiry_secs() -> u64 {
    120
}
fn default_ready_when() -> String {
    "token".into()
}

/// Every problem found in a config file, one per line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path} has {} problem(s):\n  - {}", .problems.len(), .problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    /// Parses TOML text (no validation beyond the types).
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Every problem, each a sentence saying what to change. Empty when valid.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let a = &self.agent;
        match a.socket_mode_bits() {
            Some(bits) if bits & 0o007 != 0 => problems.push(format!(
                "agent.socket_mode {} gives access to every user: use 0660 and a group",
                a.socket_mode
            )),
            Some(bits) if bits > 0o777 => problems.push(format!(
                "agent.socket_mode {} is not a permission mode",
                a.socket_mode
            )),
            Some(_) => {}
            None => problems.push(format!(
                "agent.socket_mode {:?} is not an octal mode like \"0660\"",
                a.socket_mode
            )),
        }
        if a.max_connections == 0 {
            problems.push("agent.max_connections must be at least 1".into());
        }
        if a.line_timeout_secs == 0 || a.idle_timeout_secs == 0 {
            problems.push("agent.line_timeout_secs and agent.idle_timeout_secs must be > 0".into());
        }
        if !matches!(a.log_format.as_str(), "text" | "json") {
            problems.push(format!(
                "agent.log_format {:?}: use \"text\" or \"json\"",
                a.log_format
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&a.log_level).is_err() {
            problems.push(format!(
                "agent.log_level {:?} is not a log level or filter",
                a.log_level
            ));
        }
        if self.profiles.is_empty() {
            problems.push("no [profiles.NAME] table: define at least one profile".into());
        }
        for (name, key) in &self.keys {
            match key {
                KeyConfig::Pkcs11 {
                    token_label,
                    token_serial,
                    key_label,
                    key_id,
                    pin,
                    sessions,
                    actor,
                    ..
                } => {
                    if token_label.is_none() && token_serial.is_none() {
                        problems.push(format!(
                            "keys.{name}: set token_label (or token_serial) to choose the token"
                        ));
                    }
                    if key_label.is_none() && key_id.is_none() {
                        problems.push(format!(
                            "keys.{name}: set key_label and/or key_id to choose the key"
                        ));
                    }
                    if let Some(id) = key_id {
                        if hex::decode(id).is_err() {
                            problems.push(format!("keys.{name}.key_id must be hex (CKA_ID)"));
                        }
                    }
                    match pin.count() {
                        0 => problems.push(format!(
                            "keys.{name}: set one of pin_file, pin_credential or pin_env \
                             (the PIN never goes in this file)"
                        )),
                        1 => {}
                        _ => problems.push(format!(
                            "keys.{name}: set only one of pin_file, pin_credential, pin_env"
                        )),
                    }
                    if *sessions == 0 || *sessions > 64 {
                        problems.push(format!("keys.{name}.sessions must be 1..=64"));
                    }
                    check_actor(name, actor, &mut problems);
                }
                KeyConfig::Soft { actor, .. } => check_actor(name, actor, &mut problems),
            }
        }
        for (name, p) in &self.profiles {
            if !self.keys.contains_key(&p.key) {
                problems.push(format!(
                    "profiles.{name}.key = {:?} names no [keys.{}] table",
                    p.key, p.key
                ));
            }
            if !is_uuid(&p.key_id) {
                problems.push(format!(
                    "profiles.{name}.key_id {:?} is not a UUID (copy it from the API Keys page)",
                    p.key_id
                ));
            }
            match p.environment.as_str() {
                "production" | "uat" => {
                    if p.base_url.is_some() {
                        problems.push(format!(
                            "profiles.{name}: base_url is only for environment = \"custom\""
                        ));
                    }
                }
                "custom" => match &p.base_url {
                    None => problems.push(format!(
                        "profiles.{name}: environment \"custom\" needs base_url"
                    )),
                    Some(url) if !(url.starts_with("https://") || url.starts_with("http://")) => {
                        problems.push(format!("profiles.{name}.base_url must be an http(s) URL"))
                    }
                    Some(_) => {}
                },
                other => problems.push(format!(
                    "profiles.{name}.environment {other:?}: use production, uat or custom"
                )),
            }
            if !(p.refresh_at > 0.0 && p.refresh_at < 1.0) {
                problems.push(format!("profiles.{name}.refresh_at must be between 0 and 1"));
            }
            if !(0.0..0.5).contains(&p.refresh_jitter) {
                problems.push(format!(
                    "profiles.{name}.refresh_jitter must be in [0, 0.5)"
                ));
            }
            if !matches!(p.ready_when.as_str(), "token" | "signer") {
                problems.push(format!(
                    "profiles.{name}.ready_when {:?}: use \"token\" or \"signer\"",
                    p.ready_when
                ));
            }
        }
        for (i, rule) in self.access.iter().enumerate() {
            for problem in rule.problems(&self.profiles.keys().cloned().collect::<Vec<_>>()) {
                problems.push(format!("access[{i}]: {problem}"));
            }
        }
        problems
    }
}

fn check_actor(name: &str, actor: &ActorConfig, problems: &mut Vec<String>) {
    if actor.queue_depth == 0 {
        problems.push(format!("keys.{name}.queue_depth must be at least 1"));
    }
    if actor.sign_timeout_ms == 0 {
        problems.push(format!("keys.{name}.sign_timeout_ms must be > 0"));
    }
}

/// A UUID in its canonical 8-4-4-4-12 hex form.
pub fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
}
