//! The `piv` backend: a P-256 key in a YubiKey PIV slot, reached through pcscd with the
//! `yubikey` crate. This is the only module that imports `yubikey` (and `pcsc`).
//!
//! Owns: finding the card (by serial, or the only YubiKey present), the PIN (verified at
//! open and after every reconnect, never retried when wrong), slot metadata (PIN and touch
//! policy, origin, public key; firmware ≥ 5.3), signing (SHA-256 on the host, GENERAL
//! AUTHENTICATE with ECDSA P-256, DER → [`Signature`]; the [`Handle`](super::Handle) makes it
//! low-S), recovery from a card that was removed, reset or used by another program
//! (reconnect on the next request, with back-off), and key management for the CLI
//! ([`generate`], [`import`], [`list`], [`public`], [`attest`], management keys).
//!
//! Threading: a `YubiKey` is one PC/SC connection, owned by exactly one worker thread: the
//! actor runs a single worker for PIV (one owner of the card). Every function here blocks;
//! call it from a signer thread or the CLI, never on the async runtime.
//!
//! Sharing: connections are PC/SC *shared*, so `yubico-piv-tool` or `ykman` can use the
//! card meanwhile (the agent then verifies its PIN again). When another program holds the
//! card *exclusively* the signer answers `unavailable` with the reason; it never kills
//! other programs.
//!
//! Logging: the `yubikey` crate logs every APDU at TRACE through the `log` crate, the PIN
//! among them. Whoever installs the tracing subscriber must build its filter with
//! [`capped_log_filter`], which forces [`LOG_FILTER_CAP`] whatever level is configured.

use std::str::FromStr;
use std::time::{Duration, Instant};

use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::{DecodePublicKey as _, EncodePublicKey as _};
use secrecy::ExposeSecret as _;
use serde::{Deserialize, Serialize};
use x509_cert::der::{Decode as _, Encode as _};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::Validity;
use yubikey::piv::{self, AlgorithmId, ManagementAlgorithmId, SlotId};
use yubikey::{Certificate, MgmKey, YubiKey};
use zeroize::Zeroizing;

use super::pin::{read_pin, PinSource};
use super::{KeyInfo, Signer, SignerError};
use crate::jose;

/// Tracing directives that keep the `yubikey` and `pcsc` crates at WARN or quieter: their
/// TRACE output carries every APDU, the PIN and management key included.
pub const LOG_FILTER_CAP: &str = "yubikey=warn,pcsc=warn";

/// The crates whose log level [`LOG_FILTER_CAP`] caps.
const CAPPED_TARGETS: [&str; 2] = ["yubikey", "pcsc"];

/// Whether events of `target` come from a crate that [`LOG_FILTER_CAP`] caps: `yubikey`,
/// `pcsc`, or a module of theirs.
pub fn is_capped_target(target: &str) -> bool {
    CAPPED_TARGETS.iter().any(|c| {
        target
            .strip_prefix(c)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// Whether an event or span passes the cap: a capped crate's only at WARN or ERROR. This is
/// the guarantee; [`capped_log_filter`] only keeps a user's filter from asking for more.
/// Installed as a filter of its own beside the (reloadable) user filter: an `EnvFilter`
/// directive can reach the crates' targets in ways a rewrite of the filter text misses
/// (`yubikey:=trace` is a prefix of `yubikey::apdu` and outranks `yubikey=warn`).
pub fn passes_log_cap(metadata: &tracing::Metadata<'_>) -> bool {
    !is_capped_target(metadata.target()) || *metadata.level() <= tracing::Level::WARN
}

/// The tracing filter to install for a configured one (`info`, `debug,tm_agent=trace`, …):
/// drops any directive that names `yubikey` or `pcsc` or is scoped to a span without a
/// target (span directives would enable their events whatever the target), then appends
/// [`LOG_FILTER_CAP`], so the cap holds whatever the configuration says.
pub fn capped_log_filter(configured: &str) -> String {
    let mut kept: Vec<&str> = configured
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .filter(|d| {
            let target = d.split(['[', '=']).next().unwrap_or("").trim();
            let capped = is_capped_target(target);
            let untargeted_span = target.is_empty() && d.contains('[');
            !capped && !untargeted_span
        })
        .collect();
    kept.push(LOG_FILTER_CAP);
    kept.join(",")
}

/// Default slot: 9c ("digital signature").
pub const DEFAULT_SLOT: &str = "9c";

/// Reconnect back-off: first delay and ceiling.
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

const MGM_HINT: &str = "check the management key; YubiKeys with firmware 5.7 or later ship an \
    AES-192 management key, which this version of tm-agent cannot use: switch it to 3DES with \
    `ykman piv access change-management-key -a TDES`";

/// `[keys.NAME]` with `backend = "piv"`: which YubiKey, which slot, where the PIN comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PivSettings {
    /// The YubiKey's serial number (on its case; `ykman list --serials`). None: the only
    /// YubiKey present.
    #[serde(default)]
    pub serial: Option<u32>,
    /// The PIV slot: `9a`, `9c` (default), `9d`, `9e` or a retired slot `82` to `95`.
    #[serde(default = "default_slot")]
    pub slot: String,
    /// Where the PIV PIN (6 to 8 characters) comes from; never the PIN itself.
    pub pin: PinSource,
}

fn default_slot() -> String {
    DEFAULT_SLOT.into()
}

impl PivSettings {
    /// Settings for the only YubiKey present, slot 9c, with `pin`.
    pub fn new(pin: PinSource) -> Self {
        PivSettings {
            serial: None,
            slot: default_slot(),
            pin,
        }
    }

    /// Checks what can be checked without the card.
    pub fn validate(&self) -> Result<(), SignerError> {
        parse_slot(&self.slot).map(|_| ())
    }

    /// Human-readable location, no secrets: `YubiKey 12345678 slot 9c`.
    pub fn location(&self) -> String {
        match self.serial {
            Some(serial) => format!("YubiKey {serial} slot {}", self.slot),
            None => format!("the only YubiKey, slot {}", self.slot),
        }
    }

    fn slot_id(&self) -> Result<SlotId, SignerError> {
        parse_slot(&self.slot)
    }
}

/// Parses a key slot: `9a`, `9c`, `9d`, `9e`, `82` to `95` (any case, `0x` allowed).
/// Slots for management (9b, 80, 81) and attestation (f9) are refused.
pub fn parse_slot(text: &str) -> Result<SlotId, SignerError> {
    let t = text.trim().to_ascii_lowercase();
    let t = t.strip_prefix("0x").unwrap_or(&t);
    let byte = u8::from_str_radix(t, 16).ok();
    match byte {
        Some(b @ (0x9a | 0x9c | 0x9d | 0x9e | 0x82..=0x95)) => {
            SlotId::try_from(b).map_err(|_| bad_slot(text))
        }
        _ => Err(bad_slot(text)),
    }
}

fn bad_slot(text: &str) -> SignerError {
    SignerError::Open(format!(
        "PIV slot {text:?} is not a key slot: use 9a, 9c, 9d, 9e or 82 to 95 (9c is the usual one)"
    ))
}

fn slot_name(slot: SlotId) -> String {
    format!("{:02x}", u8::from(slot))
}

/// The key slots, in the order `list` reports them.
fn key_slots() -> impl Iterator<Item = SlotId> {
    [0x9au8, 0x9c, 0x9d, 0x9e]
        .into_iter()
        .chain(0x82..=0x95)
        .filter_map(|b| SlotId::try_from(b).ok())
}

/// When the card asks for the PIN before a private-key operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinPolicy {
    /// The slot's default (9c: always; 9e: never; others: once).
    Default,
    Never,
    /// Once per session: what an unattended agent wants.
    Once,
    /// Before every signature (tm-agent then sends the PIN before each one).
    Always,
}

/// When the card asks for a touch before a private-key operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TouchPolicy {
    /// The slot's default (never).
    Default,
    /// What an unattended agent needs.
    Never,
    /// Every signature waits for a touch.
    Always,
    /// A touch is good for 15 seconds.
    Cached,
}

