//! The PIV backend end to end without hardware: real pcscd, the vsmartcard `vpcd` reader
//! driver, the virtual card of `examples/virtual_piv.rs` (a test double of a YubiKey), and
//! the real `yubikey` crate code path behind `tm_agent::signer::piv`.
//!
//! Needs pcscd and vsmartcard-vpcd (scripts/test.sh installs them; the tests start pcscd
//! with scripts/pcscd.sh when it is not running) and the example binary, which a plain
//! `cargo test` builds (`cargo test --test piv` alone does not: then run
//! `cargo build --example virtual_piv` first).
//!
//! vpcd has one reader port for "Virtual PCD 00 00", so the tests take turns on a global
//! lock, each with a fresh card (its own state file) started and stopped by the test.

mod common;
#[path = "common/sim.rs"]
mod sim_fixture;

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::DecodePublicKey as _;
use tm_agent::jose;
use tm_agent::signer::pin::PinSource;
use tm_agent::signer::piv::{
    self, ManagementKey, PinPolicy, PivSettings, TouchPolicy, WriteOptions,
};
use tm_agent::signer::{ActorOptions, Handle, SignerError};
use x509_cert::der::{Decode as _, Encode as _};

use common::daemon::{assert_success, clean_env, uid, Proc};
use sim_fixture::SimProcess;

const READER: &str = "Virtual PCD 00 00";
const SERIAL: u32 = 31_415_926;
/// Unlike 123456, this PIN cannot hide in a serial number when the logs are searched.
const PIN: &str = "271828";
/// The PIN's bytes as the `yubikey` crate's trace output prints them (`Debug` of a byte slice).
const PIN_AS_DEBUG_BYTES: &str = "50, 55, 49, 56, 50, 56";

static CARD_SLOT: Mutex<()> = Mutex::new(());

/// One test at a time on the single virtual reader; logging and pcscd set up once.
fn setup() -> MutexGuard<'static, ()> {
    let guard = CARD_SLOT.lock().unwrap_or_else(|p| p.into_inner());
    logs();
    ensure_pcscd();
    guard
}

fn ensure_pcscd() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pcscd.sh");
        let status = Command::new("bash")
            .arg(&script)
            .status()
            .expect("run scripts/pcscd.sh");
        assert!(
            status.success(),
            "the PIV tests need pcscd with the vsmartcard-vpcd driver: \
             apt-get install -y pcscd vsmartcard-vpcd, then scripts/pcscd.sh as root"
        );
        assert!(
            Path::new("/usr/lib/pcsc/drivers/serial/libifdvpcd.so").exists(),
            "the PIV tests need the vpcd reader driver: apt-get install -y vsmartcard-vpcd \
             (then restart pcscd)"
        );
    });
}

