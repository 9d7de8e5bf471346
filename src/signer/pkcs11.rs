//! The `pkcs11` backend: an ECDSA P-256 key that lives in a PKCS#11 token, used through
//! `cryptoki`. This is the only file of the crate that imports `cryptoki`.
//!
//! Owns:
//! - the process-wide registry of loaded PKCS#11 modules: one `C_Initialize` per module path
//!   per process, a module is never unloaded, and a re-initialization (`C_Finalize` +
//!   `C_Initialize`) bumps a generation counter that invalidates every session and object
//!   handle opened before it;
//! - the signing workers ([`open`]): log in once, then one session per worker; SHA-256 is
//!   computed on the host and signed with `CKM_ECDSA` (SoftHSM 2.6 has no `CKM_ECDSA_SHA256`);
//! - recovery: a worker whose session, login, key handle or token is lost reopens what is
//!   needed (re-finding the token by label, logging in again, re-initializing the module if
//!   the token cannot be found) and retries once; after that it backs off exponentially,
//!   refusing fast with `Unavailable` until the back-off has passed. Re-initializing kills
//!   the sessions of every key on the module, so it happens only after the token was looked
//!   for and not found, and at most once per [`REINIT_INTERVAL_MIN`] per module;
//! - PIN faults, per token and module, shared by every key and key-management call: a PIN
//!   the token refused (wrong, locked, expired, user PIN not initialized) is never tried
//!   again in this process: every later login on that token fails with the fault, without
//!   `C_Login`. No login is attempted when the token reports `CKF_USER_PIN_FINAL_TRY` (or
//!   locked). The check and the `C_Login` happen under the module's login lock, so keys
//!   opened or recovering in parallel send at most one wrong PIN per token;
//! - the key management functions behind `tm-agent key`: [`generate`], [`import`], [`list`],
//!   [`public`].
//!
//! Threading: each [`Pkcs11Signer`] is owned by one actor thread and owns its `Session`
//! (`Send`, not `Sync`). Workers of one key share a `KeyShared` whose recovery mutex
//! serializes reconnects and back-off bookkeeping. Signing holds the module's `state` read
//! lock, so workers sign in parallel; the write lock is taken to open sessions (start-up,
//! reconnects, key management), to log in, and to re-initialize, so `C_Finalize` never runs
//! under another thread's call and a session number the module hands out again is taken
//! away from its previous (dead) holder before that holder can use it: two threads never
//! share a session. Lock order: key recovery mutex, then module state lock, then module
//! login mutex; the module's `pin_faults` and a key's `token` and `pin` mutexes are taken
//! last and briefly. No lock is held across a wait for another key's lock. Everything here
//! blocks: never call it on the async runtime.
//!
//! What SoftHSM 2.6 does when its token directory disappears (measured, see
//! `tests/pkcs11.rs`): `C_SignInit` answers `CKR_OBJECT_HANDLE_INVALID`, `C_GetTokenInfo`
//! answers `CKR_GENERAL_ERROR`, the token is no longer listed, and it stays that way after
//! the directory comes back until the module is finalized and initialized again. A logout
//! from another session also surfaces as `CKR_OBJECT_HANDLE_INVALID` (private objects turn
//! invisible). Hence the recovery ladder below: re-find the key, then re-initialize.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{
    Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::{Slot, TokenInfo};
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use secrecy::SecretString;
use serde::Deserialize;
use zeroize::Zeroize as _;

use super::pin::{self, PinSource};
use super::{KeyInfo, Signer, SignerError};
use crate::jose::{self, KeyBundle};

/// DER of the named curve OID 1.2.840.10045.3.1.7 (P-256): the only accepted `CKA_EC_PARAMS`.
pub const P256_EC_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Sessions (and actor threads) per key when the configuration does not say.
pub const DEFAULT_SESSIONS: usize = 1;

/// Upper bound on `sessions`: more parallelism than this only exhausts token sessions.
pub const MAX_SESSIONS: usize = 64;

/// Length of a random `CKA_ID` given to generated keys.
pub const GENERATED_ID_LEN: usize = 16;

/// First back-off delay after a failed recovery; doubles per failure up to [`BACKOFF_MAX`].
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(250);

/// Longest back-off between two recovery attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Shortest time between two (re-)initializations of one module: a re-initialization
/// closes the sessions of every key on the module, healthy ones included.
pub const REINIT_INTERVAL_MIN: Duration = BACKOFF_MAX;

/// Message signed to check a freshly generated or imported key.
const PROBE_MESSAGE: &[u8] = b"tm-agent pkcs11 key check";

/// Every `C_Login` this process made through this module (attempted, whatever the outcome).
static LOGIN_ATTEMPTS: AtomicU64 = AtomicU64::new(0);

/// How many times this process has called `C_Login` through this backend. Exposed so that
/// tests (and status output) can show that a wrong PIN is tried exactly once.
pub fn login_attempts() -> u64 {
    LOGIN_ATTEMPTS.load(Ordering::Relaxed)
}

/// Where the key is: module, token and key selectors, and the PIN source.
///
/// Embedded by the configuration as `[keys.<name>]` with `backend = "pkcs11"`. `key_id` is
/// hex in the config (`"a1b2…"`, colons allowed). The token is found by `token_label` and/or
/// `token_serial` (never by slot number: slots move); with neither, the module must hold
/// exactly one initialized token. The key is found by `key_label` and/or `key_id`; with
/// neither, the token must hold exactly one private key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Settings {
    /// Path of the PKCS#11 module, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    #[serde(default)]
    pub token_label: Option<String>,
    #[serde(default)]
    pub token_serial: Option<String>,
    #[serde(default)]
    pub key_label: Option<String>,
    /// `CKA_ID` of the key.
    #[serde(default, deserialize_with = "deserialize_hex_id")]
    pub key_id: Option<Vec<u8>>,
    /// Where the user PIN comes from; never the PIN itself.
    pub pin: PinSource,
    /// Worker sessions (one actor thread each), 1 to [`MAX_SESSIONS`].
    #[serde(default = "default_sessions")]
    pub sessions: usize,
}

fn default_sessions() -> usize {
    DEFAULT_SESSIONS
}

fn deserialize_hex_id<'de, D>(deserializer: D) -> Result<Option<Vec<u8>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let text: Option<String> = Option::deserialize(deserializer)?;
    text.map(|t| parse_hex_id(&t).map_err(serde::de::Error::custom))
        .transpose()
}

/// Parses a `CKA_ID` written as hex: `a1b2c3`, `A1:B2:C3` or `0xa1b2c3`.
pub fn parse_hex_id(text: &str) -> Result<Vec<u8>, String> {
    let trimmed = text.trim();
    let digits = trimmed
        .strip_prefix("0x")
        .unwrap_or(trimmed)
        .replace(':', "");
    if digits.is_empty() {
        return Err("key id (CKA_ID) is empty".into());
    }
    hex::decode(&digits).map_err(|_| format!("key id (CKA_ID) {trimmed:?} is not hex"))
}

impl Pkcs11Settings {
    /// Settings for `module` with `pin`, no selectors and one session.
    pub fn new(module: impl Into<PathBuf>, pin: PinSource) -> Self {
        Pkcs11Settings {
            module: module.into(),
            token_label: None,
            token_serial: None,
            key_label: None,
            key_id: None,
            pin,
            sessions: DEFAULT_SESSIONS,
        }
    }

    /// Checks what can be checked without loading the module.
    pub fn validate(&self) -> Result<(), SignerError> {
        let mut problems = Vec::new();
        if !(1..=MAX_SESSIONS).contains(&self.sessions) {
            problems.push(format!(
                "sessions = {} (must be 1 to {MAX_SESSIONS})",
                self.sessions
            ));
        }
        for (name, value) in [
            ("token_label", &self.token_label),
            ("token_serial", &self.token_serial),
            ("key_label", &self.key_label),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                problems.push(format!("{name} is empty (leave it out instead)"));
            }
        }
        if self.key_id.as_ref().is_some_and(|id| id.is_empty()) {
            problems.push("key_id is empty (leave it out instead)".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SignerError::Open(format!(
                "invalid pkcs11 settings: {}",
                problems.join("; ")
            )))
        }
    }

    /// Human-readable location, no secrets: `token "t" key "k"` plus the module.
    pub fn location(&self) -> String {
        format!(
            "{} {} (module {})",
            self.token_description(),
            self.key_description(),
            self.module.display()
        )
    }

    fn token_description(&self) -> String {
        match (&self.token_label, &self.token_serial) {
            (Some(l), Some(s)) => format!("token {l:?} (serial {s})"),
            (Some(l), None) => format!("token {l:?}"),
            (None, Some(s)) => format!("token with serial {s}"),
            (None, None) => "the only token".into(),
        }
    }

    fn key_description(&self) -> String {
        match (&self.key_label, &self.key_id) {
            (Some(l), Some(id)) => format!("key {l:?} (id {})", hex::encode(id)),
            (Some(l), None) => format!("key {l:?}"),
            (None, Some(id)) => format!("key with id {}", hex::encode(id)),
            (None, None) => "the only private key".into(),
        }
    }

    fn pin_prompt(&self) -> String {
        format!("User PIN for {}", self.token_description())
    }
}

// ---------------------------------------------------------------------------------------
// Errors inside this module

/// Which recovery a failure calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The session handle is dead: open a new session (never close the old handle: it may
    /// already name someone else's new session).
    SessionGone,
    /// The session is alive but busy with another operation (`CKR_OPERATION_ACTIVE`): close
    /// it if it is still ours, and open a new one.
    SessionBusy,
    /// The session lives but the login is gone: log in again.
    NotLoggedIn,
    /// The key handle is gone: find the key again; if it is not there, treat as `TokenGone`.
    KeyGone,
    /// The token or the module is in trouble: re-initialize the module, find the token again.
    TokenGone,
    /// Reopening cannot help.
    Fatal,
}