impl FromStr for PinPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "default" => Ok(PinPolicy::Default),
            "never" => Ok(PinPolicy::Never),
            "once" => Ok(PinPolicy::Once),
            "always" => Ok(PinPolicy::Always),
            _ => Err(format!(
                "PIN policy {s:?}: expected never, once, always or default"
            )),
        }
    }
}

impl FromStr for TouchPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "default" => Ok(TouchPolicy::Default),
            "never" => Ok(TouchPolicy::Never),
            "always" => Ok(TouchPolicy::Always),
            "cached" => Ok(TouchPolicy::Cached),
            _ => Err(format!(
                "touch policy {s:?}: expected never, always, cached or default"
            )),
        }
    }
}

impl std::fmt::Display for PinPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PinPolicy::Default => "default",
            PinPolicy::Never => "never",
            PinPolicy::Once => "once",
            PinPolicy::Always => "always",
        })
    }
}

impl std::fmt::Display for TouchPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TouchPolicy::Default => "default",
            TouchPolicy::Never => "never",
            TouchPolicy::Always => "always",
            TouchPolicy::Cached => "cached",
        })
    }
}

impl From<PinPolicy> for yubikey::PinPolicy {
    fn from(p: PinPolicy) -> Self {
        match p {
            PinPolicy::Default => yubikey::PinPolicy::Default,
            PinPolicy::Never => yubikey::PinPolicy::Never,
            PinPolicy::Once => yubikey::PinPolicy::Once,
            PinPolicy::Always => yubikey::PinPolicy::Always,
        }
    }
}

impl From<yubikey::PinPolicy> for PinPolicy {
    fn from(p: yubikey::PinPolicy) -> Self {
        match p {
            yubikey::PinPolicy::Default => PinPolicy::Default,
            yubikey::PinPolicy::Never => PinPolicy::Never,
            yubikey::PinPolicy::Once => PinPolicy::Once,
            yubikey::PinPolicy::Always => PinPolicy::Always,
        }
    }
}

impl From<TouchPolicy> for yubikey::TouchPolicy {
    fn from(p: TouchPolicy) -> Self {
        match p {
            TouchPolicy::Default => yubikey::TouchPolicy::Default,
            TouchPolicy::Never => yubikey::TouchPolicy::Never,
            TouchPolicy::Always => yubikey::TouchPolicy::Always,
            TouchPolicy::Cached => yubikey::TouchPolicy::Cached,
        }
    }
}

impl From<yubikey::TouchPolicy> for TouchPolicy {
    fn from(p: yubikey::TouchPolicy) -> Self {
        match p {
            yubikey::TouchPolicy::Default => TouchPolicy::Default,
            yubikey::TouchPolicy::Never => TouchPolicy::Never,
            yubikey::TouchPolicy::Always => TouchPolicy::Always,
            yubikey::TouchPolicy::Cached => TouchPolicy::Cached,
        }
    }
}

/// How key management authenticates to the card (the PIV management key, slot 9b).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManagementKey {
    /// 48 hex digits (a 3DES key, 24 bytes) from a file, systemd credential, environment
    /// variable or prompt, with the same rules as PINs.
    Hex(PinSource),
    /// A random key stored PIN-protected on the card (object 5FC109), as
    /// `ykman piv access change-management-key --protect` or [`protect_management_key`]
    /// leave it; read with the PIN.
    PinProtected,
    /// The factory default `010203…08` ×3. Anyone holding the card can then replace its
    /// keys: use it only to set a real one. Logs a loud warning.
    FactoryDefault,
}

/// How [`generate`] and [`import`] write a key.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    pub pin_policy: PinPolicy,
    pub touch_policy: TouchPolicy,
    pub management_key: ManagementKey,
    /// Replace a key already in the slot (it is destroyed for good).
    pub overwrite: bool,
    /// Subject of the self-signed certificate written to the slot (RFC 4514).
    pub subject: String,
}

impl WriteOptions {
    /// PIN once, touch never (what an unattended agent needs), no overwrite, `CN=tm-agent`.
    pub fn new(management_key: ManagementKey) -> Self {
        WriteOptions {
            pin_policy: PinPolicy::Once,
            touch_policy: TouchPolicy::Never,
            management_key,
            overwrite: false,
            subject: "CN=tm-agent".into(),
        }
    }
}

/// What a slot holds, as far as the card tells.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    /// `9c`, …
    pub slot: String,
    /// `ECCP256`, `ECCP384`, `RSA2048`, `RSA1024`, or `unknown` (no metadata, no certificate).
    pub algorithm: String,
    /// The public key when it is P-256 (from the metadata, else the certificate).
    pub public_key: Option<VerifyingKey>,
    /// None when the firmware has no metadata (before 5.3).
    pub pin_policy: Option<PinPolicy>,
    pub touch_policy: Option<TouchPolicy>,
    /// `generated` (on the card; can be attested) or `imported`.
    pub origin: Option<&'static str>,
    /// Subject of the certificate in the slot, if one is there.
    pub certificate_subject: Option<String>,
}

impl SlotInfo {
    /// `pin policy once, touch policy never, generated on the card`.
    pub fn policy_summary(&self) -> String {
        let pin = self
            .pin_policy
            .map_or("unknown (no metadata before firmware 5.3)".into(), |p| {
                p.to_string()
            });
        let touch = self
            .touch_policy
            .map_or("unknown".into(), |t| t.to_string());
        let origin = match self.origin {
            Some("generated") => ", generated on the card",
            Some("imported") => ", imported",
            _ => "",
        };
        format!("pin policy {pin}, touch policy {touch}{origin}")
    }

