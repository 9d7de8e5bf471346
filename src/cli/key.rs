//! `tm-agent key …`: key management and one-off signing without the daemon.
//!
//! Owns the `key` subcommands and how their backend settings are assembled: from flags, or
//! from a config file's `[keys.NAME]` table (`--config FILE --key NAME`) with flags
//! overriding it. `generate`, `import` and `list` need a hardware backend (`pkcs11`, or `piv`
//! for a YubiKey: `--backend piv [--serial N] [--slot 9c]`); `attest` and
//! `protect-management-key` are YubiKey-only; `public`, `sign-challenge` and `stamp` also
//! work on a software key file (`--backend soft --key-file FILE`, for development and
//! migration only).
//!
//! The PKCS#11 module is, in order: `--module`, the config's `module`,
//! `$TM_AGENT_PKCS11_MODULE`, then SoftHSM's module if it is installed.
//! The PIN comes from `--pin-file`, `--pin-credential` or `--pin-env` (or the config);
//! without any, the user is prompted (no echo) when standard input is a terminal, and the
//! command fails otherwise. PINs never come from the command line itself.
//!
//! Signing goes through the same [`Handle`] as the daemon (with its self-test). Blocking
//! work runs in `spawn_blocking`. Machine-readable output goes to standard output, advice to
//! standard error.

use std::io::{IsTerminal as _, Read as _};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Subcommand, ValueEnum};
use p256::ecdsa::VerifyingKey;
use serde::Deserialize as _;
use zeroize::Zeroizing;

use super::{blocking, usage_bail, UsageError};
use crate::config::KeyConfig;
use crate::jose;
use crate::jose::is_uuid;
use crate::signer::pin::PinSource;
use crate::signer::piv::{self, ManagementKey, PivSettings, WriteOptions};
use crate::signer::pkcs11::{self, KeyEntry, Pkcs11Settings};
use crate::signer::{soft, ActorOptions, Handle};

/// Environment variable naming the PKCS#11 module when `--module` is not given.
pub const MODULE_ENV: &str = "TM_AGENT_PKCS11_MODULE";

/// Where SoftHSM's module is looked for when nothing else names a module.
pub const SOFTHSM_MODULES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

/// `tm-agent key`: options that select the key, then the subcommand.
#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(flatten)]
    pub backend: BackendArgs,
    #[command(subcommand)]
    pub command: KeyCommand,
}

/// Which kind of key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// A key inside a PKCS#11 token (HSM, SoftHSM).
    Pkcs11,
    /// A key in a YubiKey PIV slot, through pcscd.
    Piv,
    /// A key in a file (website bundle JSON or PEM): development and migration only.
    Soft,
}

/// Where the key is. Every option may come before or after the subcommand.
#[derive(Debug, Default, Args)]
pub struct BackendArgs {
    /// Backend of the key [default: the config's, else pkcs11].
    #[arg(long, global = true, value_enum)]
    pub backend: Option<Backend>,
    /// Read the key's settings from this tm-agent config file (use with --key).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The key's name in the config file: its [keys.NAME] table (use with --config).
    #[arg(long, global = true, value_name = "NAME")]
    pub key: Option<String>,
    /// PKCS#11 module [default: $TM_AGENT_PKCS11_MODULE, else SoftHSM's if installed].
    #[arg(long, global = true, value_name = "PATH")]
    pub module: Option<PathBuf>,
    /// Token label (tokens are found by label or serial, never by slot number).
    #[arg(long, global = true, value_name = "LABEL")]
    pub token_label: Option<String>,
    /// Token serial number.
    #[arg(long, global = true, value_name = "SERIAL")]
    pub token_serial: Option<String>,
    /// Label (CKA_LABEL) of the key to use.
    #[arg(long, global = true, value_name = "LABEL")]
    pub key_label: Option<String>,
    /// Id (CKA_ID) of the key to use, in hex.
    #[arg(long, global = true, value_name = "HEX")]
    pub cka_id: Option<String>,
    /// Read the user PIN from this file (mode 0600).
    #[arg(long, global = true, value_name = "FILE")]
    pub pin_file: Option<PathBuf>,
    /// Read the user PIN from this systemd credential.
    #[arg(long, global = true, value_name = "NAME")]
    pub pin_credential: Option<String>,
    /// Read the user PIN from this environment variable.
    #[arg(long, global = true, value_name = "VAR")]
    pub pin_env: Option<String>,
    /// Sessions to open (only matters to the daemon; the CLI signs through one).
    #[arg(long, global = true, value_name = "N")]
    pub sessions: Option<usize>,
    /// Key file for --backend soft: the website's key bundle or a PEM private key.
    #[arg(long, global = true, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// YubiKey serial number for --backend piv [default: the only YubiKey present].
    #[arg(long, global = true, value_name = "N")]
    pub serial: Option<u32>,
    /// PIV slot for --backend piv: 9a, 9c, 9d, 9e or 82-95 [default: 9c].
    #[arg(long, global = true, value_name = "SLOT")]
    pub slot: Option<String>,
}