impl Fault {
    fn of(rv: RvError) -> Fault {
        match rv {
            RvError::SessionHandleInvalid | RvError::SessionClosed => Fault::SessionGone,
            // A leftover operation in our session, or (after a mass session loss) a stale
            // handle naming a sibling's fresh session: either way, move to a new session.
            // `Conn::usable` tells the two apart when the old one is discarded: ours is
            // closed, a sibling's is left alone.
            RvError::OperationActive => Fault::SessionBusy,
            RvError::UserNotLoggedIn => Fault::NotLoggedIn,
            RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid => Fault::KeyGone,
            RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::DeviceError
            | RvError::GeneralError
            | RvError::TokenNotRecognized
            | RvError::SlotIdInvalid
            | RvError::CryptokiNotInitialized => Fault::TokenGone,
            _ => Fault::Fatal,
        }
    }
}

/// A failure before it becomes a [`SignerError`].
enum Trouble {
    /// A PKCS#11 call failed.
    Ck(CkError),
    /// The token or the key is not there (now). At start-up this is a configuration error;
    /// during recovery it means "re-initialize and look again".
    Absent(SignerError),
    /// Anything else, final.
    Other(SignerError),
}

impl From<CkError> for Trouble {
    fn from(e: CkError) -> Self {
        Trouble::Ck(e)
    }
}

impl From<SignerError> for Trouble {
    fn from(e: SignerError) -> Self {
        Trouble::Other(e)
    }
}

impl From<pin::PinError> for Trouble {
    fn from(e: pin::PinError) -> Self {
        Trouble::Other(SignerError::Pin(e))
    }
}

impl Trouble {
    fn fault(&self) -> Fault {
        match self {
            Trouble::Ck(CkError::Pkcs11(rv, _)) => Fault::of(*rv),
            Trouble::Ck(_) | Trouble::Other(_) => Fault::Fatal,
            Trouble::Absent(_) => Fault::TokenGone,
        }
    }

    fn into_error(self) -> SignerError {
        match self {
            Trouble::Ck(e) => ck_error(e),
            Trouble::Absent(e) | Trouble::Other(e) => e,
        }
    }
}

/// Maps a cryptoki error to a [`SignerError`] naming the function and the return value.
fn ck_error(e: CkError) -> SignerError {
    match e {
        CkError::Pkcs11(RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange, _) => {
            SignerError::WrongPin { tries_left: None }
        }
        CkError::Pkcs11(RvError::PinLocked, _) => SignerError::PinLocked,
        CkError::Pkcs11(rv, func) => SignerError::Pkcs11 {
            func: func_name(func),
            rv: rv_name(rv),
            hint: rv_hint(rv),
        },
        CkError::LibraryLoading(e) => SignerError::Open(format!(
            "cannot load the PKCS#11 module: {e} (check the `module` path and that the HSM's \
             client library is installed)"
        )),
        other => SignerError::Pkcs11 {
            func: "cryptoki",
            rv: other.to_string(),
            hint: "",
        },
    }
}

fn func_name(f: Function) -> &'static str {
    match f {
        Function::Initialize => "C_Initialize",
        Function::Finalize => "C_Finalize",
        Function::GetInfo => "C_GetInfo",
        Function::GetFunctionList => "C_GetFunctionList",
        Function::GetInterface => "C_GetInterface",
        Function::GetSlotList => "C_GetSlotList",
        Function::GetSlotInfo => "C_GetSlotInfo",
        Function::GetTokenInfo => "C_GetTokenInfo",
        Function::GetMechanismList => "C_GetMechanismList",
        Function::GetMechanismInfo => "C_GetMechanismInfo",
        Function::OpenSession => "C_OpenSession",
        Function::CloseSession => "C_CloseSession",
        Function::CloseAllSessions => "C_CloseAllSessions",
        Function::GetSessionInfo => "C_GetSessionInfo",
        Function::Login => "C_Login",
        Function::Logout => "C_Logout",
        Function::CreateObject => "C_CreateObject",
        Function::DestroyObject => "C_DestroyObject",
        Function::GetAttributeValue => "C_GetAttributeValue",
        Function::SetAttributeValue => "C_SetAttributeValue",
        Function::FindObjectsInit => "C_FindObjectsInit",
        Function::FindObjects => "C_FindObjects",
        Function::FindObjectsFinal => "C_FindObjectsFinal",
        Function::SignInit => "C_SignInit",
        Function::Sign => "C_Sign",
        Function::GenerateKeyPair => "C_GenerateKeyPair",
        Function::GenerateRandom => "C_GenerateRandom",
        _ => "a PKCS#11 function",
    }
}

/// `CKR_…` name of a return value (cryptoki's `Display` is the spec's prose).
fn rv_name(rv: RvError) -> String {
    match rv {
        RvError::VendorDefined(code) => format!("CKR_VENDOR_DEFINED ({code:#x})"),
        RvError::UnknownErrorCode(code) => format!("unknown CK_RV {code:#x}"),
        other => {
            let camel = format!("{other:?}");
            let mut name = String::from("CKR");
            for c in camel.chars() {
                if c.is_ascii_uppercase() {
                    name.push('_');
                }
                name.push(c.to_ascii_uppercase());
            }
            name
        }
    }
}

fn rv_hint(rv: RvError) -> &'static str {
    match rv {
        RvError::SessionHandleInvalid | RvError::SessionClosed => {
            "the session was closed under tm-agent; it reopens sessions by itself"
        }
        RvError::UserNotLoggedIn => "the token logged tm-agent out; it logs in again by itself",
        RvError::DeviceRemoved | RvError::TokenNotPresent => {
            "the token is not present: reconnect the HSM or token; tm-agent retries with back-off"
        }
        RvError::DeviceError | RvError::GeneralError | RvError::FunctionFailed => {
            "the HSM reported an internal error: check its health and logs; tm-agent retries \
             with back-off"
        }
        RvError::TokenNotRecognized => "the module does not recognise the token: check the HSM",
        RvError::CryptokiNotInitialized => {
            "the module was finalized under tm-agent; it re-initializes it by itself"
        }
        RvError::MechanismInvalid => {
            "the token does not offer CKM_ECDSA (raw ECDSA over a host-computed SHA-256), \
             which tm-agent needs"
        }
        RvError::KeyFunctionNotPermitted => {
            "the key does not allow signing (CKA_SIGN=false): create it with `tm-agent key \
             generate` or `tm-agent key import`"
        }
        RvError::KeyTypeInconsistent => "the key is not an EC key",
        RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid => {
            "the key object vanished: check that the token is present and the key was not deleted"
        }
        RvError::SessionCount => {
            "the token has no free sessions: lower `sessions` or close other applications"
        }
        RvError::UserPinNotInitialized => {
            "the token's user PIN is not set: initialize it (softhsm2-util --init-token … --pin, \
             or pkcs11-tool --init-pin)"
        }
        RvError::PinExpired => "the user PIN has expired: change it with the token's tools",
        RvError::UserAnotherAlreadyLoggedIn => {
            "another user (the SO?) is logged in to this token in this process"
        }
        RvError::TokenWriteProtected => "the token is write-protected",
        RvError::DeviceMemory => "the token is out of memory: delete unused objects",
        RvError::TemplateIncomplete
        | RvError::TemplateInconsistent
        | RvError::AttributeValueInvalid
        | RvError::AttributeTypeInvalid => {
            "the token refused the key template: it may not support this way of creating EC keys"
        }
        RvError::CurveNotSupported | RvError::DomainParamsInvalid => {
            "the token does not support the P-256 curve"
        }
        _ => "",
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Short critical sections over plain data: a panic elsewhere leaves usable state.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read_lock<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_lock<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------
// Modules: one initialized context per library per process

/// A loaded PKCS#11 library, shared by every key (and key-management call) that uses it.
struct Module {
    path: PathBuf,
    ctx: Pkcs11,
    state: RwLock<ModuleState>,
    /// Serializes "am I logged in? if not, C_Login" so that one process never sends two
    /// logins for one token at once (a wrong PIN would be tried twice).
    login: Mutex<()>,
    /// PIN faults by token ([`token_key`]): a token that refused a PIN gets no other
    /// `C_Login` from this process. Read and written under `login`.
    pin_faults: Mutex<HashMap<String, PinFault>>,
}

struct ModuleState {
    /// Bumped by every `C_Finalize`: sessions and object handles of older generations are dead.
    generation: u64,
    initialized: bool,
    /// Session handle number -> the "dead" flag of the connection that got it last.
    /// PKCS#11 lets a module hand a number out again once the session it named has died
    /// (SoftHSM 2.6 happens to count up and never does; others may). When a new session
    /// gets a number, its previous holder is marked dead before it can use the number
    /// again, so two workers never share a session after sessions were closed under us
    /// (modules are not required to survive two threads in one session).
    handles: HashMap<u64, Arc<AtomicBool>>,
    /// When the module was last initialized (first load or re-initialization): the next
    /// re-initialization waits until [`REINIT_INTERVAL_MIN`] after it.
    last_init: Instant,
}

impl ModuleState {
    /// Opens a session. Takes `&mut self`, i.e. the module's write lock, so that no call
    /// runs on a stale handle while its number changes hands.
    fn open_session(
        &mut self,
        ctx: &Pkcs11,
        slot: Slot,
        read_write: bool,
        close_on_drop: bool,
    ) -> Result<(Session, Arc<AtomicBool>), CkError> {
        let session = match (read_write, close_on_drop) {
            (false, false) => ctx.open_ro_session_no_drop(slot)?,
            (true, false) => ctx.open_rw_session_no_drop(slot)?,
            (false, true) => ctx.open_ro_session(slot)?,
            (true, true) => ctx.open_rw_session(slot)?,
        };
        let dead = Arc::new(AtomicBool::new(false));
        // CK_SESSION_HANDLE is a C unsigned long: u64 here, u32 on some targets.
        #[allow(clippy::useless_conversion)]
        let number = u64::from(session.handle());
        if let Some(previous) = self.handles.insert(number, Arc::clone(&dead)) {
            if !previous.swap(true, Ordering::AcqRel) && Arc::strong_count(&previous) > 1 {
                tracing::debug!(
                    handle = number,
                    "session number handed out again: its previous holder is retired"
                );
            }
        }
        Ok((session, dead))
    }
}

impl Module {
    /// The module at `path`, loaded and initialized on first use. Modules stay loaded for
    /// the life of the process: unloading one that another part of the process may have
    /// initialized is unsafe, and `C_Initialize` twice fails.
    fn get(path: &Path) -> Result<Arc<Module>, SignerError> {
        static REGISTRY: OnceLock<Mutex<HashMap<PathBuf, Arc<Module>>>> = OnceLock::new();
        let canonical = std::fs::canonicalize(path).map_err(|e| {
            SignerError::Open(format!(
                "PKCS#11 module {}: {e} (check the path; SoftHSM's is \
                 /usr/lib/softhsm/libsofthsm2.so)",
                path.display()
            ))
        })?;
        let mut registry = lock(REGISTRY.get_or_init(Default::default));
        if let Some(module) = registry.get(&canonical) {
            return Ok(Arc::clone(module));
        }
        let ctx = Pkcs11::new(&canonical).map_err(|e| {
            SignerError::Open(format!(
                "cannot load PKCS#11 module {}: {e}",
                canonical.display()
            ))
        })?;
        initialize(&ctx, &canonical)?;
        let module = Arc::new(Module {
            path: canonical.clone(),
            ctx,
            state: RwLock::new(ModuleState {
                generation: 0,
                initialized: true,
                handles: HashMap::new(),
                last_init: Instant::now(),
            }),
            login: Mutex::new(()),
            pin_faults: Mutex::new(HashMap::new()),
        });
        registry.insert(canonical, Arc::clone(&module));
        Ok(module)
    }

    /// The write guard on the initialized module, initializing it again if an earlier
    /// re-initialization failed half-way. Held while sessions are opened (see
    /// [`ModuleState::handles`]): briefly stops all signing on the module.
    fn write(&self) -> Result<RwLockWriteGuard<'_, ModuleState>, SignerError> {
        let mut state = write_lock(&self.state);
        if !state.initialized {
            initialize(&self.ctx, &self.path)?;
            state.initialized = true;
            state.last_init = Instant::now();
        }
        Ok(state)
    }

    fn generation(&self) -> u64 {
        read_lock(&self.state).generation
    }

    /// `C_Finalize` + `C_Initialize`, unless someone already did it since `seen_generation`,
    /// or the module was (re-)initialized less than [`REINIT_INTERVAL_MIN`] ago: every
    /// session of every key on the module dies with it. `finalized`: the module answered
    /// `CKR_CRYPTOKI_NOT_INITIALIZED`, so there are no sessions left to spare and the
    /// interval does not apply. Waits for every in-flight call (they hold the read lock).
    fn reinit(&self, seen_generation: u64, finalized: bool) -> Result<Reinit, SignerError> {
        let mut state = write_lock(&self.state);
        if state.initialized && state.generation != seen_generation {
            return Ok(Reinit::Done);
        }
        if state.initialized {
            let since = state.last_init.elapsed();
            if since < REINIT_INTERVAL_MIN && !finalized {
                return Ok(Reinit::Throttled(REINIT_INTERVAL_MIN - since));
            }
            if let Err(e) = self.ctx.clone().finalize() {
                tracing::warn!(module = %self.path.display(), error = %e, "C_Finalize failed");
            }
            state.initialized = false;
            state.generation += 1;
            // Every session died; the generation check retires their connections.
            state.handles.clear();
        }
        tracing::warn!(
            module = %self.path.display(),
            generation = state.generation,
            "re-initializing the PKCS#11 module (C_Finalize + C_Initialize) to find the token again"
        );
        state.last_init = Instant::now();
        initialize(&self.ctx, &self.path)?;
        state.initialized = true;
        Ok(Reinit::Done)
    }
}