    fn has_key(&self) -> bool {
        self.algorithm != "unknown" || self.certificate_subject.is_some()
    }
}

/// A card and its key slots, for `tm-agent key list --backend piv`.
#[derive(Debug, Clone)]
pub struct CardInfo {
    pub serial: u32,
    /// Firmware version of the PIV application, `5.4.3`.
    pub version: String,
    /// The PC/SC reader name.
    pub reader: String,
    /// PIN tries left; None when the card would not say.
    pub pin_tries_left: Option<u8>,
    /// Slots holding a key or a certificate.
    pub slots: Vec<SlotInfo>,
}

/// An attestation: the slot's certificate signed by the card's attestation key (slot f9).
#[derive(Debug, Clone)]
pub struct Attestation {
    /// DER of the attestation certificate for the slot's key.
    pub certificate: Vec<u8>,
    /// DER of the attestation key's own certificate (signed by Yubico's CA), if readable.
    pub intermediate: Option<Vec<u8>>,
}

impl Attestation {
    /// Both certificates as PEM, the slot's first.
    pub fn to_pem(&self) -> String {
        let mut out = der_to_pem("CERTIFICATE", &self.certificate);
        if let Some(ca) = &self.intermediate {
            out.push_str(&der_to_pem("CERTIFICATE", ca));
        }
        out
    }
}

fn der_to_pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

// ---------------------------------------------------------------------------------------
// Errors

/// Maps a `yubikey` error of `op` to a [`SignerError`] that says what to do next.
fn card_error(op: &'static str, e: yubikey::Error) -> SignerError {
    match e {
        yubikey::Error::WrongPin { tries: 0 } | yubikey::Error::PinLocked => SignerError::PinLocked,
        yubikey::Error::WrongPin { tries } => SignerError::WrongPin {
            tries_left: Some(u32::from(tries)),
        },
        yubikey::Error::PcscError { inner: Some(pe) } => SignerError::Unavailable(pcsc_reason(pe)),
        yubikey::Error::PcscError { inner: None } => {
            SignerError::Unavailable(format!("PC/SC error during {op}"))
        }
        yubikey::Error::AuthenticationError => SignerError::Piv {
            op,
            error: "the card refused: security status not satisfied".into(),
            hint: "the PIN (or the management key) was not accepted for this operation",
        },
        other => SignerError::Piv {
            op,
            error: other.to_string(),
            hint: "",
        },
    }
}

/// Why PC/SC failed, in words that say what to do next.
fn pcsc_reason(e: pcsc::Error) -> String {
    match e {
        pcsc::Error::NoService | pcsc::Error::ServiceStopped => {
            "pcscd is not running: install it (apt-get install pcscd) and start it \
             (systemctl enable --now pcscd.socket)"
                .into()
        }
        pcsc::Error::NoReadersAvailable => "no smart card reader: is the YubiKey plugged in, \
             with its CCID (smart card) interface enabled (ykman config usb)?"
            .into(),
        pcsc::Error::SharingViolation => "the YubiKey is held exclusively by another program \
             (often scdaemon of GnuPG: add `pcsc-shared` to scdaemon.conf, or stop it with \
             `gpgconf --kill scdaemon`); tm-agent never stops other programs"
            .into(),
        pcsc::Error::RemovedCard
        | pcsc::Error::NoSmartcard
        | pcsc::Error::ResetCard
        | pcsc::Error::UnpoweredCard
        | pcsc::Error::UnresponsiveCard
        | pcsc::Error::ReaderUnavailable
        | pcsc::Error::UnknownReader
        | pcsc::Error::CommError => format!(
            "the YubiKey was removed or reset ({e}); tm-agent reconnects on the next request"
        ),
        other => format!("PC/SC error: {other}"),
    }
}

fn is_transport(e: &yubikey::Error) -> bool {
    matches!(e, yubikey::Error::PcscError { .. })
}

// ---------------------------------------------------------------------------------------
// Opening the card

/// Reads the PIV PIN and checks its length before anything reaches the card (a PIN the
/// card would refuse for its length must not cost a try).
fn read_piv_pin(source: &PinSource) -> Result<Zeroizing<Vec<u8>>, SignerError> {
    let pin = read_pin(source, "YubiKey PIV PIN")?;
    let bytes = pin.expose_secret().as_bytes();
    if !(6..=8).contains(&bytes.len()) {
        // A PIN problem (exit 77: not restarted); the length itself is not told.
        let side = if bytes.len() < 6 { "shorter" } else { "longer" };
        return Err(SignerError::PinUnusable(format!(
            "the PIV PIN from {source} is {side} than YubiKey PINs are (6 to 8 characters); it \
             was not sent to the card: no try spent"
        )));
    }
    Ok(Zeroizing::new(bytes.to_vec()))
}

/// Connects to the YubiKey with `serial`, or to the only one present. Reports a card held
/// exclusively by another program as `Unavailable` with the reason.
///
/// A card that another program is resetting at this very moment answers with a transient
/// PC/SC error (protocol mismatch, reset card): such a miss is retried twice, 150 ms apart.
fn connect(serial: Option<u32>) -> Result<YubiKey, SignerError> {
    let mut attempt = 0;
    loop {
        match connect_once(serial) {
            Err((_, true)) if attempt < 2 => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(150));
            }
            Err((err, _)) => return Err(err),
            Ok(yk) => return Ok(yk),
        }
    }
}

/// One pass over the readers; on failure also says whether a reader failed transiently.
fn connect_once(serial: Option<u32>) -> Result<YubiKey, (SignerError, bool)> {
    let mut transient = false;
    let result = connect_pass(serial, &mut transient);
    result.map_err(|e| (e, transient))
}

fn is_transient(e: &yubikey::Error) -> bool {
    matches!(
        e,
        yubikey::Error::PcscError {
            inner: Some(
                pcsc::Error::ProtoMismatch
                    | pcsc::Error::ResetCard
                    | pcsc::Error::NotTransacted
                    | pcsc::Error::UnpoweredCard
                    | pcsc::Error::UnresponsiveCard
                    | pcsc::Error::CommError
            )
        }
    )
}