/// How `generate`, `import` and `protect-management-key` authenticate to a YubiKey (its PIV
/// management key). One of them; the key is never given on the command line itself.
#[derive(Debug, Default, Args)]
pub struct MgmArgs {
    /// Read the management key (48 hex digits, 3DES) from this file (mode 0600).
    #[arg(long, value_name = "FILE")]
    pub mgm_key_file: Option<PathBuf>,
    /// Read the management key from this systemd credential.
    #[arg(long, value_name = "NAME")]
    pub mgm_key_credential: Option<String>,
    /// Read the management key from this environment variable.
    #[arg(long, value_name = "VAR")]
    pub mgm_key_env: Option<String>,
    /// Use the management key stored PIN-protected on the card (ykman --protect, or
    /// `tm-agent key protect-management-key`).
    #[arg(long)]
    pub mgm_key_protected: bool,
    /// Use the factory default management key (then replace it: anyone holding the card
    /// can replace its keys while it is the default).
    #[arg(long)]
    pub default_mgm_key: bool,
}

impl MgmArgs {
    fn management_key(&self) -> anyhow::Result<ManagementKey> {
        let named = checked_sources([
            (
                self.mgm_key_file.clone().map(PinSource::File),
                "--mgm-key-file",
            ),
            (
                self.mgm_key_credential.clone().map(PinSource::Credential),
                "--mgm-key-credential",
            ),
            (
                self.mgm_key_env.clone().map(PinSource::Env),
                "--mgm-key-env",
            ),
        ])?;
        let mut given: Vec<ManagementKey> = named.into_iter().map(ManagementKey::Hex).collect();
        given.extend(
            self.mgm_key_protected
                .then_some(ManagementKey::PinProtected),
        );
        given.extend(
            self.default_mgm_key
                .then_some(ManagementKey::FactoryDefault),
        );
        match given.len() {
            0 => Ok(ManagementKey::Hex(PinSource::Prompt)),
            1 => given
                .into_iter()
                .next()
                .ok_or_else(|| anyhow!("no management key source")),
            _ => usage_bail!(
                "give at most one of --mgm-key-file, --mgm-key-credential, --mgm-key-env, \
                 --mgm-key-protected and --default-mgm-key"
            ),
        }
    }
}

/// The sources given on the command line, each checked by [`PinSource::check_shape`] (a
/// PIN or management key typed where its source's name goes is refused, never quoted).
fn checked_sources<const N: usize>(
    flags: [(Option<PinSource>, &str); N],
) -> anyhow::Result<Vec<PinSource>> {
    let mut given = Vec::new();
    for (source, flag) in flags {
        if let Some(source) = source {
            if let Err(why) = source.check_shape(false) {
                usage_bail!("{flag} {why}");
            }
            given.push(source);
        }
    }
    Ok(given)
}

/// How a YubiKey key is written (`generate`, `import` with --backend piv).
#[derive(Debug, Args)]
pub struct PivWriteArgs {
    /// When the YubiKey asks for the PIN: once per session suits an unattended agent.
    #[arg(long, value_name = "POLICY", default_value = "once", value_parser = parse_pin_policy)]
    pub pin_policy: piv::PinPolicy,
    /// When it asks for a touch: never, for an unattended agent (always/cached need a
    /// person at the machine for every signature).
    #[arg(long, value_name = "POLICY", default_value = "never", value_parser = parse_touch_policy)]
    pub touch_policy: piv::TouchPolicy,
    /// Replace a key already in the slot (destroyed for good).
    #[arg(long)]
    pub force: bool,
    /// Subject of the self-signed certificate written to the slot.
    #[arg(long, value_name = "DN", default_value = "CN=tm-agent")]
    pub subject: String,
    #[command(flatten)]
    pub mgm: MgmArgs,
}

fn parse_pin_policy(text: &str) -> Result<piv::PinPolicy, String> {
    text.parse()
}

fn parse_touch_policy(text: &str) -> Result<piv::TouchPolicy, String> {
    text.parse()
}

impl PivWriteArgs {
    fn options(&self) -> anyhow::Result<WriteOptions> {
        let mut options = WriteOptions::new(self.mgm.management_key()?);
        options.pin_policy = self.pin_policy;
        options.touch_policy = self.touch_policy;
        options.overwrite = self.force;
        options.subject = self.subject.clone();
        Ok(options)
    }
}

/// Output format of `key public`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PublicFormat {
    /// SubjectPublicKeyInfo PEM: what the API Keys page takes.
    Pem,
    /// JWK with its RFC 7638 thumbprint as `kid`.
    Jwk,
    /// Compressed SEC1 point in hex (33 bytes; Turnkey's publicKey).
    Hex,
}