fn virtual_piv_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/debug/deps/piv-… → target/debug/examples/virtual_piv
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let bin = profile_dir.join("examples").join("virtual_piv");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test` builds it, `cargo test --test piv` does not \
         (run `cargo build --example virtual_piv`)",
        bin.display()
    );
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/virtual_piv.rs");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    assert!(
        modified(&source) <= modified(&bin),
        "{} is older than its source: run `cargo build --example virtual_piv`",
        bin.display()
    );
    bin
}

/// The virtual card process, killed on drop.
struct VirtualCard {
    child: Option<Child>,
    dir: tempfile::TempDir,
    state: PathBuf,
}

impl VirtualCard {
    fn start() -> VirtualCard {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = dir.path().join("card.json");
        let mut card = VirtualCard {
            child: None,
            dir,
            state,
        };
        card.insert();
        card
    }

    /// Starts the card process (with the same state file as before, if any).
    fn insert(&mut self) {
        assert!(self.child.is_none(), "card already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("card.log"))
            .expect("card log");
        let child = Command::new(virtual_piv_binary())
            .arg("--state")
            .arg(&self.state)
            .args(["--serial", &SERIAL.to_string(), "--pin", PIN])
            .env("VIRTUAL_PIV_TRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start virtual_piv");
        self.child = Some(child);
        if let Err(why) = wait_for_card(true) {
            let log = std::fs::read_to_string(self.dir.path().join("card.log")).unwrap_or_default();
            panic!("{why}; card log:\n{log}");
        }
    }

    /// Kills the card process: to pcscd, the card was pulled out.
    fn remove(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        wait_for_card(false).expect("card removed");
    }

    fn state(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(&self.state).expect("card state");
        serde_json::from_str(&text).expect("card state JSON")
    }

    /// The PIN tries counter as the card keeps it (not through the code under test).
    fn pin_tries(&self) -> u64 {
        self.state()["pin_tries"].as_u64().expect("pin_tries")
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for VirtualCard {
    fn drop(&mut self) {
        // Give signer threads of dropped Handles time to disconnect (with a card reset)
        // while the card is still there. A reset that fails because the card has just
        // gone leaves pcscd believing the reader empty while vpcd hands its slot to the
        // next card, which pcscd then never powers up.
        std::thread::sleep(Duration::from_millis(500));
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Let pcscd see the card gone before the next test starts its own.
        let _ = wait_for_card(false);
    }
}

/// Waits until pcscd has registered the card in the virtual reader and the card answers,
/// or (present = false) until pcscd reports the reader empty. Waiting for pcscd's own
/// "empty" matters: a new card that connects to vpcd before pcscd noticed the old one
/// leave inherits the old card's stale (powered-off, mute) state.
fn wait_for_card(present: bool) -> Result<(), String> {
    let ctx = pcsc::Context::establish(pcsc::Scope::User).map_err(|e| format!("pcsc: {e}"))?;
    let reader = std::ffi::CString::new(READER).expect("reader name");
    let mut states = [pcsc::ReaderState::new(reader, pcsc::State::UNAWARE)];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match ctx.get_status_change(Duration::from_millis(300), &mut states) {
            Ok(()) | Err(pcsc::Error::Timeout) => {}
            Err(e) => return Err(format!("pcsc status of {READER}: {e}")),
        }
        let event = states[0].event_state();
        states[0].sync_current_state();
        let done = if present {
            event.contains(pcsc::State::PRESENT)
                && !event.contains(pcsc::State::MUTE)
                && card_answers()
        } else {
            event.contains(pcsc::State::EMPTY)
        };
        if done {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "pcscd did not see the virtual card {} within 20 s (reader state {event:?})",
                if present { "arrive" } else { "leave" }
            ));
        }
    }
}

/// Whether the card answers: a shared connection succeeds (pcscd powered it, read its ATR).
fn card_answers() -> bool {
    let Ok(ctx) = pcsc::Context::establish(pcsc::Scope::User) else {
        return false;
    };
    let reader = std::ffi::CString::new(READER).expect("reader name");
    match ctx.connect(&reader, pcsc::ShareMode::Shared, pcsc::Protocols::ANY) {
        Ok(card) => {
            let _ = card.disconnect(pcsc::Disposition::LeaveCard);
            true
        }
        // Held exclusively by someone: a card is there.
        Err(pcsc::Error::SharingViolation) => true,
        Err(_) => false,
    }
}

fn pin_file(dir: &Path, pin: &str) -> PathBuf {
    let path = dir.join(format!("pin-{pin}"));
    let mut f = std::fs::File::create(&path).expect("pin file");
    writeln!(f, "{pin}").expect("write pin");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

fn settings(card: &VirtualCard, slot: &str, pin: &str) -> PivSettings {
    PivSettings {
        serial: Some(SERIAL),
        slot: slot.into(),
        pin: PinSource::File(pin_file(card.dir(), pin)),
    }
}

fn factory() -> WriteOptions {
    WriteOptions::new(ManagementKey::FactoryDefault)
}

/// Runs `yubico-piv-tool -r READER ARGS…`, which must succeed; returns its standard output.
fn piv_tool(args: &[&str]) -> String {
    let out = Command::new("yubico-piv-tool")
        .args(["-r", READER])
        .args(args)
        .output()
        .expect("yubico-piv-tool");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Generates a key in `slot` with the factory management key: its settings and public key.
fn generate(card: &VirtualCard, slot: &str) -> (PivSettings, VerifyingKey) {
    let s = settings(card, slot, PIN);
    let public = piv::generate(&s, &factory())
        .expect("generate")
        .public_key
        .expect("public key");
    (s, public)
}

/// `piv::open` fails (the key must not open): its error.
#[track_caller]
fn open_fails(settings: &PivSettings, why: &str) -> SignerError {
    match piv::open(settings) {
        Err(e) => e,
        Ok(_) => panic!("{why}"),
    }
}

#[track_caller]
fn assert_wrong_pin(err: &SignerError, tries_left: u32) {
    assert!(
        matches!(
            err,
            SignerError::WrongPin { tries_left: Some(t) } if *t == tries_left
        ),
        "{err:?}"
    );
}

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn spawn(settings: &PivSettings) -> Handle {
    let (info, workers) = piv::open(settings).expect("open the PIV key");
    assert_eq!(workers.len(), 1, "one owner of the card");
    Handle::spawn(info, workers, ActorOptions::default()).expect("signer self-test")
}

/// Signs the Auth API challenge and checks it as the API would: raw r||s, base64url, over
/// the exact message, with the given public key.
fn check_challenge(handle: &Handle, public: &VerifyingKey, n: i64) {
    let key_id = "3f1c2a9e-7b7d-4c1e-9a51-0c2d2d9e8f10";
    let timestamp = 1_767_000_000 + n;
    let body = block(handle.sign_challenge(key_id, timestamp)).expect("sign_challenge");
    assert_eq!(body.signature.len(), 86);
    let sig = jose::decode_es256(&body.signature).expect("raw r||s");
    assert!(sig.normalize_s().is_none(), "low-S");
    let message = format!("{key_id}.{timestamp}");
    public
        .verify(message.as_bytes(), &sig)
        .expect("signature verifies over the exact message");
}

#[test]
fn generate_in_9c_then_challenges_verify() {
    let _turn = setup();
    let card = VirtualCard::start();
    let s = settings(&card, "9c", PIN);
    // A subject that is no RFC 4514 name is refused before the card is touched: the slot
    // stays empty, so the generate below needs no --force.
    let bad_subject = WriteOptions {
        subject: "tm-agent".into(),
        ..factory()
    };
    let err = piv::generate(&s, &bad_subject).expect_err("a bad subject");
    assert!(err.to_string().contains("RFC 4514"), "{err}");
    let slot = piv::generate(&s, &factory()).expect("generate");
    assert_eq!(slot.slot, "9c");
    assert_eq!(slot.algorithm, "ECCP256");
    assert_eq!(slot.pin_policy, Some(PinPolicy::Once));
    assert_eq!(slot.touch_policy, Some(TouchPolicy::Never));
    assert_eq!(slot.origin, Some("generated"));
    assert_eq!(slot.certificate_subject.as_deref(), Some("CN=tm-agent"));
    let public = slot.public_key.expect("public key");

    let handle = spawn(&s);
    assert_eq!(handle.info().backend, "piv");
    assert!(handle.info().hardware_backed);
    assert_eq!(handle.public_key(), &public);
    let location = &handle.info().location;
    assert!(
        location.contains(&format!("YubiKey {SERIAL}")),
        "{location}"
    );
    assert!(
        location.contains("pin policy once, touch policy never"),
        "{location}"
    );
    // The card emits high-S half of the time: enough signatures to see the Handle fix it.
    for n in 0..16 {
        check_challenge(&handle, &public, n);
    }
    assert_eq!(piv::public(&s).expect("public").1, public);

    // A second generate must not destroy the key.
    let err = piv::generate(&s, &factory()).expect_err("slot is taken");
    assert!(err.to_string().contains("--force"), "{err}");
}

#[test]
fn imported_bundle_signs_with_its_key_and_management_key_can_be_pin_protected() {
    let _turn = setup();
    let card = VirtualCard::start();
    let s = settings(&card, "9a", PIN);

    piv::protect_management_key(&s, &ManagementKey::FactoryDefault).expect("protect");
    let mgm = card.state()["mgm_key"].as_str().map(str::to_string);
    assert_ne!(
        mgm.as_deref(),
        Some("010203040506070801020304050607080102030405060708")
    );
    let refused = piv::generate(&settings(&card, "9d", PIN), &factory())
        .expect_err("the factory key is gone");
    assert!(
        refused.to_string().contains("refused the management key"),
        "{refused}"
    );

    let sk = SigningKey::random(&mut rand::rngs::OsRng);
    let jwk = jose::Jwk::from_verifying_key(sk.verifying_key());
    let json = serde_json::json!({
        "key_id": "6c0f6b1e-3a53-4bde-9a4b-1d3e9f3a8b2c", "algorithm": "ES256",
        "private_key": {"kty": "EC", "crv": "P-256", "x": jwk.x, "y": jwk.y,
                        "d": jose::b64url(&sk.to_bytes())}
    });
    let bundle = jose::parse_key_bundle(&json.to_string()).expect("bundle");
    let options = WriteOptions::new(ManagementKey::PinProtected);
    let slot = piv::import(&s, &bundle, &options).expect("import");
    assert_eq!(slot.origin, Some("imported"));
    assert_eq!(slot.public_key.as_ref(), Some(sk.verifying_key()));

    let handle = spawn(&s);
    for n in 0..4 {
        check_challenge(&handle, sk.verifying_key(), n);
    }
    // A Turnkey stamp carries the same key.
    let stamp = block(handle.stamp(b"{\"type\":\"ACTIVITY\"}")).expect("stamp");
    let decoded = jose::decode_turnkey_stamp(&stamp).expect("stamp JSON");
    assert_eq!(
        decoded.public_key,
        jose::public_key_compressed_hex(sk.verifying_key())
    );

    let err = piv::attest(&s).expect_err("imported keys cannot be attested");
    assert!(err.to_string().contains("imported"), "{err}");
}

#[test]
fn wrong_pin_reports_tries_left_and_is_never_retried() {
    let _turn = setup();
    let card = VirtualCard::start();
    let (right, _) = generate(&card, "9c");
    assert_eq!(card.pin_tries(), 3);

    let wrong = settings(&card, "9c", "999999");
    let err = open_fails(&wrong, "a wrong PIN opened the key");
    assert_wrong_pin(&err, 2);
    assert!(err.to_string().contains("2 tries left"), "{err}");
    assert_eq!(card.pin_tries(), 2, "exactly one try spent");
    assert_eq!(piv::pin_tries_left(&right).expect("tries"), 2);

    // The right PIN resets the counter.
    let handle = spawn(&right);
    assert_eq!(card.pin_tries(), 3);
    block(handle.sign(b"before")).expect("sign");

    // The PIN changes behind the agent's back (another tool). The agent notices on its next
    // signature, tries its PIN once, and then never again.
    piv_tool(&["-a", "change-pin", "-P", PIN, "-N", "161803"]);
    let err = block(handle.sign(b"after")).expect_err("old PIN");
    assert_wrong_pin(&err, 2);
    for _ in 0..5 {
        let again = block(handle.sign(b"again")).expect_err("latched");
        assert!(matches!(again, SignerError::WrongPin { .. }), "{again:?}");
    }
    assert_eq!(card.pin_tries(), 2, "the PIN was tried once, not retried");
}

/// A card with one PIN try left is never sent a PIN: a wrong PIN file, started again and
/// again (socket activation, reboots), must not block the card.
#[test]
fn the_last_pin_try_is_never_spent() {
    let _turn = setup();
    let card = VirtualCard::start();
    let (right, _) = generate(&card, "9c");
    let wrong = settings(&card, "9c", "999999");
    assert_wrong_pin(&open_fails(&wrong, "a wrong PIN opened the key"), 2);
    assert_wrong_pin(&open_fails(&wrong, "a wrong PIN opened the key"), 1);
    assert_eq!(card.pin_tries(), 1);
    for s in [&wrong, &right] {
        let err = open_fails(s, "opened with one PIN try left");
        assert!(matches!(err, SignerError::PinUnusable(_)), "{err:?}");
        assert!(err.to_string().contains("1 PIN try left"), "{err}");
    }
    assert_eq!(card.pin_tries(), 1, "no PIN was sent");

    // The right PIN entered once by hand resets the count; the agent opens again.
    piv_tool(&["-a", "verify-pin", "-P", PIN]);
    assert_eq!(card.pin_tries(), 3);
    let handle = spawn(&right);
    block(handle.sign(b"after")).expect("sign");
}

/// Another program (gpg's scdaemon with pcsc-shared, say) selects the OpenPGP applet on
/// the shared card: the agent's next signature finds PIV gone, reconnects once (selects
/// PIV, verifies the PIN) and signs, with no try spent.
#[test]
fn another_applet_selected_behind_the_agent_is_recovered() {
    let _turn = setup();
    let card = VirtualCard::start();
    let (s, public) = generate(&card, "9c");
    let handle = spawn(&s);
    check_challenge(&handle, &public, 0);
    let out = Command::new("opensc-tool")
        .args(["-r", READER, "-c", "default"])
        .args(["-s", "00:A4:04:00:06:D2:76:00:01:24:01"])
        .output()
        .expect("opensc-tool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    check_challenge(&handle, &public, 1);
    check_challenge(&handle, &public, 2);
    assert_eq!(card.pin_tries(), 3);
}

#[test]
fn card_removed_mid_run_is_unavailable_then_signing_resumes() {
    let _turn = setup();
    let mut card = VirtualCard::start();
    let (s, public) = generate(&card, "9c");
    let handle = spawn(&s);
    let health = handle.subscribe_health();
    check_challenge(&handle, &public, 0);

    card.remove();
    let err = block(handle.sign(b"while removed")).expect_err("no card");
    assert!(matches!(err, SignerError::Unavailable(_)), "{err:?}");
    assert_eq!(err.wire_code().as_str(), "unavailable");
    assert!(matches!(
        *health.borrow(),
        tm_agent::signer::HealthState::Failing(_)
    ));
    // Within the back-off the card is not even asked.
    let err = block(handle.sign(b"still removed")).expect_err("no card");
    assert_eq!(err.wire_code().as_str(), "unavailable", "{err}");

    card.insert();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 1;
    loop {
        match block(handle.sign_challenge("k", 1_767_000_000 + n)) {
            Ok(body) => {
                let sig = jose::decode_es256(&body.signature).expect("raw");
                let message = format!("k.{}", 1_767_000_000 + n);
                public.verify(message.as_bytes(), &sig).expect("verifies");
                break;
            }
            Err(e) => {
                assert_eq!(e.wire_code().as_str(), "unavailable", "{e}");
                assert!(Instant::now() < deadline, "signing did not resume: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        n += 1;
    }
    check_challenge(&handle, &public, 100);
    assert_eq!(
        *health.borrow(),
        tm_agent::signer::HealthState::Healthy,
        "healthy again"
    );
    assert_eq!(card.pin_tries(), 3, "the PIN was verified again, right");
}

#[test]
fn yubico_piv_tool_sees_the_key_and_shares_the_card() {
    let _turn = setup();
    let card = VirtualCard::start();
    let (s, public) = generate(&card, "9c");
    let handle = spawn(&s);
    check_challenge(&handle, &public, 0);

    // Another program uses the card while the agent holds it (shared).
    let text = piv_tool(&["-a", "status"]);
    assert!(
        text.contains(&format!("Serial Number:\t{SERIAL}")),
        "{text}"
    );
    assert!(text.contains("Slot 9c"), "{text}");
    assert!(text.contains("CN=tm-agent"), "{text}");
    assert!(text.contains("ECCP256"), "{text}");

    // The agent carries on (verifying its PIN again if the other program reset the card).
    check_challenge(&handle, &public, 1);
    check_challenge(&handle, &public, 2);
}

#[test]
fn card_held_exclusively_is_unavailable_with_the_reason() {
    let _turn = setup();
    let card = VirtualCard::start();
    let (s, _) = generate(&card, "9c");

    let ctx = pcsc::Context::establish(pcsc::Scope::User).expect("pcsc");
    let reader = std::ffi::CString::new(READER).expect("reader");
    let deadline = Instant::now() + Duration::from_secs(10);
    let exclusive = loop {
        match ctx.connect(&reader, pcsc::ShareMode::Exclusive, pcsc::Protocols::ANY) {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "exclusive connect: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let err = open_fails(&s, "opened a card held exclusively by another program");
    assert_eq!(err.wire_code().as_str(), "unavailable", "{err}");
    let text = err.to_string();
    assert!(text.contains("exclusively"), "{text}");
    assert!(text.contains("never stops other programs"), "{text}");
    assert_eq!(card.pin_tries(), 3, "no PIN was sent");
    drop(exclusive);
    let _handle = spawn(&s);
}

#[test]
fn attest_list_and_touch_policy_warning() {
    let _turn = setup();
    let card = VirtualCard::start();
    let (s9c, public) = generate(&card, "9c");

    let attestation = piv::attest(&s9c).expect("attest");
    let cert = x509_cert::Certificate::from_der(&attestation.certificate).expect("DER");
    let spki = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .expect("spki");
    assert_eq!(
        VerifyingKey::from_public_key_der(&spki).expect("p256"),
        public
    );
    let ca_der = attestation.intermediate.as_deref().expect("f9 certificate");
    let ca = x509_cert::Certificate::from_der(ca_der).expect("DER");
    assert_eq!(cert.tbs_certificate.issuer, ca.tbs_certificate.subject);
    let ca_spki = ca
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .expect("spki");
    let ca_key = VerifyingKey::from_public_key_der(&ca_spki).expect("p256");
    let tbs = cert.tbs_certificate.to_der().expect("tbs");
    let sig = Signature::from_der(cert.signature.raw_bytes()).expect("DER signature");
    ca_key
        .verify(&tbs, &sig)
        .expect("attestation signed by the f9 key");
    let pem = attestation.to_pem();
    assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);

    let mut touch = factory();
    touch.touch_policy = TouchPolicy::Always;
    touch.pin_policy = PinPolicy::Always;
    let s9a = settings(&card, "9a", PIN);
    piv::generate(&s9a, &touch).expect("generate with touch always");

    let listed = piv::list(&s9c).expect("list");
    assert_eq!(listed.serial, SERIAL);
    assert_eq!(listed.version, "5.4.3");
    assert_eq!(listed.reader, READER);
    assert_eq!(listed.pin_tries_left, Some(3));
    let slots: Vec<(&str, Option<PinPolicy>, Option<TouchPolicy>)> = listed
        .slots
        .iter()
        .map(|s| (s.slot.as_str(), s.pin_policy, s.touch_policy))
        .collect();
    assert_eq!(
        slots,
        vec![
            ("9a", Some(PinPolicy::Always), Some(TouchPolicy::Always)),
            ("9c", Some(PinPolicy::Once), Some(TouchPolicy::Never)),
        ]
    );

    // PIN policy always: the agent sends the PIN before each signature, and it works.
    let handle = spawn(&s9a);
    let location = &handle.info().location;
    assert!(location.contains("touch policy always"), "{location}");
    let public_9a = *handle.public_key();
    check_challenge(&handle, &public_9a, 0);
    check_challenge(&handle, &public_9a, 1);
}

const BIN: &str = env!("CARGO_BIN_EXE_tm-agent");

/// Runs `tm-agent [--log FILTER] key --backend piv --serial … --pin-file … <args>`.
fn cli(card: &VirtualCard, pin: &str, log: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    if let Some(filter) = log {
        cmd.args(["--log", filter]);
    }
    cmd.args(["key", "--backend", "piv", "--serial", &SERIAL.to_string()])
        .arg("--pin-file")
        .arg(pin_file(card.dir(), pin))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run tm-agent")
}

#[track_caller]
fn succeeded(out: &std::process::Output) -> String {
    assert_success(out, "tm-agent")
}

#[test]
fn cli_generate_list_sign_attest_on_the_yubikey() {
    let _turn = setup();
    let card = VirtualCard::start();
    let out = cli(
        &card,
        PIN,
        None,
        &[
            "generate",
            "--default-mgm-key",
            "--pin-policy",
            "once",
            "--touch-policy",
            "never",
        ],
    );
    let pem = succeeded(&out);
    let public = VerifyingKey::from_public_key_pem(&pem).expect("PEM public key");
    let advice = String::from_utf8_lossy(&out.stderr);
    assert!(
        advice.contains("pin policy once, touch policy never"),
        "{advice}"
    );

    let again = cli(&card, PIN, None, &["generate", "--default-mgm-key"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let key_id = "0b9b3f3e-8d4c-4c1e-9f1a-2b3c4d5e6f70";
    let body = succeeded(&cli(
        &card,
        PIN,
        Some("trace"),
        &[
            "sign-challenge",
            "--key-id",
            key_id,
            "--timestamp",
            "1767000000",
        ],
    ));
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    let sig = jose::decode_es256(body["signature"].as_str().expect("signature")).expect("raw");
    public
        .verify(format!("{key_id}.1767000000").as_bytes(), &sig)
        .expect("verifies");

    let hex = succeeded(&cli(&card, PIN, None, &["public", "--format", "hex"]));
    assert_eq!(hex.trim(), jose::public_key_compressed_hex(&public));

    let table = succeeded(&cli(&card, PIN, None, &["list"]));
    let row = table
        .lines()
        .find(|l| l.starts_with("9c"))
        .unwrap_or_else(|| panic!("no 9c row in:\n{table}"));
    for word in ["ECCP256", "once", "never", "generated", "CN=tm-agent"] {
        assert!(row.contains(word), "{row}");
    }
    let attestation = succeeded(&cli(&card, PIN, None, &["attest"]));
    assert_eq!(attestation.matches("BEGIN CERTIFICATE").count(), 2);

    // A wrong PIN: the PIN exit code (EX_NOPERM) and the tries left; one try spent.
    let out = cli(
        &card,
        "999999",
        None,
        &["sign-challenge", "--key-id", key_id],
    );
    assert_eq!(
        out.status.code(),
        Some(i32::from(tm_agent::cli::EXIT_PIN)),
        "the PIN exit code"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 tries left"));
    assert_eq!(card.pin_tries(), 2);
}

#[test]
fn cli_log_cap_holds_at_trace() {
    let _turn = setup();
    let card = VirtualCard::start();
    succeeded(&cli(&card, PIN, None, &["generate", "--default-mgm-key"]));
    // `yubikey:` is a prefix of `yubikey::apdu` that outranks the cap in an EnvFilter.
    for filter in [
        "trace",
        "trace,yubikey=trace,yubikey::apdu=trace",
        "trace,yubikey:=trace,pcsc:=trace",
    ] {
        let out = cli(&card, PIN, Some(filter), &["public"]);
        succeeded(&out);
        let out = cli(
            &card,
            PIN,
            Some(filter),
            &[
                "sign-challenge",
                "--key-id",
                "0b9b3f3e-8d4c-4c1e-9f1a-2b3c4d5e6f70",
            ],
        );
        succeeded(&out);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(log.contains("YubiKey PIV key opened"), "{log}");
        for needle in [PIN_AS_DEBUG_BYTES, PIN, ">>> "] {
            assert!(
                !log.contains(needle),
                "--log {filter}: stderr shows {needle:?}"
            );
        }
    }
}

/// GET over plain HTTP on loopback (the simulator's JWKS), body as JSON.
fn http_get_json(base: &str, path: &str) -> serde_json::Value {
    use std::io::Read as _;
    let addr = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the simulator");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .expect("HTTP body");
    serde_json::from_str(body).expect("JSON body")
}

/// Verifies an ES256 JWT with the JWKS (independently of the agent's JWT code).
fn verify_jwt(jwks: &serde_json::Value, token: &str) -> serde_json::Value {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT");
    let decode = |p: &str| jose::b64url_decode(p).expect("base64url");
    let header: serde_json::Value = serde_json::from_slice(&decode(parts[0])).expect("header");
    let claims: serde_json::Value = serde_json::from_slice(&decode(parts[1])).expect("claims");
    assert_eq!(header["alg"], "ES256");
    let jwk = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .expect("kid published");
    let jwk: jose::Jwk = serde_json::from_value(jwk.clone()).expect("JWK");
    let key = jwk.to_verifying_key().expect("P-256 JWK");
    let sig = jose::signature_from_raw(&decode(parts[2])).expect("raw signature");
    key.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
        .expect("JWT signature verifies with the simulator's JWKS");
    claims
}

#[test]
fn the_agent_mints_tokens_from_the_simulator_with_the_yubikey() {
    let _turn = setup();
    let card = VirtualCard::start();
    let (_, public) = generate(&card, "9c");
    let dir = card.dir();
    std::fs::write(dir.join("public.pem"), jose::public_key_pem(&public)).expect("pem");
    let key_id = "5d3c1f7a-2b4e-4c6d-8e9f-0a1b2c3d4e5f";

    let sim = SimProcess::spawn(&[
        "--http".into(),
        "127.0.0.1:0".into(),
        "--https".into(),
        "127.0.0.1:0".into(),
        "--register".into(),
        format!("{key_id}={}", dir.join("public.pem").display()),
    ]);
    let https = &sim.ready.https;
    let http = &sim.ready.http;

    let socket = dir.join("agent.sock");
    let uid = uid();
    let config = format!(
        r#"
[agent]
log_level = "trace"

[socket]
path = "{socket}"
mode = 0o660

[keys.yubikey]
backend = "piv"
serial = {SERIAL}
slot = "9c"
pin = {{ file = "{pin}" }}

[profiles.default]
key = "yubikey"
key_id = "{key_id}"
base_url = "{https}/v1/auth"
ca_file = "{ca}"

[[access]]
uid = {uid}
ops = ["ping", "token", "sign_challenge", "status", "public_key"]
profiles = "*"
"#,
        socket = socket.display(),
        pin = pin_file(dir, PIN).display(),
        ca = sim.ca_file.display(),
    );
    std::fs::write(dir.join("config.toml"), config).expect("config");
    let mut run = Command::new(BIN);
    clean_env(&mut run)
        .arg("run")
        .arg("--config")
        .arg(dir.join("config.toml"))
        .stdin(Stdio::null());
    let agent = Proc::spawn("tm-agent run", &mut run);
    let client = |args: &[&str]| common::daemon::cli(&socket, args, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    let token = loop {
        let out = client(&["token"]);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no token within 30 s: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let jwks = http_get_json(http, "/.well-known/jwks.json");
    let claims = verify_jwt(&jwks, &token);
    assert!(claims["exp"].as_i64().is_some(), "{claims}");

    // The agent's own signature over a challenge, with the YubiKey's key.
    let out = client(&["sign"]);
    let body: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("sign prints the JSON body");
    assert_eq!(body["key_id"], key_id);
    let sig = jose::decode_es256(body["signature"].as_str().expect("signature")).expect("raw");
    let message = format!("{key_id}.{}", body["timestamp"]);
    public.verify(message.as_bytes(), &sig).expect("verifies");

    let status = String::from_utf8_lossy(&client(&["status"]).stdout).into_owned();
    assert!(status.contains("piv"), "{status}");
    assert!(status.contains(&format!("YubiKey {SERIAL}")), "{status}");

    // The daemon runs with log_level = "trace": still no PIN in its log.
    let log = agent.stderr();
    for needle in [PIN_AS_DEBUG_BYTES, PIN, ">>> "] {
        assert!(!log.contains(needle), "agent log shows {needle:?}");
    }
}

#[test]
fn log_cap_keeps_the_pin_out_of_trace_logs() {
    let _turn = setup();
    let card = VirtualCard::start();
    let (s, _) = generate(&card, "9c");
    let (raw, capped) = logs();
    raw.clear();
    capped.clear();

    let handle = spawn(&s);
    block(handle.sign(b"logged")).expect("sign");
    let raw = raw.text();
    let capped = capped.text();

    // Without the cap the yubikey crate's TRACE output does carry the PIN: the cap matters.
    assert!(
        raw.contains(PIN_AS_DEBUG_BYTES),
        "expected the uncapped trace log to show the VERIFY APDU (has the yubikey crate \
         changed its logging?)"
    );
    assert!(capped.contains("YubiKey PIV key opened"), "{capped}");
    for needle in [PIN_AS_DEBUG_BYTES, PIN, "323731383238", ">>> "] {
        assert!(
            !capped.contains(needle),
            "capped log shows {needle:?}:\n{capped}"
        );
    }
}

/// A log sink shared with the test.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Sink {
    fn clear(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Sink {
    type Writer = Sink;
    fn make_writer(&'a self) -> Sink {
        self.clone()
    }
}

/// Two subscribers' worth of logs at TRACE: one uncapped (to prove the crate does log the
/// PIN), one through `capped_log_filter` (given a directive that slips past its rewrite) and
/// `passes_log_cap`, as the daemon installs them. The `log` records of
/// the yubikey crate reach tracing through the LogTracer that `try_init` installs.
fn logs() -> &'static (Sink, Sink) {
    static LOGS: OnceLock<(Sink, Sink)> = OnceLock::new();
    LOGS.get_or_init(|| {
        use tracing_subscriber::filter::{filter_fn, FilterExt as _};
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        use tracing_subscriber::{fmt, EnvFilter, Layer as _};
        let raw = Sink::default();
        let capped = Sink::default();
        tracing_subscriber::registry()
            .with(
                fmt::layer()
                    .with_ansi(false)
                    .with_writer(raw.clone())
                    .with_filter(EnvFilter::new("trace")),
            )
            .with(
                fmt::layer()
                    .with_ansi(false)
                    .with_writer(capped.clone())
                    .with_filter(
                        EnvFilter::new(piv::capped_log_filter("trace,yubikey:=trace"))
                            .and(filter_fn(piv::passes_log_cap)),
                    ),
            )
            .try_init()
            .expect("tracing subscriber");
        (raw, capped)
    })
}