fn connect_pass(serial: Option<u32>, transient: &mut bool) -> Result<YubiKey, SignerError> {
    let mut context = yubikey::reader::Context::open().map_err(|e| card_error("connect", e))?;
    let readers = context.iter().map_err(|e| card_error("connect", e))?;
    let mut found: Vec<YubiKey> = Vec::new();
    let mut others: Vec<u32> = Vec::new();
    let mut held: Vec<String> = Vec::new();
    for reader in readers {
        let name = reader.name().into_owned();
        match reader.open() {
            Ok(yk) => {
                let this = u32::from(yk.serial());
                if serial.is_none_or(|s| s == this) {
                    found.push(yk);
                } else {
                    others.push(this);
                    // Not ours: leave its state (PIN verified, applet) as it is.
                    let _ = yk.disconnect(pcsc::Disposition::LeaveCard);
                }
            }
            Err(yubikey::Error::PcscError {
                inner: Some(pcsc::Error::SharingViolation),
            }) => held.push(name),
            Err(e) if is_transient(&e) => *transient = true,
            // An empty reader, or a card without the PIV application: not a candidate.
            Err(_) => {}
        }
    }
    if found.len() > 1 {
        let serials: Vec<String> = found.iter().map(|y| y.serial().to_string()).collect();
        for yk in found {
            let _ = yk.disconnect(pcsc::Disposition::LeaveCard);
        }
        return Err(SignerError::Open(format!(
            "several YubiKeys are present (serials {}): set `serial` to choose one",
            serials.join(", ")
        )));
    }
    if let Some(yk) = found.pop() {
        return Ok(yk);
    }
    let wanted = serial.map_or("a YubiKey".to_string(), |s| format!("YubiKey {s}"));
    if !held.is_empty() {
        return Err(SignerError::Unavailable(format!(
            "{wanted} may be in reader {}, which another program holds exclusively: {}",
            held.join(", "),
            pcsc_reason(pcsc::Error::SharingViolation)
        )));
    }
    let seen = if others.is_empty() {
        String::new()
    } else {
        format!(
            " (present: {})",
            others
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Err(SignerError::Unavailable(format!(
        "{wanted} not found{seen}: is it plugged in, with its CCID interface enabled, and is \
         pcscd running?"
    )))
}

fn verify_pin(yk: &mut YubiKey, pin: &[u8]) -> Result<(), SignerError> {
    yk.verify_pin(pin)
        .map_err(|e| card_error("PIN verification", e))
}

/// The first PIN verification of a fresh connection: refused without sending the PIN when
/// the card has one try left (or none), since a wrong PIN would then block it, and a PIN
/// file that is wrong stays wrong however often the agent starts (systemd does not restart
/// it after exit 77, but socket activation, reboots and operators do). Asking for the count
/// spends no try, but re-selects the PIV applet, which drops any authentication: call it
/// right after connecting, before the management key. PKCS#11 tokens get the same guard
/// from CKF_USER_PIN_FINAL_TRY.
fn first_verify_pin(yk: &mut YubiKey, pin: &[u8]) -> Result<(), SignerError> {
    if let Ok(left @ 0..=1) = yk.get_pin_retries() {
        return Err(SignerError::PinUnusable(format!(
            "the card has {left} PIN try left: tm-agent will not spend it, since a wrong PIN \
             would block the card. Check the PIN it is given, then enter the right PIN once \
             yourself (yubico-piv-tool -a verify-pin), which resets the count, or unblock the \
             PIN with the PUK"
        )));
    }
    verify_pin(yk, pin)
}

fn spki_to_p256(spki: &SubjectPublicKeyInfoOwned) -> Option<VerifyingKey> {
    let der = spki.to_der().ok()?;
    VerifyingKey::from_public_key_der(&der).ok()
}

fn algorithm_name(alg: AlgorithmId) -> &'static str {
    match alg {
        AlgorithmId::EccP256 => "ECCP256",
        AlgorithmId::EccP384 => "ECCP384",
        AlgorithmId::Rsa1024 => "RSA1024",
        AlgorithmId::Rsa2048 => "RSA2048",
    }
}

/// What `slot` holds: metadata where the firmware has it (≥ 5.3), and the certificate.
/// No PIN needed. Errors only for transport problems.
fn read_slot(yk: &mut YubiKey, slot: SlotId) -> Result<SlotInfo, SignerError> {
    let mut info = SlotInfo {
        slot: slot_name(slot),
        algorithm: "unknown".into(),
        public_key: None,
        pin_policy: None,
        touch_policy: None,
        origin: None,
        certificate_subject: None,
    };
    match piv::metadata(yk, slot) {
        Ok(md) => {
            if let ManagementAlgorithmId::Asymmetric(alg) = md.algorithm {
                info.algorithm = algorithm_name(alg).into();
            }
            if let Some((pin, touch)) = md.policy {
                info.pin_policy = Some(pin.into());
                info.touch_policy = Some(touch.into());
            }
            info.origin = md.origin.map(|o| match o {
                piv::Origin::Generated => "generated",
                piv::Origin::Imported => "imported",
            });
            info.public_key = md.public.as_ref().and_then(spki_to_p256);
        }
        Err(e) if is_transport(&e) => return Err(card_error("read slot metadata", e)),
        // No key in the slot (6A82), or firmware before 5.3 (no GET METADATA).
        Err(_) => {}
    }
    match Certificate::read(yk, slot) {
        Ok(cert) => {
            info.certificate_subject = Some(cert.subject());
            let spki = cert.cert.tbs_certificate.subject_public_key_info.clone();
            if info.public_key.is_none() {
                info.public_key = spki_to_p256(&spki);
                if info.public_key.is_some() && info.algorithm == "unknown" {
                    info.algorithm = "ECCP256".into();
                }
            }
        }
        Err(e) if is_transport(&e) => return Err(card_error("read slot certificate", e)),
        Err(_) => {}
    }
    Ok(info)
}

/// The slot's P-256 public key, or why there is none.
fn slot_public_key(info: &SlotInfo, serial: u32) -> Result<VerifyingKey, SignerError> {
    match (&info.public_key, info.algorithm.as_str()) {
        (Some(key), _) => Ok(*key),
        (None, "unknown") if info.certificate_subject.is_none() => {
            Err(SignerError::KeyNotFound(format!(
            "YubiKey {serial} slot {} holds no key (or, on firmware before 5.3, no certificate to \
             read its public key from: `tm-agent key generate --backend piv` writes one)",
            info.slot
        )))
        }
        (None, alg) => Err(SignerError::NotP256(format!(
            "YubiKey {serial} slot {} holds a {alg} key; tm-agent needs ECCP256",
            info.slot
        ))),
    }
}

fn warn_about_policies(info: &SlotInfo, where_: &str) {
    match info.touch_policy {
        Some(TouchPolicy::Always) | Some(TouchPolicy::Cached) => tracing::warn!(
            key = %where_,
            touch_policy = %info.touch_policy.map(|t| t.to_string()).unwrap_or_default(),
            "TOUCH REQUIRED: every signature with this key waits for a touch of the YubiKey \
             (cached: one touch per 15 s). An unattended daemon cannot serve with it: generate \
             the key with --touch-policy never"
        ),
        None => tracing::warn!(
            key = %where_,
            "this YubiKey has no slot metadata (firmware before 5.3): PIN and touch policy are \
             unknown; if signatures time out, the key probably waits for a touch"
        ),
        _ => {}
    }
    if info.pin_policy == Some(PinPolicy::Always) {
        tracing::info!(
            key = %where_,
            "PIN policy always: tm-agent sends the PIN before every signature"
        );
    }
}

/// Opens the key for signing: connects, verifies the PIN (once; a wrong PIN is reported
/// with the tries left and never retried), reads the slot's public key and policies, and
/// returns one worker (one owner of the card) for [`Handle::spawn`](super::Handle::spawn).
pub fn open(settings: &PivSettings) -> Result<(KeyInfo, Vec<Box<dyn Signer>>), SignerError> {
    settings.validate()?;
    let slot = settings.slot_id()?;
    let pin = read_piv_pin(&settings.pin)?;
    let mut yk = connect(settings.serial)?;
    let serial = u32::from(yk.serial());
    first_verify_pin(&mut yk, &pin)?;
    let slot_info = read_slot(&mut yk, slot)?;
    let public_key = slot_public_key(&slot_info, serial)?;
    let location = format!(
        "YubiKey {serial} (firmware {}, reader {:?}) slot {}: {}",
        yk.version(),
        yk.name(),
        slot_info.slot,
        slot_info.policy_summary()
    );
    warn_about_policies(&slot_info, &location);
    tracing::info!(key = %location, "YubiKey PIV key opened");
    let worker = PivSigner {
        serial,
        slot,
        pin,
        pin_always: slot_info.pin_policy == Some(PinPolicy::Always),
        public_key,
        card: Some(yk),
        retry_at: None,
        backoff: BACKOFF_START,
        last_error: String::new(),
        refused: None,
    };
    let info = KeyInfo {
        backend: "piv",
        location,
        hardware_backed: true,
        public_key,
    };
    Ok((info, vec![Box::new(worker)]))
}

// ---------------------------------------------------------------------------------------
// The signer

/// A PIN answer that must not be retried automatically.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    WrongPin(Option<u32>),
    Locked,
}