/// The `key` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Generate a P-256 key pair inside the token or YubiKey slot; prints the public key
    /// (PEM) to register.
    Generate {
        /// Label (CKA_LABEL) of the new key; refused if any object has it already (pkcs11).
        #[arg(long)]
        label: Option<String>,
        /// Id (CKA_ID) in hex [default: 16 random bytes] (pkcs11).
        #[arg(long, value_name = "HEX")]
        id: Option<String>,
        #[command(flatten)]
        piv: PivWriteArgs,
    },
    /// Import the website's API key bundle (JSON) into the token as a non-extractable key.
    Import {
        /// The bundle file downloaded from the API Keys page.
        #[arg(long, value_name = "FILE")]
        bundle: PathBuf,
        /// Label (CKA_LABEL) of the key [default: the bundle's label, else tm-<key_id prefix>].
        #[arg(long)]
        label: Option<String>,
        /// Id (CKA_ID) in hex [default: derived from the public key].
        #[arg(long, value_name = "HEX")]
        id: Option<String>,
        #[command(flatten)]
        piv: PivWriteArgs,
    },
    /// List the keys in the token (or the YubiKey's slots) with their protection flags.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the key's public key.
    Public {
        #[arg(long, value_enum, default_value_t = PublicFormat::Pem)]
        format: PublicFormat,
    },
    /// Sign the Auth API challenge and print the JSON body for POST /api-key/token.
    SignChallenge {
        /// The API key's key_id (UUID) as issued by True Markets.
        #[arg(long, value_name = "UUID")]
        key_id: String,
        /// Unix seconds [default: now]; the API accepts ±30 s around its clock.
        #[arg(long, allow_negative_numbers = true)]
        timestamp: Option<i64>,
    },
    /// Print the Turnkey API stamp of the payload read from standard input (exact bytes).
    /// Standard input carries the payload, so give the PIN with --pin-file, --pin-credential
    /// or --pin-env.
    Stamp,
    /// YubiKey: print the slot's attestation (PEM: the slot's certificate signed by the
    /// card's attestation key, then that key's certificate), proof the key was generated on
    /// the card, with its PIN and touch policies.
    Attest,
    /// YubiKey: set a random management key and store it PIN-protected on the card (as
    /// `ykman piv access change-management-key --protect`); afterwards key management needs
    /// only the PIN (--mgm-key-protected).
    ProtectManagementKey {
        #[command(flatten)]
        mgm: MgmArgs,
    },
}

/// Settings of the selected key.
#[derive(Debug)]
enum Selected {
    Pkcs11(Pkcs11Settings),
    Piv(PivSettings),
    Soft(PathBuf),
}

/// The `[keys.NAME]` table of the config file at `path`, with the daemon's config model.
///
/// Only that table is checked against the model (the rest need only be TOML). Errors never
/// show toml's own text: it can quote the file, and a PIN written straight into it
/// (`pin = "987654"`) would end up on the terminal or in a log. They give the position
/// when toml knows it, and what to check.
fn load_config_key(path: &Path, name: &str) -> anyhow::Result<KeyConfig> {
    read_config_key(path, name).map_err(|e| super::UnusableConfig(format!("{e:#}")).into())
}

fn read_config_key(path: &Path, name: &str) -> anyhow::Result<KeyConfig> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?,
    );
    let doc: toml::Table = toml::from_str(&text).map_err(|e| {
        anyhow!(
            "{} is not valid TOML{}: fix its syntax (toml's message is not shown, as it could \
             quote a secret)",
            path.display(),
            toml_position(&text, &e)
        )
    })?;
    let keys = doc
        .get("keys")
        .and_then(toml::Value::as_table)
        .ok_or_else(|| anyhow!("{} has no [keys.*] tables", path.display()))?;
    let entry = keys
        .get(name)
        .filter(|v| v.is_table())
        .cloned()
        .ok_or_else(|| {
            let names: Vec<&str> = keys.keys().map(String::as_str).collect();
            anyhow!(
                "{} has no [keys.{name}] (keys there: {})",
                path.display(),
                names.join(", ")
            )
        })?;
    KeyConfig::deserialize(entry).map_err(|e| {
        // The table read from a Value has no positions: read it again from the text.
        let header = text.split('\n').position(|line| {
            crate::config::key_table_name(line)
                .is_some_and(|n| n == name || n == format!("\"{name}\""))
        });
        let position = header
            .and_then(|i| crate::config::reread_key_table(&text, i + 1))
            .map(|(doc, e)| toml_position(&doc, &e))
            .unwrap_or_else(|| toml_position(&text, &e));
        if crate::signer::pin::is_pin_source_refusal(e.message()) {
            return anyhow!(
                "[keys.{name}] in {}{position}: {}",
                path.display(),
                e.message()
            );
        }
        anyhow!(
            "[keys.{name}] in {} is not a valid key table{}: check backend = \"pkcs11\", \
             \"piv\" or \"soft\", the field names and the types of their values against the example \
             config (/usr/share/doc/tm-agent/config.example.toml); toml's message is not \
             shown, as it could quote a secret",
            path.display(),
            position,
        )
    })
}

/// ` at line L, column C` of a toml error when it has a position in `text`, else nothing.
fn toml_position(text: &str, err: &toml::de::Error) -> String {
    crate::config::toml_error_position(text, err)
        .map(|(line, column)| format!(" at line {line}, column {column}"))
        .unwrap_or_default()
}

/// After an import: tell the user to destroy the bundle file, then why the key may deserve
/// replacing (`origin`).
fn destroy_bundle_advice(bundle_path: &Path, origin: &str) {
    println!();
    println!("The bundle file still holds the private key in plain text. Destroy it now:");
    println!(
        "  shred -u {}",
        shell_quote(&bundle_path.display().to_string())
    );
    println!("and any other copy of it (downloads folder, backups, other machines).");
    println!("{origin}");
}