/// What [`Module::reinit`] did.
enum Reinit {
    /// The module is initialized on a newer generation than the caller saw.
    Done,
    /// Too soon after the last (re-)initialization: nothing done; allowed after this long.
    Throttled(Duration),
}

fn initialize(ctx: &Pkcs11, path: &Path) -> Result<(), SignerError> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => Ok(()),
        Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
            // Another user of the same library in this process initialized it: the library
            // state is process-wide, so it is ready for us too.
            tracing::debug!(module = %path.display(), "PKCS#11 module already initialized in this process");
            Ok(())
        }
        Err(e) => Err(ck_error(e)),
    }
}

/// Finds the slot of the token selected by `settings` (label and/or serial).
fn find_token(ctx: &Pkcs11, settings: &Pkcs11Settings) -> Result<Slot, Trouble> {
    let mut present = Vec::new();
    let mut matching = Vec::new();
    for slot in ctx.get_slots_with_token()? {
        let info = match ctx.get_token_info(slot) {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(slot = slot.id(), error = %e, "skipping a slot whose token does not answer");
                continue;
            }
        };
        if !info.token_initialized() {
            continue;
        }
        let label = info.label().trim();
        let serial = info.serial_number().trim();
        present.push(format!("{label:?} (serial {serial})"));
        if settings.token_label.as_deref().is_none_or(|l| l == label)
            && settings.token_serial.as_deref().is_none_or(|s| s == serial)
        {
            matching.push(slot);
        }
    }
    match matching.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(Trouble::Absent(SignerError::Unavailable(format!(
            "{} is not present in PKCS#11 module {} (tokens present: {}): check that the HSM \
             is connected and that this user may use it (SoftHSM lists only the tokens whose \
             files this user can read: a token set up as root is invisible to tm-agent until \
             its directory belongs to tm-agent's user)",
            settings.token_description(),
            settings.module.display(),
            if present.is_empty() {
                "none".to_string()
            } else {
                present.join(", ")
            }
        )))),
        many => Err(Trouble::Other(SignerError::Open(format!(
            "{} tokens match {} ({}): pick one by token_serial in the config, --token-serial on \
             the command line",
            many.len(),
            settings.token_description(),
            present.join(", ")
        )))),
    }
}

/// The name under which a token's PIN faults are remembered: its serial number, or its
/// label when it has no serial.
fn token_key(info: &TokenInfo) -> String {
    let serial = info.serial_number().trim();
    if serial.is_empty() {
        format!("label {:?}", info.label().trim())
    } else {
        format!("serial {serial}")
    }
}

/// Logs the user in on `session` unless this process already is (login state is per token
/// per process), after noting the session's token ([`token_key`]) in `token_of_key`.
///
/// Under the module's login lock: a token with a PIN fault gets no `C_Login` (the fault is
/// returned); a PIN the token refuses (wrong, locked, expired, not initialized) becomes the
/// token's PIN fault. So every key and key-management call of the process together send at
/// most one refused PIN per token. A wrong PIN is reported with the token's tries hint.
fn ensure_login(
    module: &Module,
    session: &Session,
    pin: &Mutex<Option<SecretString>>,
    token_of_key: &Mutex<Option<String>>,
    settings: &Pkcs11Settings,
) -> Result<(), Trouble> {
    let _serial = lock(&module.login);
    let info = session.get_session_info()?;
    let token = module.ctx.get_token_info(info.slot_id())?;
    let key = token_key(&token);
    *lock(token_of_key) = Some(key.clone());
    if matches!(
        info.session_state(),
        SessionState::RoUser | SessionState::RwUser
    ) || !token.login_required()
    {
        return Ok(());
    }
    if let Some(fault) = lock(&module.pin_faults).get(&key) {
        return Err(Trouble::Other(fault.error()));
    }
    let refuse = |fault: PinFault| {
        // The PIN is of no more use: forget it.
        *lock(pin) = None;
        let error = fault.error();
        lock(&module.pin_faults).insert(key.clone(), fault);
        Trouble::Other(error)
    };
    if token.user_pin_locked() {
        return Err(refuse(PinFault::Locked));
    }
    if token.user_pin_final_try() {
        // Not remembered: no PIN was refused, and once a person resets the counter the
        // next attempt may log in.
        return Err(Trouble::Other(SignerError::PinUnusable(format!(
            "{} reports that one PIN try is left: tm-agent will not risk locking it; check the \
             PIN by hand (e.g. pkcs11-tool --login --test), which resets the counter, then retry",
            settings.token_description()
        ))));
    }
    let outcome = {
        let mut cached = lock(pin);
        if cached.is_none() {
            *cached = Some(pin::read_pin(&settings.pin, &settings.pin_prompt())?);
        }
        let pin = cached
            .as_ref()
            .ok_or_else(|| SignerError::Open("the PIN could not be read".into()))?;
        LOGIN_ATTEMPTS.fetch_add(1, Ordering::Relaxed);
        session.login(UserType::User, Some(pin))
    };
    match outcome {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(CkError::Pkcs11(
            RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange,
            _,
        )) => {
            let after = module.ctx.get_token_info(info.slot_id()).ok();
            if after.as_ref().is_some_and(|t| t.user_pin_locked()) {
                return Err(refuse(PinFault::Locked));
            }
            let tries_left = after
                .as_ref()
                .and_then(|t| t.user_pin_final_try().then_some(1));
            if after.as_ref().is_some_and(|t| t.user_pin_count_low()) {
                tracing::warn!(
                    token = %settings.token_description(),
                    "the token reports a low PIN retry count (CKF_USER_PIN_COUNT_LOW): fix the \
                     PIN source before anything tries again"
                );
            }
            Err(refuse(PinFault::Wrong(tries_left)))
        }
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(refuse(PinFault::Locked)),
        Err(CkError::Pkcs11(rv @ (RvError::PinExpired | RvError::UserPinNotInitialized), _)) => {
            Err(refuse(PinFault::Unusable(format!(
                "{}: C_Login answered {}: {}; tm-agent will not try it again before a restart",
                settings.token_description(),
                rv_name(rv),
                rv_hint(rv)
            ))))
        }
        Err(e) => Err(e.into()),
    }
}