/// The worker: owns the card connection (None while the card is away).
struct PivSigner {
    /// Pinned at open: a reconnect only accepts the same card.
    serial: u32,
    slot: SlotId,
    pin: Zeroizing<Vec<u8>>,
    pin_always: bool,
    /// The key found at open; a reconnect checks the slot still holds it.
    public_key: VerifyingKey,
    card: Option<YubiKey>,
    /// No reconnect attempt before this instant.
    retry_at: Option<Instant>,
    backoff: Duration,
    last_error: String,
    /// Set when the card refused the PIN after a reconnect: never retried.
    refused: Option<Refusal>,
}

impl Signer for PivSigner {
    fn sign_digest(&mut self, digest: &[u8; 32]) -> Result<Signature, SignerError> {
        if let Some(refusal) = self.refused {
            return Err(match refusal {
                Refusal::WrongPin(tries_left) => SignerError::WrongPin { tries_left },
                Refusal::Locked => SignerError::PinLocked,
            });
        }
        let fresh = self.card.is_none();
        self.ensure_connected()?;
        match self.try_sign(digest) {
            Ok(sig) => return Ok(sig),
            // Removed, reset by another program, pcscd restarted: reconnect once now.
            Err(e) if is_transport(&e) && !fresh => {
                tracing::warn!(serial = self.serial, error = %e, "YubiKey connection lost; reconnecting");
            }
            // The card forgot the PIN, or no longer knows the instruction: another program
            // selected another applet (gpg's scdaemon selects OpenPGP on a shared card) or
            // reset the security status. Reconnect (select PIV, verify the PIN) once.
            Err(e @ (yubikey::Error::AuthenticationError | yubikey::Error::GenericError))
                if !fresh =>
            {
                tracing::info!(
                    serial = self.serial,
                    error = %e,
                    "YubiKey refused the signature (another applet selected?); reconnecting"
                );
            }
            Err(e) => return Err(self.failed(e)),
        }
        self.release_card();
        self.retry_at = None;
        self.ensure_connected()?;
        self.try_sign(digest).map_err(|e| self.failed(e))
    }
}

impl PivSigner {
    fn try_sign(&mut self, digest: &[u8; 32]) -> Result<Signature, yubikey::Error> {
        let Some(yk) = self.card.as_mut() else {
            return Err(yubikey::Error::PcscError { inner: None });
        };
        if self.pin_always {
            yk.verify_pin(&self.pin)?;
        }
        let der = piv::sign_data(yk, digest, AlgorithmId::EccP256, self.slot)?;
        jose::der_to_signature(&der).map_err(|_| yubikey::Error::ParseError)
    }

    /// Lets go of the connection without resetting the card (other programs may share it).
    fn release_card(&mut self) {
        if let Some(yk) = self.card.take() {
            let _ = yk.disconnect(pcsc::Disposition::LeaveCard);
        }
    }

    /// Records a failed signature: transport errors drop the connection (reconnect on a
    /// later request, after the back-off); PIN refusals latch.
    fn failed(&mut self, e: yubikey::Error) -> SignerError {
        if is_transport(&e) {
            self.release_card();
            self.schedule_retry(&e.to_string());
        }
        let err = card_error("signing", e);
        self.latch(&err);
        err
    }

    fn latch(&mut self, err: &SignerError) {
        let refusal = match err {
            SignerError::WrongPin { tries_left } => Refusal::WrongPin(*tries_left),
            SignerError::PinLocked => Refusal::Locked,
            _ => return,
        };
        tracing::error!(
            serial = self.serial,
            error = %err,
            "the YubiKey refused the PIN; tm-agent will not try it again: fix the PIN source and restart"
        );
        self.refused = Some(refusal);
        self.release_card();
    }

    fn schedule_retry(&mut self, reason: &str) {
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.last_error = reason.to_string();
    }

    /// Reconnects when the card is away, unless the back-off says not yet.
    fn ensure_connected(&mut self) -> Result<(), SignerError> {
        if self.card.is_some() {
            return Ok(());
        }
        if let Some(at) = self.retry_at {
            let now = Instant::now();
            if now < at {
                return Err(SignerError::Unavailable(format!(
                    "YubiKey {} is not connected ({}); next attempt in {} ms",
                    self.serial,
                    self.last_error,
                    (at - now).as_millis()
                )));
            }
        }
        match self.reopen() {
            Ok(yk) => {
                tracing::info!(serial = self.serial, "YubiKey reconnected; PIN verified");
                self.card = Some(yk);
                self.retry_at = None;
                self.backoff = BACKOFF_START;
                Ok(())
            }
            Err(err) => {
                self.latch(&err);
                if self.refused.is_none() {
                    self.schedule_retry(&err.to_string());
                }
                Err(err)
            }
        }
    }