/// The module when neither the flags nor the config name one.
fn default_module() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(MODULE_ENV) {
        return Ok(PathBuf::from(path));
    }
    SOFTHSM_MODULES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| {
            anyhow!(
                "no PKCS#11 module given: pass --module PATH (your HSM vendor's PKCS#11 library) \
                 or set {MODULE_ENV}"
            )
        })
}

impl BackendArgs {
    fn pin_source(&self) -> anyhow::Result<Option<PinSource>> {
        let given = checked_sources([
            (self.pin_file.clone().map(PinSource::File), "--pin-file"),
            (
                self.pin_credential.clone().map(PinSource::Credential),
                "--pin-credential",
            ),
            (self.pin_env.clone().map(PinSource::Env), "--pin-env"),
        ])?;
        match given.len() {
            0 => Ok(None),
            1 => Ok(given.into_iter().next()),
            _ => usage_bail!("give at most one of --pin-file, --pin-credential and --pin-env"),
        }
    }

    fn select(&self) -> anyhow::Result<Selected> {
        let from_config = match (&self.config, &self.key) {
            (Some(path), Some(name)) => Some(load_config_key(path, name)?),
            (None, None) => None,
            _ => usage_bail!("--config and --key go together: --config FILE --key NAME"),
        };
        let backend = self.backend.unwrap_or(match from_config {
            Some(KeyConfig::Soft(_)) => Backend::Soft,
            Some(KeyConfig::Piv(_)) => Backend::Piv,
            _ => Backend::Pkcs11,
        });
        match (backend, from_config) {
            (Backend::Piv, config) => {
                let mut settings = match config {
                    Some(KeyConfig::Piv(s)) => s,
                    None => PivSettings::new(PinSource::Prompt),
                    Some(_) => usage_bail!("the config's key is not a YubiKey (piv) key"),
                };
                if self.serial.is_some() {
                    settings.serial = self.serial;
                }
                if let Some(slot) = &self.slot {
                    settings.slot = slot.clone();
                }
                if let Some(pin) = self.pin_source()? {
                    settings.pin = pin;
                }
                settings.validate()?;
                Ok(Selected::Piv(settings))
            }
            (Backend::Soft, config) => {
                let file = match (&self.key_file, config) {
                    (Some(file), _) => file.clone(),
                    (None, Some(KeyConfig::Soft(soft))) => soft.key_file,
                    _ => usage_bail!("--backend soft needs --key-file FILE"),
                };
                Ok(Selected::Soft(file))
            }
            (Backend::Pkcs11, Some(KeyConfig::Soft(_))) => {
                usage_bail!("the config's key is a soft key, not pkcs11")
            }
            (Backend::Pkcs11, Some(KeyConfig::Piv(_))) => {
                usage_bail!("the config's key is a YubiKey (piv) key, not pkcs11")
            }
            (Backend::Pkcs11, config) => {
                let mut settings = match (config, &self.module) {
                    (Some(KeyConfig::Pkcs11(s)), _) => s,
                    (_, Some(module)) => Pkcs11Settings::new(module, PinSource::Prompt),
                    _ => Pkcs11Settings::new(default_module()?, PinSource::Prompt),
                };
                if let Some(module) = &self.module {
                    settings.module = module.clone();
                }
                if self.token_label.is_some() {
                    settings.token_label = self.token_label.clone();
                }
                if self.token_serial.is_some() {
                    settings.token_serial = self.token_serial.clone();
                }
                if self.key_label.is_some() {
                    settings.key_label = self.key_label.clone();
                }
                if let Some(id) = &self.cka_id {
                    settings.key_id = Some(pkcs11::parse_hex_id(id).map_err(UsageError)?);
                }
                if let Some(pin) = self.pin_source()? {
                    settings.pin = pin;
                }
                if let Some(n) = self.sessions {
                    settings.sessions = n;
                }
                settings.validate()?;
                Ok(Selected::Pkcs11(settings))
            }
        }
    }

    fn pkcs11(&self, command: &str) -> anyhow::Result<Pkcs11Settings> {
        match self.select()? {
            Selected::Pkcs11(settings) => Ok(settings),
            Selected::Piv(_) | Selected::Soft(_) => {
                usage_bail!("`tm-agent key {command}` with these options works on PKCS#11 tokens only (--backend pkcs11)")
            }
        }
    }

    fn piv(&self, command: &str) -> anyhow::Result<PivSettings> {
        match self.select()? {
            Selected::Piv(settings) => Ok(settings),
            _ => usage_bail!("`tm-agent key {command}` works on YubiKeys only (--backend piv)"),
        }
    }
}

/// Runs a `key` subcommand.
pub async fn run(args: KeyArgs) -> anyhow::Result<()> {
    let backend = args.backend;
    match args.command {
        KeyCommand::Generate { label, id, piv } => generate(&backend, label, id, piv).await,
        KeyCommand::Import {
            bundle,
            label,
            id,
            piv,
        } => import(&backend, bundle, label, id, piv).await,
        KeyCommand::List { json } => list(&backend, json).await,
        KeyCommand::Public { format } => public(&backend, format).await,
        KeyCommand::SignChallenge { key_id, timestamp } => {
            sign_challenge(&backend, key_id, timestamp).await
        }
        KeyCommand::Stamp => stamp(&backend).await,
        KeyCommand::Attest => attest(&backend).await,
        KeyCommand::ProtectManagementKey { mgm } => protect_management_key(&backend, mgm).await,
    }
}