/// The one private key selected by `settings` in the session's token.
fn find_private_key(session: &Session, settings: &Pkcs11Settings) -> Result<ObjectHandle, Trouble> {
    let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
    if let Some(label) = &settings.key_label {
        template.push(Attribute::Label(label.as_bytes().to_vec()));
    }
    if let Some(id) = &settings.key_id {
        template.push(Attribute::Id(id.clone()));
    }
    let found = session.find_objects(&template)?;
    match found.as_slice() {
        [key] => Ok(*key),
        [] => Err(Trouble::Absent(SignerError::KeyNotFound(format!(
            "no private {} in {} (list them with `tm-agent key list`)",
            settings.key_description(),
            settings.token_description()
        )))),
        many => {
            let which = if settings.key_label.is_none() && settings.key_id.is_none() {
                format!(
                    "{} holds {} private keys",
                    settings.token_description(),
                    many.len()
                )
            } else {
                format!(
                    "{} private keys match {} in {}",
                    many.len(),
                    settings.key_description(),
                    settings.token_description()
                )
            };
            Err(Trouble::Other(SignerError::KeyNotFound(format!(
                "{which}: pick one by key_label or key_id (its CKA_ID, in hex) in the config, \
                 --key-label or --cka-id on the command line (`tm-agent key list` shows them)"
            ))))
        }
    }
}

/// Attributes of a key object as read from the token.
#[derive(Default)]
struct KeyAttrs {
    label: Option<Vec<u8>>,
    id: Option<Vec<u8>>,
    key_type: Option<KeyType>,
    ec_params: Option<Vec<u8>>,
    ec_point: Option<Vec<u8>>,
    sign: Option<bool>,
    sensitive: Option<bool>,
    extractable: Option<bool>,
    always_sensitive: Option<bool>,
    never_extractable: Option<bool>,
    local: Option<bool>,
}

fn read_attrs(
    session: &Session,
    object: ObjectHandle,
    types: &[AttributeType],
) -> Result<KeyAttrs, Trouble> {
    let mut attrs = KeyAttrs::default();
    for attr in session.get_attributes(object, types)? {
        match attr {
            Attribute::Label(v) => attrs.label = Some(v),
            Attribute::Id(v) => attrs.id = Some(v),
            Attribute::KeyType(v) => attrs.key_type = Some(v),
            Attribute::EcParams(v) => attrs.ec_params = Some(v),
            Attribute::EcPoint(v) => attrs.ec_point = Some(v),
            Attribute::Sign(v) => attrs.sign = Some(v),
            Attribute::Sensitive(v) => attrs.sensitive = Some(v),
            Attribute::Extractable(v) => attrs.extractable = Some(v),
            Attribute::AlwaysSensitive(v) => attrs.always_sensitive = Some(v),
            Attribute::NeverExtractable(v) => attrs.never_extractable = Some(v),
            Attribute::Local(v) => attrs.local = Some(v),
            _ => {}
        }
    }
    Ok(attrs)
}

fn check_p256(attrs: &KeyAttrs, what: &str) -> Result<(), SignerError> {
    match attrs.key_type {
        Some(kt) if kt == KeyType::EC => {}
        Some(kt) => {
            return Err(SignerError::NotP256(format!(
                "{what} is a {kt} key, tm-agent needs EC P-256"
            )))
        }
        None => {
            return Err(SignerError::NotP256(format!(
                "{what} has no readable CKA_KEY_TYPE"
            )))
        }
    }
    match &attrs.ec_params {
        Some(params) if params.as_slice() == P256_EC_PARAMS => Ok(()),
        Some(params) => Err(SignerError::NotP256(format!(
            "{what} has CKA_EC_PARAMS {}, not the P-256 OID 1.2.840.10045.3.1.7",
            hex::encode(params)
        ))),
        None => Err(SignerError::NotP256(format!(
            "{what} has no readable CKA_EC_PARAMS"
        ))),
    }
}

/// Checks that `key` is a P-256 signing key and returns the public key of its public key
/// object (same `CKA_ID`, or same label when the ID is empty).
fn key_public(session: &Session, key: ObjectHandle) -> Result<VerifyingKey, Trouble> {
    let attrs = read_attrs(
        session,
        key,
        &[
            AttributeType::KeyType,
            AttributeType::EcParams,
            AttributeType::Sign,
            AttributeType::Id,
            AttributeType::Label,
        ],
    )?;
    check_p256(&attrs, "the private key")?;
    if attrs.sign == Some(false) {
        return Err(Trouble::Other(SignerError::Open(
            "the private key has CKA_SIGN=false: it cannot sign".into(),
        )));
    }
    let mut template = vec![Attribute::Class(ObjectClass::PUBLIC_KEY)];
    let by = match (&attrs.id, &attrs.label) {
        (Some(id), _) if !id.is_empty() => {
            template.push(Attribute::Id(id.clone()));
            format!("id {}", hex::encode(id))
        }
        (_, Some(label)) if !label.is_empty() => {
            template.push(Attribute::Label(label.clone()));
            format!("label {:?}", String::from_utf8_lossy(label))
        }
        _ => {
            return Err(Trouble::Other(SignerError::KeyNotFound(
                "the private key has neither CKA_ID nor CKA_LABEL, so its public key object \
                 cannot be found"
                    .into(),
            )))
        }
    };
    let mut keys = Vec::new();
    for object in session.find_objects(&template)? {
        let pub_attrs = read_attrs(
            session,
            object,
            &[
                AttributeType::KeyType,
                AttributeType::EcParams,
                AttributeType::EcPoint,
            ],
        )?;
        check_p256(&pub_attrs, "the public key object")?;
        let point = pub_attrs.ec_point.ok_or_else(|| {
            SignerError::NotP256("the public key object has no readable CKA_EC_POINT".into())
        })?;
        let key = decode_ec_point(&point)?;
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    match keys.as_slice() {
        [key] => Ok(*key),
        [] => Err(Trouble::Other(SignerError::KeyNotFound(format!(
            "no public key object with {by} next to the private key: tm-agent needs it to report \
             and check the public key (re-import the key with `tm-agent key import`)"
        )))),
        _ => Err(Trouble::Other(SignerError::KeyNotFound(format!(
            "several different public key objects have {by}: give each key its own CKA_ID"
        )))),
    }
}

/// Decodes `CKA_EC_POINT`: a DER OCTET STRING around a SEC1 point (what the standard
/// says), or the bare SEC1 point (what some modules return).
pub fn decode_ec_point(bytes: &[u8]) -> Result<VerifyingKey, SignerError> {
    // The two forms cannot both parse: a DER body of a 65-byte point is 67 bytes long, and
    // a bare 65/33-byte point read as DER has a body of the wrong length.
    if let Some(body) = der_octet_string(bytes) {
        if let Ok(key) = VerifyingKey::from_sec1_bytes(body) {
            return Ok(key);
        }
    }
    VerifyingKey::from_sec1_bytes(bytes).map_err(|_| {
        SignerError::NotP256(format!(
            "CKA_EC_POINT ({} bytes) is not a P-256 point, bare or DER-wrapped",
            bytes.len()
        ))
    })
}

fn der_octet_string(bytes: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = bytes.split_first()?;
    if tag != 0x04 {
        return None;
    }
    let (&len, rest) = rest.split_first()?;
    let (len, body) = match len {
        0..=0x7f => (usize::from(len), rest),
        0x81 => {
            let (&len, rest) = rest.split_first()?;
            (usize::from(len), rest)
        }
        _ => return None,
    };
    (body.len() == len).then_some(body)
}

/// `CKA_EC_POINT` as the standard wants it: DER OCTET STRING of the uncompressed point.
pub fn encode_ec_point(key: &VerifyingKey) -> Vec<u8> {
    let point = jose::public_key_uncompressed(key);
    let mut der = Vec::with_capacity(point.len() + 2);
    der.push(0x04);
    // 65 bytes: short-form length.
    der.push(point.len() as u8);
    der.extend_from_slice(&point);
    der
}

/// The `CKA_ID` given to an imported key when none is asked for: the first 16 bytes of the
/// SHA-256 of its uncompressed public point, so importing the same key twice is refused.
pub fn default_import_id(key: &VerifyingKey) -> Vec<u8> {
    jose::sha256(&jose::public_key_uncompressed(key))[..GENERATED_ID_LEN].to_vec()
}

fn parse_signature(raw: &[u8]) -> Result<Signature, SignerError> {
    if raw.len() == jose::RAW_SIGNATURE_LEN {
        if let Ok(sig) = jose::signature_from_raw(raw) {
            return Ok(sig);
        }
    }
    // Some modules answer CKM_ECDSA in DER; accept it rather than fail.
    jose::der_to_signature(raw).map_err(|_| SignerError::Pkcs11 {
        func: "C_Sign",
        rv: format!("CKR_OK with an unusable {}-byte signature", raw.len()),
        hint: "CKM_ECDSA on P-256 must return 64 bytes r || s",
    })
}

// ---------------------------------------------------------------------------------------
// Signing workers

/// What all workers of one key share.
struct KeyShared {
    module: Arc<Module>,
    settings: Pkcs11Settings,
    location: String,
    /// Set by the first connection; every reconnection must find the same key.
    public_key: OnceLock<VerifyingKey>,
    /// The PIN, read once from its source, kept for logging in again after a recovery.
    pin: Mutex<Option<SecretString>>,
    /// The [`token_key`] of the key's token, noted at every login check: where to look for
    /// the token's PIN fault.
    token: Mutex<Option<String>>,
    recovery: Mutex<Recovery>,
}

#[derive(Default)]
struct Recovery {
    /// Failed recoveries in a row; 0 when healthy.
    failures: u32,
    last_attempt: Option<Instant>,
    last_error: String,
}

/// Why a token gets no more `C_Login` from this process.
#[derive(Debug, Clone)]
enum PinFault {
    /// `CKR_PIN_INCORRECT` (or invalid, or the wrong length), with the token's tries hint.
    Wrong(Option<u32>),
    Locked,
    /// `CKR_PIN_EXPIRED`, `CKR_USER_PIN_NOT_INITIALIZED`: the message says what to do.
    Unusable(String),
}

impl PinFault {
    fn error(&self) -> SignerError {
        match self {
            PinFault::Wrong(tries_left) => SignerError::WrongPin {
                tries_left: *tries_left,
            },
            PinFault::Locked => SignerError::PinLocked,
            PinFault::Unusable(reason) => SignerError::PinUnusable(reason.clone()),
        }
    }
}

/// Delay before the next recovery attempt after `failures` failed ones in a row.
fn backoff_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    BACKOFF_INITIAL
        .saturating_mul(1u32 << doublings)
        .min(BACKOFF_MAX)
}