    fn reopen(&mut self) -> Result<YubiKey, SignerError> {
        let mut yk = connect(Some(self.serial))?;
        first_verify_pin(&mut yk, &self.pin)?;
        let info = read_slot(&mut yk, self.slot)?;
        if info.public_key != Some(self.public_key) {
            return Err(SignerError::Unavailable(format!(
                "YubiKey {} slot {} no longer holds the key tm-agent started with: check the \
                 card, then restart tm-agent",
                self.serial, info.slot
            )));
        }
        Ok(yk)
    }
}

// ---------------------------------------------------------------------------------------
// Key management (the CLI)

/// A card connection with the PIN verified and the management key authenticated.
struct Admin {
    yk: YubiKey,
    pin: Zeroizing<Vec<u8>>,
}

fn admin(settings: &PivSettings, mgm: &ManagementKey) -> Result<Admin, SignerError> {
    settings.validate()?;
    let pin = read_piv_pin(&settings.pin)?;
    let mut yk = connect(settings.serial)?;
    first_verify_pin(&mut yk, &pin)?;
    authenticate(&mut yk, mgm)?;
    Ok(Admin { yk, pin })
}

/// Parses a 3DES management key written as 48 hex digits (spaces and colons allowed).
pub fn parse_management_key(text: &str) -> Result<Zeroizing<Vec<u8>>, SignerError> {
    const KEY_LEN: usize = 24;
    // Both buffers are allocated once at their final size: growing one would leave partial
    // copies of the key in freed memory.
    let mut digits = Zeroizing::new(String::with_capacity(text.len()));
    digits.extend(text.chars().filter(|c| !c.is_whitespace() && *c != ':'));
    let not_hex =
        || SignerError::Open("the management key is not hex (expected 48 hex digits)".into());
    if digits.len() % 2 != 0 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(not_hex());
    }
    if digits.len() != 2 * KEY_LEN {
        return Err(SignerError::Open(format!(
            "the management key is {} bytes; a 3DES management key is 24 (48 hex digits). AES \
             management keys are not supported by this version of tm-agent",
            digits.len() / 2
        )));
    }
    let mut bytes = Zeroizing::new(vec![0u8; KEY_LEN]);
    hex::decode_to_slice(digits.as_bytes(), &mut bytes[..]).map_err(|_| not_hex())?;
    Ok(bytes)
}

fn management_key(yk: &mut YubiKey, mgm: &ManagementKey) -> Result<MgmKey, SignerError> {
    match mgm {
        ManagementKey::Hex(source) => {
            let text = read_pin(source, "PIV management key (48 hex digits)")?;
            let bytes = parse_management_key(text.expose_secret())?;
            MgmKey::from_bytes(&bytes[..]).map_err(|_| {
                SignerError::Open("the management key is a weak 3DES key: choose another".into())
            })
        }
        ManagementKey::PinProtected => MgmKey::get_protected(yk).map_err(|e| SignerError::Piv {
            op: "reading the PIN-protected management key",
            error: e.to_string(),
            hint: "is one stored? (`tm-agent key protect-management-key` or `ykman piv access \
                   change-management-key --protect` store one)",
        }),
        ManagementKey::FactoryDefault => {
            tracing::warn!(
                "USING THE FACTORY DEFAULT MANAGEMENT KEY: anyone holding this YubiKey can replace \
                 its keys. Set your own (`tm-agent key protect-management-key`, or ykman)"
            );
            Ok(MgmKey::default())
        }
    }
}

fn authenticate(yk: &mut YubiKey, mgm: &ManagementKey) -> Result<(), SignerError> {
    let key = management_key(yk, mgm)?;
    yk.authenticate(key).map_err(|e| match e {
        yubikey::Error::AuthenticationError => SignerError::Piv {
            op: "management key authentication",
            error: "the card refused the management key".into(),
            hint: MGM_HINT,
        },
        other => card_error("management key authentication", other),
    })
}

fn refuse_occupied(yk: &mut YubiKey, slot: SlotId, overwrite: bool) -> Result<(), SignerError> {
    let info = read_slot(yk, slot)?;
    if info.has_key() && !overwrite {
        return Err(SignerError::Open(format!(
            "slot {} of YubiKey {} already holds a key ({}): tm-agent will not destroy it (an \
             API key registered with it would stop working); choose another slot or pass \
             --force",
            info.slot,
            yk.serial(),
            info.certificate_subject
                .as_deref()
                .unwrap_or(info.algorithm.as_str())
        )));
    }
    Ok(())
}

/// The certificate subject, parsed before the card is touched: a bad one changes nothing.
fn parse_subject(subject: &str) -> Result<Name, SignerError> {
    Name::from_str(subject).map_err(|e| {
        SignerError::Open(format!(
            "certificate subject {subject:?} is not an RFC 4514 name (e.g. CN=tm-agent): {e}"
        ))
    })
}

/// Writes a self-signed certificate for the slot's new key, so that other tools (ykman,
/// yubico-piv-tool, OpenSC, browsers) see the key. Signs on the card. A failure says that
/// the key is in the slot without its certificate.
fn write_self_signed(
    admin: &mut Admin,
    slot: SlotId,
    public: SubjectPublicKeyInfoOwned,
    name: Name,
    touch: TouchPolicy,
) -> Result<(), SignerError> {
    let certify = || -> Result<(), SignerError> {
        let mut serial = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut serial);
        serial[0] &= 0x7f;
        let serial = SerialNumber::new(&serial)
            .map_err(|e| SignerError::Open(format!("certificate serial: {e}")))?;
        let validity = Validity::from_now(Duration::from_secs(20 * 365 * 24 * 3600))
            .map_err(|e| SignerError::Open(format!("certificate validity: {e}")))?;
        if matches!(touch, TouchPolicy::Always | TouchPolicy::Cached) {
            tracing::warn!("touch the YubiKey now: it signs the slot's certificate");
        }
        // PIN policy "always" wants the PIN right before the signature.
        verify_pin(&mut admin.yk, &admin.pin)?;
        Certificate::generate_self_signed::<_, p256::NistP256>(
            &mut admin.yk,
            slot,
            serial,
            validity,
            name,
            public,
            |_| Ok(()),
        )
        .map_err(|e| card_error("writing the slot certificate", e))?;
        Ok(())
    };
    certify().map_err(|e| {
        SignerError::Open(format!(
            "the new key is in slot {} but its certificate could not be written ({e}): other \
             tools will not see the key, and YubiKeys before firmware 5.3 read the slot's public \
             key from the certificate. Fix the cause, then run the command again with --force \
             (it replaces the key)",
            slot_name(slot)
        ))
    })
}