/// A YubiKey key is chosen by its slot: `--label` and `--id` name PKCS#11 objects.
fn refuse_pkcs11_names(label: &Option<String>, id: &Option<String>) -> anyhow::Result<()> {
    if label.is_some() || id.is_some() {
        usage_bail!("--label and --id are for PKCS#11 tokens; a YubiKey key is chosen by --slot");
    }
    Ok(())
}

/// Reads and parses the website's key bundle; the file's text is wiped from memory after.
fn read_bundle(path: &Path) -> anyhow::Result<jose::KeyBundle> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the key bundle {}", path.display()))?,
    );
    jose::parse_key_bundle(&text)
        .with_context(|| format!("{} is not a usable key bundle", path.display()))
}

fn parse_id(id: Option<String>) -> anyhow::Result<Option<Vec<u8>>> {
    id.map(|text| pkcs11::parse_hex_id(&text).map_err(|e| UsageError(e).into()))
        .transpose()
}

async fn generate(
    backend: &BackendArgs,
    label: Option<String>,
    id: Option<String>,
    piv_args: PivWriteArgs,
) -> anyhow::Result<()> {
    if let Selected::Piv(settings) = backend.select()? {
        refuse_pkcs11_names(&label, &id)?;
        return generate_piv(settings, piv_args).await;
    }
    let Some(label) = label else {
        usage_bail!("--label LABEL is required: the new key's CKA_LABEL in the token");
    };
    let settings = backend.pkcs11("generate")?;
    let sign_hint = sign_command(&settings, &label);
    let id = parse_id(id)?;
    let token = token_name(&settings);
    let entry = blocking({
        let label = label.clone();
        move || pkcs11::generate(&settings, &label, id.as_deref())
    })
    .await?
    .with_context(|| format!("cannot generate key {label:?}"))?;
    let public = entry
        .public_key
        .ok_or_else(|| anyhow!("the token returned no public key"))?;
    print!("{}", jose::public_key_pem(&public));
    eprintln!(
        "Generated P-256 key {label:?} (CKA_ID {}) in {token}: sensitive, never extractable.\n\
         Register the public key above on the True Markets API Keys page, then sign with\n  \
         {sign_hint} --key-id <the key_id it gives you>",
        entry.id_hex(),
    );
    Ok(())
}

async fn import(
    backend: &BackendArgs,
    bundle_path: PathBuf,
    label: Option<String>,
    id: Option<String>,
    piv_args: PivWriteArgs,
) -> anyhow::Result<()> {
    if let Selected::Piv(settings) = backend.select()? {
        refuse_pkcs11_names(&label, &id)?;
        return import_piv(settings, bundle_path, piv_args).await;
    }
    let settings = backend.pkcs11("import")?;
    let id = parse_id(id)?;
    let bundle = read_bundle(&bundle_path)?;
    let label = label
        .or_else(|| bundle.label.clone().filter(|l| !l.trim().is_empty()))
        .unwrap_or_else(|| format!("tm-{}", bundle.key_id.chars().take(8).collect::<String>()));
    let key_id = bundle.key_id.clone();
    let token = token_name(&settings);
    let sign_hint = sign_command(&settings, &label);
    let entry = blocking({
        let label = label.clone();
        move || pkcs11::import(&settings, &bundle, &label, id.as_deref())
    })
    .await?
    .with_context(|| format!("cannot import {} into {token}", bundle_path.display()))?;
    println!(
        "Imported API key {key_id} into {token} as key {label:?} (CKA_ID {}): sensitive, not \
         extractable.",
        entry.id_hex()
    );
    destroy_bundle_advice(
        &bundle_path,
        "The website generated this key, so it existed outside the HSM: if that matters, \
         generate a new key inside the HSM (`tm-agent key generate`), register its public key \
         on the API Keys page and revoke this one.",
    );
    println!();
    println!("Sign with: {sign_hint} --key-id {key_id}");
    Ok(())
}

async fn list(backend: &BackendArgs, json: bool) -> anyhow::Result<()> {
    if let Selected::Piv(settings) = backend.select()? {
        return list_piv(settings, json).await;
    }
    let settings = backend.pkcs11("list")?;
    let token = token_name(&settings);
    let entries = blocking(move || pkcs11::list(&settings))
        .await?
        .with_context(|| format!("cannot list the keys in {token}"))?;
    if json {
        let items: Vec<serde_json::Value> = entries.iter().map(entry_json).collect();
        println!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(());
    }
    if entries.is_empty() {
        eprintln!("{token} holds no keys");
        return Ok(());
    }
    println!(
        "{:<24} {:<32} {:<10} {:<7} {:<9} {:<11} {:<17} {:<5} PUBLIC KEY (compressed)",
        "LABEL", "ID", "TYPE", "PRIVATE", "SENSITIVE", "EXTRACTABLE", "NEVER-EXTRACTABLE", "LOCAL"
    );
    for e in &entries {
        println!(
            "{:<24} {:<32} {:<10} {:<7} {:<9} {:<11} {:<17} {:<5} {}",
            e.label,
            e.id_hex(),
            e.key_type,
            yes_no(Some(e.has_private_key)),
            yes_no(e.sensitive),
            yes_no(e.extractable),
            yes_no(e.never_extractable),
            yes_no(e.local),
            e.public_key
                .as_ref()
                .map(jose::public_key_compressed_hex)
                .unwrap_or_else(|| "-".into()),
        );
    }
    Ok(())
}