impl Recovery {
    fn wait(&self, now: Instant) -> Option<Duration> {
        if self.failures == 0 {
            return None;
        }
        let ready = self.last_attempt? + backoff_delay(self.failures);
        (now < ready).then(|| ready - now)
    }
}

/// A worker's session on the token with the key's handle in it.
struct Conn {
    session: Session,
    key: ObjectHandle,
    generation: u64,
    /// Set when the module handed this session's number to a new session: this one is dead.
    dead: Arc<AtomicBool>,
}

impl Conn {
    fn usable(&self, state: &ModuleState) -> bool {
        state.initialized
            && state.generation == self.generation
            && !self.dead.load(Ordering::Acquire)
    }
}

enum Attempt {
    /// The module was re-initialized, or handed this session's number to a new session,
    /// since this session was opened.
    Stale,
    Failed(Trouble),
}

impl KeyShared {
    /// Opens a session (or revives `reuse`), logs in if needed, finds and checks the key.
    /// Runs under the module's write lock: reconnections are rare, and this way no other
    /// call runs while session numbers change hands.
    fn connect(&self, reuse: Option<Conn>) -> Result<Conn, Trouble> {
        let mut state = self.module.write()?;
        let (session, dead) = match reuse {
            Some(conn) if conn.usable(&state) => (conn.session, conn.dead),
            _ => {
                let slot = find_token(&self.module.ctx, &self.settings)?;
                // Closed explicitly (see `discard`), never by drop: a dead handle's number
                // may already name another session.
                state.open_session(&self.module.ctx, slot, false, false)?
            }
        };
        match self.connect_in(&session) {
            Ok(key) => Ok(Conn {
                session,
                key,
                generation: state.generation,
                dead,
            }),
            Err(trouble) => {
                if matches!(
                    trouble.fault(),
                    Fault::Fatal | Fault::NotLoggedIn | Fault::KeyGone | Fault::SessionBusy
                ) || matches!(trouble, Trouble::Absent(_))
                {
                    // The session itself is alive and ours: close it.
                    let _ = session.close();
                }
                Err(trouble)
            }
        }
    }

    fn connect_in(&self, session: &Session) -> Result<ObjectHandle, Trouble> {
        ensure_login(
            &self.module,
            session,
            &self.pin,
            &self.token,
            &self.settings,
        )?;
        let key = find_private_key(session, &self.settings)?;
        let public = key_public(session, key)?;
        if self.public_key.get().is_none() {
            // First connection, i.e. at open: say so if the key is not protected.
            warn_if_unprotected(session, key, &self.location);
        }
        let expected = self.public_key.get_or_init(|| public);
        if *expected != public {
            return Err(Trouble::Other(SignerError::SelfTest(format!(
                "{} now holds a different key than the one tm-agent started with: restart \
                 tm-agent if the key was replaced on purpose",
                self.location
            ))));
        }
        Ok(key)
    }

    fn sign_with(&self, conn: &Conn, digest: &[u8; 32]) -> Result<Signature, Attempt> {
        let state = read_lock(&self.module.state);
        if !conn.usable(&state) {
            return Err(Attempt::Stale);
        }
        let raw = conn
            .session
            .sign(&Mechanism::Ecdsa, conn.key, digest)
            .map_err(|e| Attempt::Failed(e.into()))?;
        drop(state);
        parse_signature(&raw).map_err(|e| Attempt::Failed(Trouble::Other(e)))
    }

    /// Reconnects after `fault`, climbing a ladder: reuse the old session when it should be
    /// alive (login or key handle lost), else a fresh session; a fresh session again if the
    /// one tried died meanwhile (sessions closed under us while we reconnect); re-initialize
    /// the module when the token (or the key) cannot be found or the module is in trouble,
    /// at most once, and not within [`REINIT_INTERVAL_MIN`] of the module's last
    /// (re-)initialization: every other key on the module would lose its sessions too.
    fn reconnect(&self, old: Option<Conn>, fault: Fault) -> Result<Conn, SignerError> {
        let mut reuse = match fault {
            Fault::NotLoggedIn | Fault::KeyGone => old,
            _ => {
                if let Some(conn) = old {
                    self.discard(conn, fault);
                }
                None
            }
        };
        let mut reinitialized = false;
        let mut fresh_sessions_lost = 0;
        loop {
            let generation = self.module.generation();
            let reusing = reuse.is_some();
            let trouble = match self.connect(reuse.take()) {
                Ok(conn) => return Ok(conn),
                Err(trouble) => trouble,
            };
            match trouble.fault() {
                // The session we hoped to keep is dead too: take a fresh one.
                Fault::SessionGone | Fault::SessionBusy | Fault::NotLoggedIn if reusing => {}
                Fault::SessionGone | Fault::SessionBusy | Fault::NotLoggedIn
                    if fresh_sessions_lost < 1 =>
                {
                    fresh_sessions_lost += 1;
                }
                Fault::TokenGone | Fault::KeyGone if !reinitialized => {
                    let finalized = matches!(
                        trouble,
                        Trouble::Ck(CkError::Pkcs11(RvError::CryptokiNotInitialized, _))
                    );
                    match self.module.reinit(generation, finalized)? {
                        Reinit::Done => {
                            tracing::debug!(key = %self.location, error = %trouble_text(&trouble), "reconnect failed; the module was re-initialized");
                            reinitialized = true;
                        }
                        Reinit::Throttled(wait) => {
                            let error = trouble.into_error();
                            return Err(SignerError::Unavailable(format!(
                                "{}; the PKCS#11 module is re-initialized to look for the \
                                 token and key again in {} s at the earliest",
                                self.describe(&error),
                                wait.as_secs().max(1)
                            )));
                        }
                    }
                }
                _ => return Err(trouble.into_error()),
            }
        }
    }

    /// Closes a session that may still be alive and is still ours; any other is forgotten,
    /// because its handle number may already belong to another session. After a device or
    /// general error (`TokenGone`) the token may well still be there, holding the session:
    /// it is closed too, or each transient error would leak one until the HSM refused to
    /// open more (CKR_SESSION_COUNT).
    fn discard(&self, conn: Conn, fault: Fault) {
        if matches!(fault, Fault::SessionGone) {
            return;
        }
        let state = read_lock(&self.module.state);
        if conn.usable(&state) {
            let _ = conn.session.close();
        }
    }

    /// The PIN fault of the key's token, if it has one.
    fn pin_fault(&self) -> Option<PinFault> {
        let token = lock(&self.token).clone()?;
        lock(&self.module.pin_faults).get(&token).cloned()
    }

    /// Counts a failure and returns the error to report, with the time of the next attempt.
    fn record_failure(&self, error: &SignerError) -> SignerError {
        let mut rec = lock(&self.recovery);
        rec.failures = rec.failures.saturating_add(1);
        rec.last_attempt = Some(Instant::now());
        rec.last_error = self.describe(error);
        SignerError::Unavailable(format!(
            "{}; next attempt in {} ms",
            rec.last_error,
            backoff_delay(rec.failures).as_millis()
        ))
    }

    /// An error as the reason of an `Unavailable`: says which key, without repeating the
    /// "signer unavailable" prefix.
    fn describe(&self, error: &SignerError) -> String {
        match error {
            SignerError::Unavailable(reason) => reason.clone(),
            other => format!("{}: {other}", self.location),
        }
    }
}

fn trouble_text(t: &Trouble) -> String {
    match t {
        Trouble::Ck(e) => e.to_string(),
        Trouble::Absent(e) | Trouble::Other(e) => e.to_string(),
    }
}

/// One signing worker: one session on the token. Owned by one actor thread.
pub struct Pkcs11Signer {
    shared: Arc<KeyShared>,
    conn: Option<Conn>,
    /// What the next reconnection must repair when `conn` is `None`.
    pending: Fault,
    /// The session was reconnected: its next signature is checked against the public key
    /// the agent started with before it is handed out (the self-test's guarantee, kept
    /// across a token that was re-provisioned under the same labels).
    verify_next: bool,
    index: usize,
}