/// Generates a P-256 key in the settings' slot with the given policies, and writes a
/// self-signed certificate for it to the slot. Refuses to replace a key unless
/// `options.overwrite`.
pub fn generate(settings: &PivSettings, options: &WriteOptions) -> Result<SlotInfo, SignerError> {
    let slot = settings.slot_id()?;
    let subject = parse_subject(&options.subject)?;
    let mut admin = admin(settings, &options.management_key)?;
    refuse_occupied(&mut admin.yk, slot, options.overwrite)?;
    let public = piv::generate(
        &mut admin.yk,
        slot,
        AlgorithmId::EccP256,
        options.pin_policy.into(),
        options.touch_policy.into(),
    )
    .map_err(|e| card_error("key generation", e))?;
    tracing::info!(slot = %slot_name(slot), serial = %admin.yk.serial(), "generated a P-256 key on the YubiKey");
    write_self_signed(&mut admin, slot, public, subject, options.touch_policy)?;
    let info = read_slot(&mut admin.yk, slot)?;
    warn_about_policies(&info, &settings.location());
    Ok(info)
}

/// Imports the private key of the website's key bundle into the settings' slot, writes a
/// self-signed certificate, and checks with a probe signature that the slot signs for the
/// bundle's public key. Delete the bundle file afterwards: the card cannot export the key.
pub fn import(
    settings: &PivSettings,
    bundle: &jose::KeyBundle,
    options: &WriteOptions,
) -> Result<SlotInfo, SignerError> {
    let slot = settings.slot_id()?;
    let subject = parse_subject(&options.subject)?;
    let expected = bundle.verifying_key();
    let mut admin = admin(settings, &options.management_key)?;
    refuse_occupied(&mut admin.yk, slot, options.overwrite)?;
    let scalar = bundle.private_scalar();
    piv::import_ecc_key(
        &mut admin.yk,
        slot,
        AlgorithmId::EccP256,
        &scalar[..],
        options.touch_policy.into(),
        options.pin_policy.into(),
    )
    .map_err(|e| card_error("key import", e))?;
    drop(scalar);
    let der = expected
        .to_public_key_der()
        .map_err(|e| SignerError::Open(format!("public key encoding: {e}")))?;
    let public = SubjectPublicKeyInfoOwned::from_der(der.as_bytes())
        .map_err(|e| SignerError::Open(format!("public key encoding: {e}")))?;
    write_self_signed(&mut admin, slot, public, subject, options.touch_policy)?;
    // The probe: the slot must sign for the bundle's public key.
    verify_pin(&mut admin.yk, &admin.pin)?;
    let digest = jose::sha256(b"tm-agent import probe");
    let der = piv::sign_data(&mut admin.yk, &digest, AlgorithmId::EccP256, slot)
        .map_err(|e| card_error("probe signature", e))?;
    let sig = jose::der_to_signature(&der).map_err(|e| SignerError::SelfTest(e.to_string()))?;
    p256::ecdsa::signature::hazmat::PrehashVerifier::verify_prehash(&expected, &digest, &sig)
        .map_err(|_| {
            SignerError::SelfTest(
                "the imported key's probe signature does not verify with the bundle's public key"
                    .into(),
            )
        })?;
    tracing::info!(slot = %slot_name(slot), serial = %admin.yk.serial(), "imported the key bundle's private key into the YubiKey");
    let info = read_slot(&mut admin.yk, slot)?;
    warn_about_policies(&info, &settings.location());
    Ok(info)
}

/// The card and its key slots (metadata and certificates; no PIN needed).
pub fn list(settings: &PivSettings) -> Result<CardInfo, SignerError> {
    let mut yk = connect(settings.serial)?;
    let pin_tries_left = yk.get_pin_retries().ok();
    let mut slots = Vec::new();
    for slot in key_slots() {
        let info = read_slot(&mut yk, slot)?;
        if info.has_key() {
            slots.push(info);
        }
    }
    Ok(CardInfo {
        serial: u32::from(yk.serial()),
        version: yk.version().to_string(),
        reader: yk.name().to_string(),
        pin_tries_left,
        slots,
    })
}

/// PIN tries left on the card (no try is spent asking).
pub fn pin_tries_left(settings: &PivSettings) -> Result<u8, SignerError> {
    let mut yk = connect(settings.serial)?;
    yk.get_pin_retries()
        .map_err(|e| card_error("reading the PIN tries", e))
}

/// The settings' slot and its P-256 public key.
pub fn public(settings: &PivSettings) -> Result<(SlotInfo, VerifyingKey), SignerError> {
    let slot = settings.slot_id()?;
    let mut yk = connect(settings.serial)?;
    let info = read_slot(&mut yk, slot)?;
    let key = slot_public_key(&info, u32::from(yk.serial()))?;
    Ok((info, key))
}

/// The attestation of the settings' slot: proof from the card that the key was generated
/// on it (imported keys cannot be attested), with the PIN and touch policies it holds.
pub fn attest(settings: &PivSettings) -> Result<Attestation, SignerError> {
    let slot = settings.slot_id()?;
    let mut yk = connect(settings.serial)?;
    let certificate = piv::attest(&mut yk, slot).map_err(|e| match e {
        yubikey::Error::NotSupported => SignerError::Piv {
            op: "attestation",
            error: "not supported".into(),
            hint: "attestation needs firmware 4.3 or later",
        },
        yubikey::Error::GenericError => SignerError::Piv {
            op: "attestation",
            error: "the card refused".into(),
            hint: "only keys generated on the YubiKey can be attested; imported keys cannot",
        },
        other => card_error("attestation", other),
    })?;
    let intermediate = Certificate::read(&mut yk, SlotId::Attestation)
        .ok()
        .and_then(|c| c.cert.to_der().ok());
    Ok(Attestation {
        certificate: certificate.to_vec(),
        intermediate,
    })
}

/// Sets a random management key and stores it PIN-protected on the card (as ykman's
/// `--protect` does), so key management needs only the PIN from now on
/// ([`ManagementKey::PinProtected`]). `current` authenticates the change.
pub fn protect_management_key(
    settings: &PivSettings,
    current: &ManagementKey,
) -> Result<(), SignerError> {
    let mut admin = admin(settings, current)?;
    let new = MgmKey::generate();
    new.set_protected(&mut admin.yk)
        .map_err(|e| card_error("storing the PIN-protected management key", e))?;
    tracing::info!(serial = %admin.yk.serial(), "set a random management key, stored PIN-protected on the card");
    Ok(())
}