fn yes_no(flag: Option<bool>) -> &'static str {
    match flag {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    }
}

fn entry_json(e: &KeyEntry) -> serde_json::Value {
    serde_json::json!({
        "label": e.label,
        "id": e.id_hex(),
        "key_type": e.key_type,
        "has_private_key": e.has_private_key,
        "sensitive": e.sensitive,
        "extractable": e.extractable,
        "always_sensitive": e.always_sensitive,
        "never_extractable": e.never_extractable,
        "local": e.local,
        "can_sign": e.can_sign,
        "public_key": e.public_key.as_ref().map(jose::public_key_compressed_hex),
        "jwk_thumbprint": e.public_key.as_ref().map(|k| jose::Jwk::from_verifying_key(k).thumbprint()),
    })
}

async fn public(backend: &BackendArgs, format: PublicFormat) -> anyhow::Result<()> {
    let key: VerifyingKey = match backend.select()? {
        Selected::Pkcs11(settings) => {
            let what = settings.location();
            blocking(move || pkcs11::public(&settings))
                .await?
                .with_context(|| format!("cannot read the public key of {what}"))?
        }
        Selected::Piv(settings) => {
            let what = settings.location();
            blocking(move || piv::public(&settings))
                .await?
                .with_context(|| format!("cannot read the public key of {what}"))?
                .1
        }
        Selected::Soft(path) => *blocking(move || soft::load_key(&path))
            .await??
            .verifying_key(),
    };
    match format {
        PublicFormat::Pem => print!("{}", jose::public_key_pem(&key)),
        PublicFormat::Jwk => {
            let mut jwk = jose::Jwk::from_verifying_key(&key);
            jwk.kid = Some(jwk.thumbprint());
            jwk.alg = Some("ES256".into());
            jwk.use_ = Some("sig".into());
            println!("{}", serde_json::to_string_pretty(&jwk)?);
        }
        PublicFormat::Hex => println!("{}", jose::public_key_compressed_hex(&key)),
    }
    Ok(())
}

/// Opens the selected key behind a signer [`Handle`] (one worker; self-tested).
async fn open_handle(backend: &BackendArgs) -> anyhow::Result<Handle> {
    let options = ActorOptions {
        name: "tm-agent-key".into(),
        ..ActorOptions::default()
    };
    match backend.select()? {
        Selected::Pkcs11(settings) => {
            let what = settings.location();
            blocking(move || {
                let (info, workers) = pkcs11::open(&settings, 1)?;
                Handle::spawn(info, workers, options)
            })
            .await?
            .with_context(|| format!("cannot open {what}"))
        }
        Selected::Piv(settings) => {
            let what = settings.location();
            blocking(move || {
                let (info, workers) = piv::open(&settings)?;
                Handle::spawn(info, workers, options)
            })
            .await?
            .with_context(|| format!("cannot open {what}"))
        }
        Selected::Soft(path) => blocking(move || {
            let key = soft::load_key(&path)?;
            let (info, workers) = soft::open(key, format!("key file {}", path.display()), 1);
            Handle::spawn(info, workers, options)
        })
        .await?
        .context("cannot open the software key"),
    }
}

async fn sign_challenge(
    backend: &BackendArgs,
    key_id: String,
    timestamp: Option<i64>,
) -> anyhow::Result<()> {
    if !is_uuid(&key_id) {
        usage_bail!(
            "--key-id {key_id:?} is not a UUID: pass the API key's key_id as the API Keys page \
             (or the key bundle) shows it"
        );
    }
    let timestamp = match timestamp {
        Some(ts) => ts,
        None => i64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .context("the system clock is before 1970")?
                .as_secs(),
        )?,
    };
    let handle = open_handle(backend).await?;
    let body = handle
        .sign_challenge(&key_id, timestamp)
        .await
        .context("cannot sign the challenge")?;
    println!("{}", serde_json::to_string(&body)?);
    Ok(())
}

async fn stamp(backend: &BackendArgs) -> anyhow::Result<()> {
    let payload = blocking(|| {
        let mut stdin = std::io::stdin();
        if stdin.is_terminal() {
            eprintln!("reading the payload from standard input until end of file (Ctrl-D)…");
        }
        let mut payload = Vec::new();
        stdin.read_to_end(&mut payload).map(|_| payload)
    })
    .await?
    .context("cannot read the payload from standard input")?;
    if payload.is_empty() {
        bail!("no payload on standard input: pipe the Turnkey payload in, exactly as received");
    }
    let handle = open_handle(backend).await?;
    let stamp = handle
        .stamp(&payload)
        .await
        .context("cannot stamp the payload")?;
    println!("{stamp}");
    Ok(())
}