impl std::fmt::Debug for Pkcs11Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Signer")
            .field("location", &self.shared.location)
            .field("worker", &self.index)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl Pkcs11Signer {
    /// Reconnects, unless a PIN fault forbids it or the back-off has not passed.
    fn recover(&mut self, fault: Fault) -> Result<(), SignerError> {
        let shared = Arc::clone(&self.shared);
        let mut rec = lock(&shared.recovery);
        let old = self.conn.take();
        if let Some(pin_fault) = shared.pin_fault() {
            if let Some(conn) = old {
                shared.discard(conn, fault);
            }
            return Err(pin_fault.error());
        }
        if let Some(wait) = rec.wait(Instant::now()) {
            if let Some(conn) = old {
                shared.discard(conn, fault);
            }
            self.pending = fault;
            return Err(SignerError::Unavailable(format!(
                "{}; next attempt in {} ms",
                rec.last_error,
                wait.as_millis()
            )));
        }
        rec.last_attempt = Some(Instant::now());
        match shared.reconnect(old, fault) {
            Ok(conn) => {
                if rec.failures > 0 {
                    tracing::info!(key = %shared.location, worker = self.index, "PKCS#11 key available again");
                }
                rec.failures = 0;
                rec.last_error.clear();
                self.conn = Some(conn);
                self.pending = Fault::SessionGone;
                self.verify_next = true;
                Ok(())
            }
            Err(error) => {
                rec.failures = rec.failures.saturating_add(1);
                rec.last_error = shared.describe(&error);
                // Next time start from the top of the ladder.
                self.pending = Fault::TokenGone;
                let wait = backoff_delay(rec.failures);
                tracing::warn!(
                    key = %shared.location,
                    worker = self.index,
                    failures = rec.failures,
                    error = %error,
                    "PKCS#11 recovery failed; next attempt in {} ms",
                    wait.as_millis()
                );
                Err(match error {
                    e @ (SignerError::WrongPin { .. }
                    | SignerError::PinLocked
                    | SignerError::PinUnusable(_)
                    | SignerError::Pin(_)
                    | SignerError::NotP256(_)
                    | SignerError::SelfTest(_)) => e,
                    _ => SignerError::Unavailable(format!(
                        "{}; next attempt in {} ms",
                        rec.last_error,
                        wait.as_millis()
                    )),
                })
            }
        }
    }

    /// The first signature of a reconnected session must verify with the public key the
    /// agent started with; if not, the token now pairs that public key object with another
    /// private key, and nothing it signs may leave.
    fn check_after_reconnect(
        &mut self,
        digest: &[u8; 32],
        sig: &Signature,
    ) -> Result<(), SignerError> {
        use p256::ecdsa::signature::hazmat::PrehashVerifier as _;
        let verifies = self
            .shared
            .public_key
            .get()
            .is_some_and(|key| key.verify_prehash(digest, sig).is_ok());
        if verifies {
            return Ok(());
        }
        if let Some(conn) = self.conn.take() {
            self.shared.discard(conn, Fault::Fatal);
        }
        self.pending = Fault::TokenGone;
        Err(SignerError::SelfTest(format!(
            "{}: after reconnecting, a signature does not verify with the public key tm-agent \
             started with (was the private key replaced?): restart tm-agent if the key was \
             replaced on purpose",
            self.shared.location
        )))
    }
}

impl Signer for Pkcs11Signer {
    fn sign_digest(&mut self, digest: &[u8; 32]) -> Result<Signature, SignerError> {
        let mut retried = false;
        let mut stale_rounds = 0;
        loop {
            if self.conn.is_none() {
                self.recover(self.pending)?;
            }
            let Some(conn) = self.conn.as_ref() else {
                return Err(SignerError::Unavailable(format!(
                    "{}: no session",
                    self.shared.location
                )));
            };
            match self.shared.sign_with(conn, digest) {
                Ok(sig) if self.verify_next => {
                    self.check_after_reconnect(digest, &sig)?;
                    self.verify_next = false;
                    return Ok(sig);
                }
                Ok(sig) => return Ok(sig),
                Err(Attempt::Stale) => {
                    // The module was re-initialized, or gave this session's number to a new
                    // session: this one is dead. Forget it (never close: the number is someone
                    // else's now) and reconnect, without spending the retry.
                    self.conn = None;
                    self.pending = Fault::SessionGone;
                    stale_rounds += 1;
                    if stale_rounds > 3 {
                        return Err(SignerError::Unavailable(format!(
                            "{}: the PKCS#11 module keeps being re-initialized",
                            self.shared.location
                        )));
                    }
                }
                Err(Attempt::Failed(trouble)) => {
                    let fault = trouble.fault();
                    if fault == Fault::Fatal {
                        return Err(trouble.into_error());
                    }
                    let error = trouble.into_error();
                    if retried {
                        if let Some(conn) = self.conn.take() {
                            self.shared.discard(conn, fault);
                        }
                        self.pending = Fault::TokenGone;
                        return Err(self.shared.record_failure(&error));
                    }
                    retried = true;
                    tracing::warn!(key = %self.shared.location, worker = self.index, error = %error, "PKCS#11 signing failed; reopening and retrying once");
                    self.recover(fault)?;
                }
            }
        }
    }
}

impl Drop for Pkcs11Signer {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.shared.discard(conn, Fault::Fatal);
        }
    }
}

/// Opens the key for signing: loads the module (once per process), finds the token by
/// label/serial, logs in once, and opens `workers` sessions (`0` means
/// `settings.sessions`), each becoming one [`Signer`] for [`super::Handle::spawn`], which
/// runs the self-test. Checks that the key is P-256 and reads its public key.
pub fn open(
    settings: &Pkcs11Settings,
    workers: usize,
) -> Result<(KeyInfo, Vec<Box<dyn Signer>>), SignerError> {
    settings.validate()?;
    let count = if workers == 0 {
        settings.sessions
    } else {
        workers
    };
    let module = Module::get(&settings.module)?;
    let shared = Arc::new(KeyShared {
        module,
        settings: settings.clone(),
        location: settings.location(),
        public_key: OnceLock::new(),
        pin: Mutex::new(None),
        token: Mutex::new(None),
        recovery: Mutex::new(Recovery::default()),
    });
    let mut signers: Vec<Box<dyn Signer>> = Vec::with_capacity(count);
    for index in 0..count {
        let conn = shared.connect(None).map_err(Trouble::into_error)?;
        signers.push(Box::new(Pkcs11Signer {
            shared: Arc::clone(&shared),
            conn: Some(conn),
            pending: Fault::SessionGone,
            // Handle::spawn's self-test checks the first signature of each.
            verify_next: false,
            index,
        }));
    }
    let public_key = *shared
        .public_key
        .get()
        .ok_or_else(|| SignerError::Open("no session could be opened".into()))?;
    tracing::info!(key = %shared.location, sessions = count, "PKCS#11 key opened");
    let info = KeyInfo {
        backend: "pkcs11",
        location: shared.location.clone(),
        hardware_backed: true,
        public_key,
    };
    Ok((info, signers))
}

// ---------------------------------------------------------------------------------------
// Key management (used by `tm-agent key`)

/// A key (pair) in a token, as `list` reports it. The flags are `None` when the token did
/// not say (e.g. a public key alone has no `CKA_SENSITIVE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    pub label: String,
    /// `CKA_ID`.
    pub id: Vec<u8>,
    /// `EC P-256`, `EC (not P-256)`, `RSA`, …
    pub key_type: String,
    pub has_private_key: bool,
    pub public_key: Option<VerifyingKey>,
    pub sensitive: Option<bool>,
    pub extractable: Option<bool>,
    pub always_sensitive: Option<bool>,
    pub never_extractable: Option<bool>,
    /// Generated inside the token.
    pub local: Option<bool>,
    pub can_sign: Option<bool>,
}

impl KeyEntry {
    /// `CKA_ID` as lowercase hex.
    pub fn id_hex(&self) -> String {
        hex::encode(&self.id)
    }
}

/// A session for a key-management call, on the module's current generation.
struct Admin<'a> {
    module: &'a Module,
    settings: &'a Pkcs11Settings,
    session: Session,
    pin: Mutex<Option<SecretString>>,
    token: Mutex<Option<String>>,
}

impl Admin<'_> {
    /// Logs in unless logged in; shares the module's PIN faults with the signing keys.
    fn login(&self) -> Result<(), Trouble> {
        ensure_login(
            self.module,
            &self.session,
            &self.pin,
            &self.token,
            self.settings,
        )
    }
}

fn with_admin<T>(
    settings: &Pkcs11Settings,
    read_write: bool,
    f: impl FnOnce(&Admin<'_>) -> Result<T, Trouble>,
) -> Result<T, SignerError> {
    let module = Module::get(&settings.module)?;
    // Held for the whole call (key management is rare): the session opens and closes
    // under it, so its number never coexists with a stale holder in use.
    let mut state = module.write()?;
    let slot = find_token(&module.ctx, settings).map_err(Trouble::into_error)?;
    let (session, _dead) = state
        .open_session(&module.ctx, slot, read_write, true)
        .map_err(ck_error)?;
    let admin = Admin {
        module: &module,
        settings,
        session,
        pin: Mutex::new(None),
        token: Mutex::new(None),
    };
    f(&admin).map_err(Trouble::into_error)
}

/// Refuses to create a key when any object already has `label` or `id`.
fn refuse_existing(admin: &Admin<'_>, label: &str, id: &[u8]) -> Result<(), Trouble> {
    let token = admin.settings.token_description();
    let by_label = admin
        .session
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])?;
    if !by_label.is_empty() {
        return Err(Trouble::Other(SignerError::KeyExists(format!(
            "{token} already has {} object(s) labelled {label:?}; tm-agent never overwrites a key: \
             choose another label, or delete the old objects yourself (pkcs11-tool \
             --delete-object) if you are sure they are not needed",
            by_label.len()
        ))));
    }
    let by_id = admin.session.find_objects(&[Attribute::Id(id.to_vec())])?;
    if !by_id.is_empty() {
        return Err(Trouble::Other(SignerError::KeyExists(format!(
            "{token} already has {} object(s) with id {}: choose another id (or, on import, \
             the key may already be in the token: see `tm-agent key list`)",
            by_id.len(),
            hex::encode(id)
        ))));
    }
    Ok(())
}

/// Signs a probe with `key` and verifies it with `public`.
fn probe(session: &Session, key: ObjectHandle, public: &VerifyingKey) -> Result<(), Trouble> {
    let raw = session.sign(&Mechanism::Ecdsa, key, &jose::sha256(PROBE_MESSAGE))?;
    let sig = parse_signature(&raw)?;
    public.verify(PROBE_MESSAGE, &sig).map_err(|_| {
        Trouble::Other(SignerError::SelfTest(
            "a probe signature by the new key does not verify with its public key".into(),
        ))
    })
}