/// Sets the management key to `new` (48 hex digits from a PIN-like source); `current`
/// authenticates the change.
pub fn change_management_key(
    settings: &PivSettings,
    current: &ManagementKey,
    new: &PinSource,
) -> Result<(), SignerError> {
    let text = read_pin(new, "new PIV management key (48 hex digits)")?;
    let bytes = parse_management_key(text.expose_secret())?;
    let key = MgmKey::from_bytes(&bytes[..]).map_err(|_| {
        SignerError::Open("the new management key is a weak 3DES key: choose another".into())
    })?;
    let mut admin = admin(settings, current)?;
    key.set_manual(&mut admin.yk, false)
        .map_err(|e| card_error("setting the management key", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_filter_cap_holds_whatever_is_configured() {
        assert_eq!(capped_log_filter("info"), "info,yubikey=warn,pcsc=warn");
        assert_eq!(capped_log_filter(""), LOG_FILTER_CAP);
        assert_eq!(
            capped_log_filter("trace, yubikey=trace,yubikey::apdu=trace,pcsc=debug,tm_agent=debug"),
            "trace,tm_agent=debug,yubikey=warn,pcsc=warn"
        );
        // A span directive without a target would enable the crate's events inside it.
        assert_eq!(
            capped_log_filter("[sign]=trace,tm_agent[sign]=trace"),
            "tm_agent[sign]=trace,yubikey=warn,pcsc=warn"
        );
        // Crates whose names only start alike are not touched.
        assert_eq!(
            capped_log_filter("yubikeys=trace"),
            "yubikeys=trace,yubikey=warn,pcsc=warn"
        );
    }

    #[test]
    fn the_cap_holds_for_the_crates_and_their_modules_only() {
        for target in ["yubikey", "yubikey::apdu", "pcsc", "pcsc::x"] {
            assert!(is_capped_target(target), "{target}");
        }
        for target in ["yubikeys", "yubikey:", "pcscd", "tm_agent::signer::piv", ""] {
            assert!(!is_capped_target(target), "{target}");
        }
    }

    #[test]
    fn capped_filter_parses_and_silences_the_crate() {
        use tracing_subscriber::EnvFilter;
        let filter = capped_log_filter("trace,yubikey::apdu=trace");
        EnvFilter::try_new(&filter).unwrap();
    }

    #[test]
    fn slots_parse() {
        for (text, byte) in [
            ("9c", 0x9c),
            ("9A", 0x9a),
            ("0x9d", 0x9d),
            ("82", 0x82),
            ("95", 0x95),
        ] {
            assert_eq!(u8::from(parse_slot(text).unwrap()), byte);
        }
        for bad in ["9b", "f9", "80", "81", "96", "", "zz", "9c9c"] {
            assert!(parse_slot(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn settings_deserialize_strictly() {
        let s: PivSettings =
            toml::from_str("serial = 123\nslot = \"9a\"\npin = { file = \"/etc/pin\" }").unwrap();
        assert_eq!(s.serial, Some(123));
        assert_eq!(s.slot, "9a");
        assert_eq!(s.pin, PinSource::File("/etc/pin".into()));
        let d: PivSettings = toml::from_str("pin = { credential = \"piv-pin\" }").unwrap();
        assert_eq!(d.slot, "9c");
        assert_eq!(d.serial, None);
        assert!(toml::from_str::<PivSettings>("pin = { env = \"P\" }\nslots = \"9c\"").is_err());
        let bad = PivSettings {
            slot: "9b".into(),
            ..d
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn policies_parse_and_print() {
        for p in ["never", "once", "always", "default"] {
            assert_eq!(p.parse::<PinPolicy>().unwrap().to_string(), p);
        }
        for t in ["never", "always", "cached", "default"] {
            assert_eq!(t.parse::<TouchPolicy>().unwrap().to_string(), t);
        }
        assert!("sometimes".parse::<PinPolicy>().is_err());
        assert!("once".parse::<TouchPolicy>().is_err());
    }

    #[test]
    fn management_keys_parse() {
        let k = parse_management_key("010203040506070801020304050607080102030405060708\n").unwrap();
        assert_eq!(k.len(), 24);
        let k = parse_management_key(
            "01:02:03:04:05:06:07:08 01:02:03:04:05:06:07:08 01:02:03:04:05:06:07:08",
        )
        .unwrap();
        assert_eq!(k[..8], [1, 2, 3, 4, 5, 6, 7, 8]);
        let aes128 = parse_management_key("00112233445566778899aabbccddeeff").unwrap_err();
        assert!(aes128.to_string().contains("24"));
        assert!(parse_management_key("not hex").is_err());
    }

    #[test]
    fn pins_are_checked_before_the_card() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "12345\n").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let err = read_piv_pin(&PinSource::File(path.clone())).unwrap_err();
        assert!(err.to_string().contains("no try spent"), "{err}");
        assert!(err.to_string().contains("is shorter than"), "{err}");
        // A PIN problem: `run` and `check` exit 77, and the unit does not restart.
        assert_eq!(crate::cli::signer_exit_code(&err), crate::cli::EXIT_PIN);
        std::fs::write(&path, "123456789\n").unwrap();
        let err = read_piv_pin(&PinSource::File(path.clone())).unwrap_err();
        assert!(err.to_string().contains("is longer than"), "{err}");
        assert!(
            !err.to_string().contains("is 9"),
            "the length is not told: {err}"
        );
        std::fs::write(&path, "123456\n").unwrap();
        assert_eq!(
            &read_piv_pin(&PinSource::File(path)).unwrap()[..],
            b"123456"
        );
    }

    #[test]
    fn card_errors_say_what_to_do() {
        let e = card_error("x", yubikey::Error::WrongPin { tries: 2 });
        assert!(matches!(
            e,
            SignerError::WrongPin {
                tries_left: Some(2)
            }
        ));
        assert!(matches!(
            card_error("x", yubikey::Error::WrongPin { tries: 0 }),
            SignerError::PinLocked
        ));
        let e = card_error(
            "x",
            yubikey::Error::PcscError {
                inner: Some(pcsc::Error::SharingViolation),
            },
        );
        assert_eq!(e.wire_code().as_str(), "unavailable");
        assert!(e.to_string().contains("exclusively"), "{e}");
        let e = card_error(
            "x",
            yubikey::Error::PcscError {
                inner: Some(pcsc::Error::NoService),
            },
        );
        assert!(e.to_string().contains("pcscd"), "{e}");
    }

    #[test]
    fn pem_lines_are_64_wide() {
        let pem = der_to_pem("CERTIFICATE", &[0u8; 100]);
        let lines: Vec<&str> = pem.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines.last().copied(), Some("-----END CERTIFICATE-----"));
    }
}