async fn generate_piv(settings: PivSettings, args: PivWriteArgs) -> anyhow::Result<()> {
    let options = args.options()?;
    let what = settings.location();
    let slot = blocking(move || piv::generate(&settings, &options))
        .await?
        .with_context(|| format!("cannot generate a key in {what}"))?;
    let public = slot
        .public_key
        .ok_or_else(|| anyhow!("the YubiKey reported no P-256 public key"))?;
    print!("{}", jose::public_key_pem(&public));
    eprintln!(
        "Generated a P-256 key in {what} ({}); a self-signed certificate is in the slot.\n\
         Register the public key above on the True Markets API Keys page, then sign with\n  \
         tm-agent key --backend piv --slot {} sign-challenge --key-id <the key_id it gives you>",
        slot.policy_summary(),
        slot.slot
    );
    Ok(())
}

async fn import_piv(
    settings: PivSettings,
    bundle_path: PathBuf,
    args: PivWriteArgs,
) -> anyhow::Result<()> {
    let options = args.options()?;
    let bundle = read_bundle(&bundle_path)?;
    let key_id = bundle.key_id.clone();
    let what = settings.location();
    let slot = blocking(move || piv::import(&settings, &bundle, &options))
        .await?
        .with_context(|| format!("cannot import {} into {what}", bundle_path.display()))?;
    println!(
        "Imported API key {key_id} into {what} ({}): the YubiKey cannot export it.",
        slot.policy_summary()
    );
    destroy_bundle_advice(
        &bundle_path,
        "The website generated this key, so it existed outside the YubiKey (and it cannot be \
         attested): if that matters, generate a new key on the YubiKey (`tm-agent key \
         --backend piv generate`), register its public key and revoke this one.",
    );
    println!();
    println!(
        "Sign with: tm-agent key --backend piv --slot {} sign-challenge --key-id {key_id}",
        slot.slot
    );
    Ok(())
}