fn entry(
    session: &Session,
    private: Option<ObjectHandle>,
    public: Option<ObjectHandle>,
) -> Result<KeyEntry, Trouble> {
    let read = |object: Option<ObjectHandle>, types: &[AttributeType]| match object {
        Some(object) => read_attrs(session, object, types),
        None => Ok(KeyAttrs::default()),
    };
    let priv_attrs = read(
        private,
        &[
            AttributeType::Label,
            AttributeType::Id,
            AttributeType::KeyType,
            AttributeType::EcParams,
            AttributeType::Sign,
            AttributeType::Sensitive,
            AttributeType::Extractable,
            AttributeType::AlwaysSensitive,
            AttributeType::NeverExtractable,
            AttributeType::Local,
        ],
    )?;
    let pub_attrs = read(
        public,
        &[
            AttributeType::Label,
            AttributeType::Id,
            AttributeType::KeyType,
            AttributeType::EcParams,
            AttributeType::EcPoint,
        ],
    )?;
    let main = if private.is_some() {
        &priv_attrs
    } else {
        &pub_attrs
    };
    let key_type = match main.key_type {
        Some(kt) if kt == KeyType::EC => {
            if check_p256(main, "key").is_ok() {
                "EC P-256".to_string()
            } else {
                "EC (not P-256)".to_string()
            }
        }
        Some(kt) => kt.to_string().trim_start_matches("CKK_").to_string(),
        None => "unknown".to_string(),
    };
    let public_key = pub_attrs
        .ec_point
        .as_deref()
        .and_then(|p| decode_ec_point(p).ok());
    Ok(KeyEntry {
        label: String::from_utf8_lossy(main.label.as_deref().unwrap_or_default()).into_owned(),
        id: main.id.clone().unwrap_or_default(),
        key_type,
        has_private_key: private.is_some(),
        public_key,
        sensitive: priv_attrs.sensitive,
        extractable: priv_attrs.extractable,
        always_sensitive: priv_attrs.always_sensitive,
        never_extractable: priv_attrs.never_extractable,
        local: priv_attrs.local,
        can_sign: priv_attrs.sign,
    })
}

fn public_template(label: &str, id: &[u8]) -> Vec<Attribute> {
    vec![
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Derive(false),
        Attribute::EcParams(P256_EC_PARAMS.to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
    ]
}

fn private_template(label: &str, id: &[u8]) -> Vec<Attribute> {
    vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
    ]
}

/// What is wrong with how the token protects a private key, from its flags: it must be
/// sensitive and not extractable; `require_never_extractable` (keys born in the token) also
/// wants `CKA_NEVER_EXTRACTABLE`. Empty when all is well. A flag the token did not report
/// counts as wrong.
fn protection_problems(
    sensitive: Option<bool>,
    extractable: Option<bool>,
    never_extractable: Option<bool>,
    require_never_extractable: bool,
) -> Vec<String> {
    fn text(flag: Option<bool>) -> &'static str {
        match flag {
            Some(true) => "true",
            Some(false) => "false",
            None => "not reported",
        }
    }
    let mut problems = Vec::new();
    if sensitive != Some(true) {
        problems.push(format!("CKA_SENSITIVE is {}", text(sensitive)));
    }
    if extractable != Some(false) {
        problems.push(format!("CKA_EXTRACTABLE is {}", text(extractable)));
    }
    if require_never_extractable && never_extractable != Some(true) {
        problems.push(format!(
            "CKA_NEVER_EXTRACTABLE is {}",
            text(never_extractable)
        ));
    }
    problems
}

/// The entry of a key pair just created, read back from the token, if the token protects
/// the private key as it was asked to (see [`protection_problems`]).
fn checked_entry(
    session: &Session,
    private: ObjectHandle,
    public: ObjectHandle,
    generated: bool,
) -> Result<KeyEntry, Trouble> {
    let entry = entry(session, Some(private), Some(public))?;
    let problems = protection_problems(
        entry.sensitive,
        entry.extractable,
        entry.never_extractable,
        generated,
    );
    if problems.is_empty() {
        Ok(entry)
    } else {
        Err(Trouble::Other(SignerError::SelfTest(format!(
            "the token did not protect the new private key as asked ({}): tm-agent does not keep \
             such a key; this token cannot hold it non-extractable",
            problems.join(", ")
        ))))
    }
}

/// Passes a checked new key through; when the checks failed, destroys both new objects.
fn keep_or_destroy(
    session: &Session,
    private: ObjectHandle,
    public: ObjectHandle,
    checked: Result<KeyEntry, Trouble>,
    label: &str,
) -> Result<KeyEntry, Trouble> {
    let Err(failed) = checked else {
        return checked;
    };
    let private_gone = session.destroy_object(private);
    let public_gone = session.destroy_object(public);
    let gone = private_gone.and(public_gone);
    if gone.is_ok() {
        tracing::info!(label, "the new key failed its checks and was deleted");
    }
    Err(undone_or_left_behind(failed, gone, label))
}

/// The error of a key creation that failed after objects were made and then destroyed:
/// `failed` as it is when they are gone, else with what is left in the token and what to
/// do about it (a retry would otherwise be refused as "already exists" with no reason).
fn undone_or_left_behind(failed: Trouble, gone: Result<(), CkError>, label: &str) -> Trouble {
    match gone {
        Ok(()) => failed,
        Err(e) => Trouble::Other(SignerError::Open(format!(
            "{}; its objects could not be deleted again ({}): objects labelled {label:?} \
                 are left in the token; delete them by hand (pkcs11-tool --delete-object) \
                 before trying again",
            failed.into_error(),
            ck_error(e)
        ))),
    }
}

/// Warns loudly when the token does not protect the key: a private key that is not
/// sensitive, or is extractable, can be read out of the token.
fn warn_if_unprotected(session: &Session, key: ObjectHandle, location: &str) {
    match read_attrs(
        session,
        key,
        &[AttributeType::Sensitive, AttributeType::Extractable],
    ) {
        Ok(attrs) => {
            let problems = protection_problems(attrs.sensitive, attrs.extractable, None, false);
            if !problems.is_empty() {
                tracing::warn!(
                    key = %location,
                    problems = %problems.join(", "),
                    "THE PRIVATE KEY IS NOT PROTECTED BY THE TOKEN: it can be read out of it. \
                     Replace it with a key made by `tm-agent key generate` (or `key import`), \
                     which are sensitive and not extractable, and revoke this one"
                );
            }
        }
        Err(trouble) => tracing::warn!(
            key = %location,
            error = %trouble_text(&trouble),
            "cannot read the private key's CKA_SENSITIVE and CKA_EXTRACTABLE: whether the token \
             protects it is unknown"
        ),
    }
}

fn check_new_label(label: &str) -> Result<(), SignerError> {
    if label.trim().is_empty() {
        return Err(SignerError::Open("the key label is empty".into()));
    }
    Ok(())
}

/// Generates a P-256 key pair inside the token selected by `settings`: the private key is
/// a token object, private, sensitive, never extractable, for signing only. `id` defaults
/// to [`GENERATED_ID_LEN`] random bytes. Refuses when `label` or `id` is taken.
pub fn generate(
    settings: &Pkcs11Settings,
    label: &str,
    id: Option<&[u8]>,
) -> Result<KeyEntry, SignerError> {
    check_new_label(label)?;
    let id = match id {
        Some(id) if !id.is_empty() => id.to_vec(),
        _ => rand::random::<[u8; GENERATED_ID_LEN]>().to_vec(),
    };
    with_admin(settings, true, |admin| {
        admin.login()?;
        refuse_existing(admin, label, &id)?;
        let (public, private) = admin.session.generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &public_template(label, &id),
            &private_template(label, &id),
        )?;
        let checked = key_public(&admin.session, private)
            .and_then(|vk| probe(&admin.session, private, &vk))
            .and_then(|()| checked_entry(&admin.session, private, public, true));
        let entry = keep_or_destroy(&admin.session, private, public, checked, label)?;
        tracing::info!(label, id = %hex::encode(&id), "generated a P-256 key in the token");
        Ok(entry)
    })
}

/// Imports the bundle's private key into the token as a sensitive, non-extractable signing
/// key, with its public key object beside it. `id` defaults to [`default_import_id`].
/// Refuses when `label` or `id` is taken; checks the result with a probe signature.
pub fn import(
    settings: &Pkcs11Settings,
    bundle: &KeyBundle,
    label: &str,
    id: Option<&[u8]>,
) -> Result<KeyEntry, SignerError> {
    check_new_label(label)?;
    let public_key = bundle.verifying_key();
    let id = match id {
        Some(id) if !id.is_empty() => id.to_vec(),
        _ => default_import_id(&public_key),
    };
    with_admin(settings, true, |admin| {
        admin.login()?;
        refuse_existing(admin, label, &id)?;
        let mut private_attrs = private_template(label, &id);
        private_attrs.extend([
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::EcParams(P256_EC_PARAMS.to_vec()),
            Attribute::Value(bundle.private_scalar().to_vec()),
        ]);
        let created = admin.session.create_object(&private_attrs);
        for attr in &mut private_attrs {
            if let Attribute::Value(secret) = attr {
                secret.zeroize();
            }
        }
        let private = created?;
        let mut public_attrs = public_template(label, &id);
        public_attrs.extend([
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::EcPoint(encode_ec_point(&public_key)),
        ]);
        let public = match admin.session.create_object(&public_attrs) {
            Ok(public) => public,
            Err(e) => {
                let gone = admin.session.destroy_object(private);
                return Err(undone_or_left_behind(e.into(), gone, label));
            }
        };
        let checked = key_public(&admin.session, private).and_then(|vk| {
            if vk != public_key {
                return Err(Trouble::Other(SignerError::SelfTest(
                    "the imported public key object does not match the bundle".into(),
                )));
            }
            probe(&admin.session, private, &public_key)?;
            checked_entry(&admin.session, private, public, false)
        });
        let entry = keep_or_destroy(&admin.session, private, public, checked, label)?;
        tracing::info!(label, id = %hex::encode(&id), api_key_id = %bundle.key_id, "imported a P-256 key into the token");
        Ok(entry)
    })
}

/// Every key in the token: private keys with their public halves (matched by `CKA_ID`),
/// then public keys without a private half.
pub fn list(settings: &Pkcs11Settings) -> Result<Vec<KeyEntry>, SignerError> {
    with_admin(settings, false, |admin| {
        admin.login()?;
        let session = &admin.session;
        let privates = session.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])?;
        let publics = session.find_objects(&[Attribute::Class(ObjectClass::PUBLIC_KEY)])?;
        let mut public_ids = Vec::with_capacity(publics.len());
        for object in &publics {
            let attrs = read_attrs(session, *object, &[AttributeType::Id])?;
            public_ids.push(attrs.id.unwrap_or_default());
        }
        let mut used = vec![false; publics.len()];
        let mut entries = Vec::new();
        for private in privates {
            let id = read_attrs(session, private, &[AttributeType::Id])?
                .id
                .unwrap_or_default();
            let public = public_ids
                .iter()
                .position(|pid| !id.is_empty() && *pid == id)
                .map(|i| {
                    used[i] = true;
                    publics[i]
                });
            entries.push(entry(session, Some(private), public)?);
        }
        for (i, object) in publics.iter().enumerate() {
            if !used[i] {
                entries.push(entry(session, None, Some(*object))?);
            }
        }
        Ok(entries)
    })
}

/// The public key of the key selected by `settings`. Tries the public key object without
/// logging in first (no PIN needed when the selectors name exactly one); otherwise logs in
/// and goes through the private key, as the signer does.
pub fn public(settings: &Pkcs11Settings) -> Result<VerifyingKey, SignerError> {
    with_admin(settings, false, |admin| {
        let session = &admin.session;
        if settings.key_label.is_some() || settings.key_id.is_some() {
            let mut template = vec![Attribute::Class(ObjectClass::PUBLIC_KEY)];
            if let Some(label) = &settings.key_label {
                template.push(Attribute::Label(label.as_bytes().to_vec()));
            }
            if let Some(id) = &settings.key_id {
                template.push(Attribute::Id(id.clone()));
            }
            if let [object] = session.find_objects(&template)?.as_slice() {
                let attrs = read_attrs(
                    session,
                    *object,
                    &[
                        AttributeType::KeyType,
                        AttributeType::EcParams,
                        AttributeType::EcPoint,
                    ],
                )?;
                check_p256(&attrs, "the public key object")?;
                if let Some(point) = attrs.ec_point {
                    return Ok(decode_ec_point(&point)?);
                }
            }
        }
        admin.login()?;
        let key = find_private_key(session, settings)?;
        key_public(session, key)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;

    fn vk() -> VerifyingKey {
        *SigningKey::from_slice(&[7u8; 32]).unwrap().verifying_key()
    }

    /// A failed key creation whose objects could not be deleted says what is left and what
    /// to do; one whose objects are gone keeps its own error.
    #[test]
    fn a_failed_creation_reports_objects_left_behind() {
        let failed = || {
            Trouble::Other(SignerError::SelfTest(
                "the probe signature does not verify".into(),
            ))
        };
        let undone = undone_or_left_behind(failed(), Ok(()), "tm-key").into_error();
        assert!(matches!(undone, SignerError::SelfTest(_)), "{undone}");
        let stuck = CkError::Pkcs11(RvError::DeviceError, Function::DestroyObject);
        let left = undone_or_left_behind(failed(), Err(stuck), "tm-key")
            .into_error()
            .to_string();
        assert!(
            left.contains("the probe signature does not verify"),
            "{left}"
        );
        assert!(left.contains("C_DestroyObject"), "{left}");
        assert!(
            left.contains(r#"labelled "tm-key" are left in the token"#),
            "{left}"
        );
        assert!(left.contains("pkcs11-tool --delete-object"), "{left}");
    }

    #[test]
    fn ec_point_der_and_bare_forms_decode() {
        let key = vk();
        let der = encode_ec_point(&key);
        assert_eq!(&der[..3], &[0x04, 0x41, 0x04]);
        assert_eq!(decode_ec_point(&der).unwrap(), key);
        let bare = jose::public_key_uncompressed(&key);
        assert_eq!(decode_ec_point(&bare).unwrap(), key);
        let compressed = key.to_encoded_point(true);
        assert_eq!(decode_ec_point(compressed.as_bytes()).unwrap(), key);
        let mut wrapped = vec![0x04, 33];
        wrapped.extend_from_slice(compressed.as_bytes());
        assert_eq!(decode_ec_point(&wrapped).unwrap(), key);
        assert!(decode_ec_point(&[0x04, 0x02, 0x01, 0x02]).is_err());
        assert!(decode_ec_point(&[]).is_err());
    }

    #[test]
    fn bare_point_that_looks_like_der_still_decodes() {
        // Find a key whose x starts with 0x3f: `04 3f …` reads as a 63-byte OCTET STRING.
        for seed in 1u8..=255 {
            let key = *SigningKey::from_slice(&[seed; 32]).unwrap().verifying_key();
            let bare = jose::public_key_uncompressed(&key);
            if bare[1] == 0x3f {
                assert_eq!(decode_ec_point(&bare).unwrap(), key);
                return;
            }
        }
    }

    #[test]
    fn hex_ids_parse() {
        assert_eq!(parse_hex_id("a1b2").unwrap(), vec![0xa1, 0xb2]);
        assert_eq!(parse_hex_id("A1:B2").unwrap(), vec![0xa1, 0xb2]);
        assert_eq!(parse_hex_id("0xa1b2").unwrap(), vec![0xa1, 0xb2]);
        assert!(parse_hex_id("").is_err());
        assert!(parse_hex_id("xyz").is_err());
    }

    #[test]
    fn rv_names_are_ckr_constants() {
        assert_eq!(rv_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(
            rv_name(RvError::SessionHandleInvalid),
            "CKR_SESSION_HANDLE_INVALID"
        );
        assert_eq!(
            rv_name(RvError::CryptokiNotInitialized),
            "CKR_CRYPTOKI_NOT_INITIALIZED"
        );
        assert!(rv_name(RvError::VendorDefined(0x8000_0001)).contains("0x80000001"));
    }

    #[test]
    fn errors_name_the_function_and_value() {
        let err = ck_error(CkError::Pkcs11(RvError::DeviceError, Function::Sign));
        let text = err.to_string();
        assert!(text.contains("C_Sign"), "{text}");
        assert!(text.contains("CKR_DEVICE_ERROR"), "{text}");
        assert!(text.contains("HSM"), "{text}");
        assert!(matches!(
            ck_error(CkError::Pkcs11(RvError::PinIncorrect, Function::Login)),
            SignerError::WrongPin { .. }
        ));
        assert!(matches!(
            ck_error(CkError::Pkcs11(RvError::PinLocked, Function::Login)),
            SignerError::PinLocked
        ));
    }

    #[test]
    fn faults_classify_return_values() {
        assert_eq!(Fault::of(RvError::OperationActive), Fault::SessionBusy);
        assert_eq!(Fault::of(RvError::SessionClosed), Fault::SessionGone);
        assert_eq!(Fault::of(RvError::SessionHandleInvalid), Fault::SessionGone);
        assert_eq!(Fault::of(RvError::UserNotLoggedIn), Fault::NotLoggedIn);
        assert_eq!(Fault::of(RvError::ObjectHandleInvalid), Fault::KeyGone);
        for rv in [
            RvError::DeviceRemoved,
            RvError::TokenNotPresent,
            RvError::DeviceError,
            RvError::GeneralError,
        ] {
            assert_eq!(Fault::of(rv), Fault::TokenGone);
        }
        for rv in [
            RvError::PinIncorrect,
            RvError::PinLocked,
            RvError::PinExpired,
            RvError::UserPinNotInitialized,
            RvError::MechanismInvalid,
        ] {
            assert_eq!(Fault::of(rv), Fault::Fatal, "{rv:?} must not be retried");
        }
    }

    #[test]
    fn protection_flags_are_checked() {
        assert!(protection_problems(Some(true), Some(false), Some(true), true).is_empty());
        // Imported keys were outside the token: never-extractable is not asked of them.
        assert!(protection_problems(Some(true), Some(false), Some(false), false).is_empty());
        let problems = protection_problems(Some(false), Some(true), Some(false), true);
        assert_eq!(
            problems,
            [
                "CKA_SENSITIVE is false",
                "CKA_EXTRACTABLE is true",
                "CKA_NEVER_EXTRACTABLE is false"
            ]
        );
        // Not reported counts as wrong: the CLI promises these flags.
        let problems = protection_problems(None, None, None, true);
        assert_eq!(problems.len(), 3);
        assert!(problems[0].contains("not reported"));
    }

    #[test]
    fn pin_faults_are_pin_errors() {
        assert!(matches!(
            PinFault::Wrong(Some(1)).error(),
            SignerError::WrongPin {
                tries_left: Some(1)
            }
        ));
        assert!(matches!(PinFault::Locked.error(), SignerError::PinLocked));
        let err = PinFault::Unusable("the user PIN has expired".into()).error();
        assert!(matches!(err, SignerError::PinUnusable(_)));
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff_delay(1), BACKOFF_INITIAL);
        assert_eq!(backoff_delay(2), BACKOFF_INITIAL * 2);
        assert_eq!(backoff_delay(3), BACKOFF_INITIAL * 4);
        assert_eq!(backoff_delay(100), BACKOFF_MAX);
        let now = Instant::now();
        let rec = Recovery {
            failures: 1,
            last_attempt: Some(now),
            ..Recovery::default()
        };
        assert!(rec.wait(now).is_some());
        assert!(rec.wait(now + BACKOFF_INITIAL).is_none());
        assert!(Recovery::default().wait(now).is_none());
    }

    #[test]
    fn settings_deserialize_with_defaults_and_hex_id() {
        let s: Pkcs11Settings = toml::from_str(
            r#"
            module = "/usr/lib/softhsm/libsofthsm2.so"
            token_label = "prod"
            key_label = "tm"
            key_id = "0a:0B"
            pin = { file = "/etc/tm-agent/pin" }
            "#,
        )
        .unwrap();
        assert_eq!(s.key_id, Some(vec![0x0a, 0x0b]));
        assert_eq!(s.sessions, DEFAULT_SESSIONS);
        assert_eq!(s.pin, PinSource::File("/etc/tm-agent/pin".into()));
        s.validate().unwrap();
        let bad: Result<Pkcs11Settings, _> =
            toml::from_str("module = \"/x\"\npin = \"prompt\"\nslot = 0\n");
        assert!(bad.is_err(), "unknown fields are refused");
        let mut zero = s.clone();
        zero.sessions = 0;
        assert!(zero.validate().is_err());
    }
}