async fn list_piv(settings: PivSettings, json: bool) -> anyhow::Result<()> {
    let what = settings.location();
    let card = blocking(move || piv::list(&settings))
        .await?
        .with_context(|| format!("cannot list the slots of {what}"))?;
    if json {
        let slots: Vec<serde_json::Value> = card
            .slots
            .iter()
            .map(|s| {
                serde_json::json!({
                    "slot": s.slot,
                    "algorithm": s.algorithm,
                    "pin_policy": s.pin_policy.map(|p| p.to_string()),
                    "touch_policy": s.touch_policy.map(|t| t.to_string()),
                    "origin": s.origin,
                    "certificate_subject": s.certificate_subject,
                    "public_key": s.public_key.as_ref().map(jose::public_key_compressed_hex),
                })
            })
            .collect();
        let out = serde_json::json!({
            "serial": card.serial,
            "version": card.version,
            "reader": card.reader,
            "pin_tries_left": card.pin_tries_left,
            "slots": slots,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    eprintln!(
        "YubiKey {} (PIV firmware {}, reader {:?}), PIN tries left: {}",
        card.serial,
        card.version,
        card.reader,
        card.pin_tries_left
            .map_or("unknown".into(), |n| n.to_string())
    );
    if card.slots.is_empty() {
        eprintln!("no keys in the PIV slots");
        return Ok(());
    }
    println!(
        "{:<5} {:<9} {:<10} {:<8} {:<10} {:<30} PUBLIC KEY (compressed)",
        "SLOT", "ALGORITHM", "PIN", "TOUCH", "ORIGIN", "CERTIFICATE"
    );
    for s in &card.slots {
        println!(
            "{:<5} {:<9} {:<10} {:<8} {:<10} {:<30} {}",
            s.slot,
            s.algorithm,
            s.pin_policy.map_or("-".into(), |p| p.to_string()),
            s.touch_policy.map_or("-".into(), |t| t.to_string()),
            s.origin.unwrap_or("-"),
            s.certificate_subject.as_deref().unwrap_or("-"),
            s.public_key
                .as_ref()
                .map(jose::public_key_compressed_hex)
                .unwrap_or_else(|| "-".into()),
        );
    }
    Ok(())
}

async fn attest(backend: &BackendArgs) -> anyhow::Result<()> {
    let settings = backend.piv("attest")?;
    let what = settings.location();
    let attestation = blocking(move || piv::attest(&settings))
        .await?
        .with_context(|| format!("cannot attest {what}"))?;
    print!("{}", attestation.to_pem());
    Ok(())
}

async fn protect_management_key(backend: &BackendArgs, mgm: MgmArgs) -> anyhow::Result<()> {
    let settings = backend.piv("protect-management-key")?;
    let current = mgm.management_key()?;
    let what = settings.location();
    blocking(move || piv::protect_management_key(&settings, &current))
        .await?
        .with_context(|| format!("cannot set a PIN-protected management key on {what}"))?;
    eprintln!(
        "{what}: a random management key is set and stored PIN-protected on the card. Key \
         management now needs only the PIN: pass --mgm-key-protected."
    );
    Ok(())
}

fn token_name(settings: &Pkcs11Settings) -> String {
    match (&settings.token_label, &settings.token_serial) {
        (Some(label), _) => format!("token {label:?}"),
        (None, Some(serial)) => format!("token {serial}"),
        (None, None) => "the token".into(),
    }
}

/// `tm-agent key … sign-challenge --key-label LABEL` with the module, token and PIN flags
/// that found the key this time, so that the hint works as printed.
fn sign_command(settings: &Pkcs11Settings, label: &str) -> String {
    let mut words = vec!["tm-agent key".to_string()];
    let mut flag = |name: &str, value: &str| words.push(format!("{name} {}", shell_quote(value)));
    flag("--module", &settings.module.display().to_string());
    if let Some(token) = &settings.token_label {
        flag("--token-label", token);
    }
    if let Some(serial) = &settings.token_serial {
        flag("--token-serial", serial);
    }
    match &settings.pin {
        PinSource::File(path) => flag("--pin-file", &path.display().to_string()),
        PinSource::Credential(name) => flag("--pin-credential", name),
        PinSource::Env(name) => flag("--pin-env", name),
        PinSource::Prompt => {}
    }
    flag("sign-challenge --key-label", label);
    words.join(" ")
}

/// Quotes `text` for a POSIX shell when it needs it.
fn shell_quote(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@%+=,".contains(c));
    if plain {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("/tmp/key.json"), "/tmp/key.json");
        assert_eq!(shell_quote("/tmp/my key.json"), "'/tmp/my key.json'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn the_sign_hint_names_what_found_the_key() {
        let mut settings =
            Pkcs11Settings::new("/opt/hsm/lib.so", PinSource::Credential("pin".into()));
        settings.token_label = Some("prod hsm".into());
        assert_eq!(
            sign_command(&settings, "tm key"),
            "tm-agent key --module /opt/hsm/lib.so --token-label 'prod hsm' --pin-credential pin \
             sign-challenge --key-label 'tm key'"
        );
        settings.pin = PinSource::Prompt;
        settings.token_label = None;
        settings.token_serial = Some("1234".into());
        assert_eq!(
            sign_command(&settings, "k"),
            "tm-agent key --module /opt/hsm/lib.so --token-serial 1234 sign-challenge --key-label k"
        );
    }

    #[test]
    fn config_key_is_read_and_flags_override_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            r#"
            [keys.prod]
            backend = "pkcs11"
            module = "/opt/hsm/lib.so"
            token_label = "prod"
            key_label = "tm"
            key_id = "0a0b"
            pin = { credential = "hsm-pin" }
            sessions = 2

            [keys.dev]
            backend = "soft"
            key_file = "/tmp/dev.json"
            "#,
        )
        .unwrap();
        let args = BackendArgs {
            config: Some(path.clone()),
            key: Some("prod".into()),
            key_label: Some("other".into()),
            ..BackendArgs::default()
        };
        let Selected::Pkcs11(s) = args.select().unwrap() else {
            panic!("pkcs11 expected")
        };
        assert_eq!(s.module, PathBuf::from("/opt/hsm/lib.so"));
        assert_eq!(s.key_label.as_deref(), Some("other"));
        assert_eq!(s.key_id, Some(vec![0x0a, 0x0b]));
        assert_eq!(s.pin, PinSource::Credential("hsm-pin".into()));
        assert_eq!(s.sessions, 2);
        let args = BackendArgs {
            config: Some(path.clone()),
            key: Some("dev".into()),
            ..BackendArgs::default()
        };
        assert!(matches!(args.select().unwrap(), Selected::Soft(_)));
        let args = BackendArgs {
            config: Some(path),
            key: Some("nope".into()),
            ..BackendArgs::default()
        };
        let err = args.select().unwrap_err().to_string();
        assert!(err.contains("keys there: dev, prod") || err.contains("keys there: prod, dev"));
    }

    #[test]
    fn config_errors_never_quote_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let select = |text: &str| {
            std::fs::write(&path, text).unwrap();
            let args = BackendArgs {
                config: Some(path.clone()),
                key: Some("prod".into()),
                ..BackendArgs::default()
            };
            format!("{:#}", args.select().unwrap_err())
        };
        // A PIN written as the PIN source: toml would say "unknown variant `987654`".
        let err =
            select("[keys.prod]\nbackend = \"pkcs11\"\nmodule = \"/x.so\"\npin = \"987654\"\n");
        assert!(!err.contains("987654"), "{err}");
        assert!(err.contains("[keys.prod]"), "{err}");
        // The PIN source's own refusal is fixed text, so it is shown.
        assert!(err.contains("never the PIN itself"), "{err}");
        // A syntax error on the PIN's line: toml would show the line.
        let err = select("[keys.prod]\nbackend = \"pkcs11\"\npin = 987654 secret\n");
        assert!(!err.contains("987654"), "{err}");
        assert!(err.contains("not valid TOML at line 3, column"), "{err}");
        // Another backend's fields in a soft key: no values echoed either.
        let err = select("[keys.prod]\nbackend = \"soft\"\nkey_file = \"/k\"\npin = \"987654\"\n");
        assert!(!err.contains("987654"), "{err}");
    }

    #[test]
    fn at_most_one_pin_source() {
        let args = BackendArgs {
            module: Some("/x.so".into()),
            pin_file: Some("/p".into()),
            pin_env: Some("P".into()),
            ..BackendArgs::default()
        };
        assert!(args.select().is_err());
        let args = BackendArgs {
            module: Some("/x.so".into()),
            ..BackendArgs::default()
        };
        let Selected::Pkcs11(s) = args.select().unwrap() else {
            panic!("pkcs11 expected")
        };
        assert_eq!(s.pin, PinSource::Prompt, "no source: prompt");
    }
}
