//! `virtual_piv`: a **test double** of a YubiKey's PIV application, for CI without hardware.
//!
//! It plugs into pcscd through the vsmartcard `vpcd` reader driver (Debian package
//! `vsmartcard-vpcd`): vpcd listens on 127.0.0.1:35963 for reader "Virtual PCD 00 00", this
//! program connects to it and answers APDUs like a YubiKey 5 (firmware 5.4.3 by default)
//! would, so the real `yubikey` crate code path and `yubico-piv-tool` can be tested end to
//! end through real pcscd.
//!
//! **It protects nothing.** Its private keys, PIN, PUK and management key live in this
//! process's memory and, with `--state`, in a plain JSON file. Never use it for a real key.
//!
//! ```text
//! virtual_piv [--addr 127.0.0.1:35963] [--state FILE] [--serial N] [--version 5.4.3]
//!             [--pin 123456]
//! ```
//!
//! - `--state FILE`: keep the card (keys, PIN and counters, management key, data objects)
//!   in FILE, rewritten after every change, and load it at start: a card that is killed
//!   and started again comes back with the same keys ("removed and reinserted").
//! - `--serial`, `--version`, `--pin`: only used when the state is new (the PIN must be 6 to
//!   8 characters; the PUK is 12345678 and the management key the factory default 3DES key
//!   010203…08 ×3).
//!
//! Wire protocol of vpcd (vsmartcard docs, "Creating a virtual smart card"): every message
//! is a 2-byte big-endian length and a payload; a 1-byte payload is a control command
//! (0 power off, 1 power on, 2 reset, 4 get ATR — only the last one is answered, with the
//! ATR); anything longer is a command APDU answered with a response APDU.
//!
//! Supported (PIV, NIST SP 800-73-4, and Yubico's extensions): SELECT (the PIV AID),
//! VERIFY (PIN, tries counter, 0x6983 when blocked, P1=FF to reset), CHANGE REFERENCE and
//! RESET RETRY (PIN/PUK), GENERAL AUTHENTICATE (ECDSA P-256 over a ≤32-byte digest, DER in
//! 7C/82; 3DES management key mutual and single challenge-response authentication),
//! GENERATE ASYMMETRIC (P-256 only), GET DATA / PUT DATA (any 5FC1xx/5FFFxx object, the
//! discovery object; 5FC109 read needs the PIN), command chaining (CLA 0x10) and response
//! chaining (61xx + GET RESPONSE), and the YubiKey instructions GET VERSION (FD), GET
//! SERIAL (F8), GET METADATA (F7, firmware ≥ 5.3), IMPORT KEY (FE, P-256), ATTEST (F9,
//! generated keys, signed by an attestation key in slot F9 made at first start), SET
//! MANAGEMENT KEY (FF, 3DES) and RESET (FB, when PIN and PUK are blocked).
//! Not supported: RSA, P-384, Ed25519/X25519, ECDH (tag 85), AES management keys, SET PIN
//! RETRIES, secure messaging, extended-length APDUs. Touch is simulated as granted at once.
//! Attestation certificates carry no Yubico extensions.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::str::FromStr as _;
use std::time::Duration;

use des::cipher::{Block, BlockDecrypt, BlockEncrypt, KeyInit};
use des::TdesEde3;
use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::ecdsa::{DerSignature, Signature, SigningKey, VerifyingKey};
use p256::pkcs8::EncodePublicKey as _;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use x509_cert::builder::{Builder as _, CertificateBuilder, Profile};
use x509_cert::der::{Decode as _, Encode as _};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::Validity;

/// The answer-to-reset of a YubiKey 5 NFC over USB (T=1, "YubiKey@" in the historical bytes).
const ATR: &[u8] = &[
    0x3b, 0xfd, 0x13, 0x00, 0x00, 0x81, 0x31, 0xfe, 0x15, 0x80, 0x73, 0xc0, 0x21, 0xc0, 0x57, 0x59,
    0x75, 0x62, 0x69, 0x4b, 0x65, 0x79, 0x40,
];
const PIV_AID: &[u8] = &[0xa0, 0x00, 0x00, 0x03, 0x08];
/// The OpenPGP applet's AID (as gpg's scdaemon selects it): selecting it leaves PIV, as on a
/// real YubiKey; this card then knows no instruction until PIV is selected again.
const OPENPGP_AID: &[u8] = &[0xd2, 0x76, 0x00, 0x01, 0x24, 0x01];
const DEFAULT_MGM: [u8; 24] = [
    1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8,
];
const DEFAULT_PIN: &str = "123456";
const DEFAULT_PUK: &str = "12345678";
const MAX_TRIES: u8 = 3;
/// Largest response data in one R-APDU; the rest follows with 61xx / GET RESPONSE.
const CHUNK: usize = 256;
/// Object 5FC109 ("printed information"), where the PIN-protected management key lives.
const OBJ_PRINTED: &str = "5fc109";
/// Object of the attestation certificate (slot F9).
const OBJ_ATTESTATION: &str = "5fff01";

// Status words.
const SW_OK: u16 = 0x9000;
const SW_WRONG_LENGTH: u16 = 0x6700;
const SW_SECURITY: u16 = 0x6982;
const SW_BLOCKED: u16 = 0x6983;
const SW_CONDITIONS: u16 = 0x6985;
const SW_WRONG_DATA: u16 = 0x6a80;
const SW_NOT_FOUND: u16 = 0x6a82;
const SW_WRONG_P1P2: u16 = 0x6a86;
const SW_BAD_SLOT: u16 = 0x6b00;
const SW_INS: u16 = 0x6d00;
const SW_CLA: u16 = 0x6e00;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;
/// A command's answer: response data and status word, or an error status word.
type Reply = std::result::Result<(Vec<u8>, u16), u16>;

fn main() -> Result<()> {
    let args = Args::parse()?;
    let mut card = Card::load_or_create(&args)?;
    eprintln!(
        "virtual_piv: TEST DOUBLE of a YubiKey PIV card (keys in memory{}), serial {}, \
         firmware {}.{}.{}, connecting to vpcd at {}",
        match &args.state {
            Some(p) => format!(" and in {}", p.display()),
            None => String::new(),
        },
        card.state.serial,
        card.state.version[0],
        card.state.version[1],
        card.state.version[2],
        args.addr
    );
    loop {
        match TcpStream::connect(&args.addr) {
            Ok(stream) => {
                eprintln!("virtual_piv: inserted into the virtual reader");
                if let Err(e) = serve(stream, &mut card) {
                    eprintln!("virtual_piv: connection to vpcd ended: {e}");
                }
                card.session = Session::default();
            }
            // pcscd (and with it vpcd) not up yet: keep trying, like a card waiting for a reader.
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

struct Args {
    addr: String,
    state: Option<PathBuf>,
    serial: u32,
    version: [u8; 3],
    pin: String,
}

impl Args {
    fn parse() -> Result<Args> {
        let mut args = Args {
            addr: "127.0.0.1:35963".into(),
            state: None,
            serial: 12_345_678,
            version: [5, 4, 3],
            pin: DEFAULT_PIN.into(),
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--addr" => args.addr = value()?,
                "--state" => args.state = Some(PathBuf::from(value()?)),
                "--serial" => args.serial = value()?.parse()?,
                "--version" => {
                    let v = value()?;
                    let parts: Vec<u8> = v
                        .split('.')
                        .map(u8::from_str)
                        .collect::<std::result::Result<_, _>>()?;
                    args.version = parts
                        .try_into()
                        .map_err(|_| format!("--version {v}: expected MAJOR.MINOR.PATCH"))?;
                }
                "--pin" => args.pin = value()?,
                "-h" | "--help" => {
                    println!(
                        "virtual_piv [--addr HOST:PORT] [--state FILE] [--serial N] \
                         [--version X.Y.Z] [--pin PIN]\nA TEST DOUBLE of a YubiKey PIV card \
                         for vpcd/pcscd: it keeps its private keys in memory and in FILE."
                    );
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?} (try --help)").into()),
            }
        }
        if !(6..=8).contains(&args.pin.len()) {
            return Err("--pin must be 6 to 8 characters".into());
        }
        Ok(args)
    }
}

/// A key in a slot.
#[derive(Clone, Serialize, Deserialize)]
struct SlotKey {
    /// The private scalar, hex. In the clear: this is a test double.
    d: String,
    pin_policy: u8,
    touch_policy: u8,
    /// 1 generated on the card, 2 imported.
    origin: u8,
}

/// Everything that survives a power cycle (and, with `--state`, a restart).
#[derive(Clone, Serialize, Deserialize)]
struct State {
    serial: u32,
    version: [u8; 3],
    /// 8 bytes, 0xFF-padded, hex.
    pin: String,
    puk: String,
    pin_tries: u8,
    puk_tries: u8,
    pin_is_default: bool,
    puk_is_default: bool,
    mgm_key: String,
    /// Slot byte as two hex digits → key.
    slots: BTreeMap<String, SlotKey>,
    /// Object tag as hex (`5fc10a`) → the value inside its 0x53 wrapper, hex.
    objects: BTreeMap<String, String>,
}

/// Volatile security state: cleared by power-off, reset and (re)selection.
#[derive(Default)]
struct Session {
    pin_verified: bool,
    /// Set by a successful VERIFY, consumed by the next signature (PIN policy "always").
    pin_fresh: bool,
    mgm_authenticated: bool,
    /// Witness sent in a mutual authentication, awaiting the host's decryption.
    witness: Option<[u8; 8]>,
    /// Challenge sent in a single challenge-response, awaiting the host's encryption.
    challenge: Option<[u8; 8]>,
    /// Command data gathered from chained APDUs (CLA 0x10) and their header.
    chain: Vec<u8>,
    chain_ins: Option<(u8, u8, u8)>,
    /// Response data not yet fetched with GET RESPONSE.
    pending: Vec<u8>,
}

struct Card {
    /// `VIRTUAL_PIV_TRACE=1`: log APDU headers and status words (never their data).
    trace: bool,
    state: State,
    path: Option<PathBuf>,
    session: Session,
    /// Another applet (OpenPGP) is selected: PIV answers nothing until selected again.
    elsewhere: bool,
}

fn trace_enabled() -> bool {
    std::env::var_os("VIRTUAL_PIV_TRACE").is_some_and(|v| v != "0")
}

fn pad8(text: &str) -> [u8; 8] {
    let mut out = [0xffu8; 8];
    out[..text.len()].copy_from_slice(text.as_bytes());
    out
}

fn unhex(text: &str) -> Vec<u8> {
    hex::decode(text).unwrap_or_default()
}

impl Card {
    fn load_or_create(args: &Args) -> Result<Card> {
        if let Some(path) = &args.state {
            if path.exists() {
                let text = std::fs::read_to_string(path)?;
                let state: State = serde_json::from_str(&text)
                    .map_err(|e| format!("{}: not a virtual_piv state: {e}", path.display()))?;
                return Ok(Card {
                    trace: trace_enabled(),
                    state,
                    path: Some(path.clone()),
                    session: Session::default(),
                    elsewhere: false,
                });
            }
        }
        let mut card = Card {
            trace: trace_enabled(),
            state: State {
                serial: args.serial,
                version: args.version,
                pin: hex::encode(pad8(&args.pin)),
                puk: hex::encode(pad8(DEFAULT_PUK)),
                pin_tries: MAX_TRIES,
                puk_tries: MAX_TRIES,
                pin_is_default: args.pin == DEFAULT_PIN,
                puk_is_default: true,
                mgm_key: hex::encode(DEFAULT_MGM),
                slots: BTreeMap::new(),
                objects: BTreeMap::new(),
            },
            path: args.state.clone(),
            session: Session::default(),
            elsewhere: false,
        };
        card.make_attestation_key()?;
        card.save()?;
        Ok(card)
    }

    /// Writes the state file atomically (temp file + rename), when there is one.
    fn save(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&self.state)?)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// The factory attestation key (slot F9) and its self-signed certificate.
    fn make_attestation_key(&mut self) -> Result<()> {
        let key = SigningKey::random(&mut rand::rngs::OsRng);
        let subject = Name::from_str("CN=Virtual PIV Attestation (TEST DOUBLE)")?;
        let cert = build_certificate(Profile::Root, subject, spki(key.verifying_key())?, &key)?;
        self.state.slots.insert(
            "f9".into(),
            SlotKey {
                d: hex::encode(key.to_bytes()),
                pin_policy: 1,
                touch_policy: 1,
                origin: 1,
            },
        );
        self.state
            .objects
            .insert(OBJ_ATTESTATION.into(), hex::encode(cert_object(&cert)));
        Ok(())
    }

    fn key(&self, slot: u8) -> Option<(SigningKey, &SlotKey)> {
        let entry = self.state.slots.get(&format!("{slot:02x}"))?;
        let key = SigningKey::from_slice(&unhex(&entry.d)).ok()?;
        Some((key, entry))
    }

    fn mgm_cipher(&self) -> Option<TdesEde3> {
        TdesEde3::new_from_slice(&unhex(&self.state.mgm_key)).ok()
    }

    /// Handles one command APDU, returning the response APDU (data + SW1 SW2).
    fn transmit(&mut self, apdu: &[u8]) -> Vec<u8> {
        let (data, sw) = match parse_apdu(apdu) {
            Some(cmd) => {
                let header = (cmd.cla, cmd.ins, cmd.p1, cmd.p2, cmd.data.len());
                let (data, sw) = self.dispatch(cmd);
                if self.trace {
                    // Headers and status only: command data may hold a PIN or a key.
                    let (cla, ins, p1, p2, lc) = header;
                    eprintln!(
                        "virtual_piv: {cla:02x} {ins:02x} {p1:02x} {p2:02x} Lc={lc} -> {} bytes, {sw:04x}",
                        data.len()
                    );
                }
                (data, sw)
            }
            None => (Vec::new(), SW_WRONG_LENGTH),
        };
        self.respond(data, sw)
    }

    /// Sends at most [`CHUNK`] bytes now and keeps the rest for GET RESPONSE.
    fn respond(&mut self, mut data: Vec<u8>, sw: u16) -> Vec<u8> {
        let mut sw = sw;
        if data.len() > CHUNK {
            self.session.pending = data.split_off(CHUNK);
            sw = 0x6100 | self.session.pending.len().min(0xff) as u16;
        }
        data.extend_from_slice(&sw.to_be_bytes());
        data
    }

    fn dispatch(&mut self, cmd: Apdu) -> (Vec<u8>, u16) {
        if cmd.cla & !0x10 != 0 {
            return (Vec::new(), SW_CLA);
        }
        if cmd.ins != 0xc0 {
            self.session.pending.clear();
        }
        // Command chaining: gather the data of CLA 0x10 APDUs, run the command on the last.
        let mut data = cmd.data;
        if cmd.cla & 0x10 != 0 {
            if self
                .session
                .chain_ins
                .is_some_and(|h| h != (cmd.ins, cmd.p1, cmd.p2))
            {
                self.session.chain.clear();
            }
            self.session.chain_ins = Some((cmd.ins, cmd.p1, cmd.p2));
            self.session.chain.extend_from_slice(&data);
            return (Vec::new(), SW_OK);
        }
        if self.session.chain_ins.take() == Some((cmd.ins, cmd.p1, cmd.p2)) {
            let mut all = std::mem::take(&mut self.session.chain);
            all.extend_from_slice(&data);
            data = all;
        } else {
            self.session.chain.clear();
        }
        let (p1, p2) = (cmd.p1, cmd.p2);
        let result = match cmd.ins {
            0xa4 => self.select(p1, &data),
            _ if self.elsewhere => Err(SW_INS),
            0xc0 => {
                let rest = std::mem::take(&mut self.session.pending);
                Ok((rest, SW_OK))
            }
            0xfd => Ok((self.state.version.to_vec(), SW_OK)),
            0xf8 => Ok((self.state.serial.to_be_bytes().to_vec(), SW_OK)),
            0x20 => self.verify(p1, p2, &data),
            0x24 => self.change_reference(p2, &data),
            0x2c => self.reset_retry(p2, &data),
            0x87 => self.general_authenticate(p1, p2, &data),
            0x47 => self.generate(p2, &data),
            0xfe => self.import(p1, p2, &data),
            0xcb => self.get_data(p1, p2, &data),
            0xdb => self.put_data(p1, p2, &data),
            0xf7 => self.metadata(p2),
            0xf9 => self.attest(p1),
            0xff => self.set_management_key(p1, p2, &data),
            0xfb => self.reset(),
            _ => Err(SW_INS),
        };
        match result {
            Ok(ok) => ok,
            Err(sw) => (Vec::new(), sw),
        }
    }

    /// Commands that change keys or objects need the management key authenticated.
    fn require_mgm(&self) -> std::result::Result<(), u16> {
        if self.session.mgm_authenticated {
            Ok(())
        } else {
            Err(SW_SECURITY)
        }
    }

    fn select(&mut self, p1: u8, aid: &[u8]) -> Reply {
        if p1 == 0x04 && aid.starts_with(OPENPGP_AID) {
            self.session = Session::default();
            self.elsewhere = true;
            return Ok((Vec::new(), SW_OK));
        }
        if p1 != 0x04 || aid.len() < PIV_AID.len() || &aid[..PIV_AID.len()] != PIV_AID {
            return Err(SW_NOT_FOUND);
        }
        self.session = Session::default();
        self.elsewhere = false;
        // Application property template: the PIV application identifier and its authority.
        let mut apt = tlv(0x4f, &[0x00, 0x00, 0x10, 0x00, 0x01, 0x00]);
        apt.extend(tlv(0x79, &tlv(0x4f, PIV_AID)));
        Ok((tlv(0x61, &apt), SW_OK))
    }

    fn verify(&mut self, p1: u8, p2: u8, data: &[u8]) -> Reply {
        if p2 != 0x80 {
            return Err(SW_WRONG_P1P2);
        }
        if p1 == 0xff {
            self.session.pin_verified = false;
            self.session.pin_fresh = false;
            return Ok((Vec::new(), SW_OK));
        }
        if data.is_empty() {
            // Status query: no try is spent.
            if self.state.pin_tries == 0 {
                return Err(SW_BLOCKED);
            }
            if self.session.pin_verified {
                return Ok((Vec::new(), SW_OK));
            }
            return Err(0x63c0 | u16::from(self.state.pin_tries));
        }
        if data.len() != 8 {
            return Err(SW_WRONG_DATA);
        }
        let ok = self.check_secret(true, data)?;
        if ok {
            self.session.pin_verified = true;
            self.session.pin_fresh = true;
            Ok((Vec::new(), SW_OK))
        } else {
            self.session.pin_verified = false;
            Err(0x63c0 | u16::from(self.state.pin_tries))
        }
    }

    /// Compares `given` with the PIN (or PUK), counting tries. Err(0x6983) when blocked.
    fn check_secret(&mut self, pin: bool, given: &[u8]) -> std::result::Result<bool, u16> {
        let (stored, tries) = if pin {
            (unhex(&self.state.pin), self.state.pin_tries)
        } else {
            (unhex(&self.state.puk), self.state.puk_tries)
        };
        if tries == 0 {
            return Err(SW_BLOCKED);
        }
        let ok = stored == given;
        let left = if ok { MAX_TRIES } else { tries - 1 };
        if pin {
            self.state.pin_tries = left;
        } else {
            self.state.puk_tries = left;
        }
        let _ = self.save();
        Ok(ok)
    }

    fn change_reference(&mut self, p2: u8, data: &[u8]) -> Reply {
        let pin = match p2 {
            0x80 => true,
            0x81 => false,
            _ => return Err(SW_WRONG_P1P2),
        };
        if data.len() != 16 {
            return Err(SW_WRONG_DATA);
        }
        let new = valid_secret(&data[8..])?;
        if !self.check_secret(pin, &data[..8])? {
            let tries = if pin {
                self.state.pin_tries
            } else {
                self.state.puk_tries
            };
            return Err(0x63c0 | u16::from(tries));
        }
        if pin {
            self.state.pin = hex::encode(new);
            self.state.pin_is_default = false;
        } else {
            self.state.puk = hex::encode(new);
            self.state.puk_is_default = false;
        }
        let _ = self.save();
        Ok((Vec::new(), SW_OK))
    }

    fn reset_retry(&mut self, p2: u8, data: &[u8]) -> Reply {
        if p2 != 0x80 {
            return Err(SW_WRONG_P1P2);
        }
        if data.len() != 16 {
            return Err(SW_WRONG_DATA);
        }
        let new = valid_secret(&data[8..])?;
        if !self.check_secret(false, &data[..8])? {
            return Err(0x63c0 | u16::from(self.state.puk_tries));
        }
        self.state.pin = hex::encode(new);
        self.state.pin_tries = MAX_TRIES;
        let _ = self.save();
        Ok((Vec::new(), SW_OK))
    }

    fn general_authenticate(&mut self, alg: u8, slot: u8, data: &[u8]) -> Reply {
        let template = parse_tlvs(data).ok_or(SW_WRONG_DATA)?;
        let inner = match template.as_slice() {
            [(0x7c, inner)] => parse_tlvs(inner).ok_or(SW_WRONG_DATA)?,
            _ => return Err(SW_WRONG_DATA),
        };
        let get = |tag: u8| {
            inner
                .iter()
                .find(|(t, _)| *t == tag)
                .map(|(_, v)| v.as_slice())
        };
        if slot == 0x9b {
            if alg != 0x03 {
                return Err(SW_WRONG_DATA);
            }
            let cipher = self.mgm_cipher().ok_or(SW_CONDITIONS)?;
            return match (get(0x80), get(0x81), get(0x82)) {
                // Mutual authentication, step 1: the host asks for an encrypted witness.
                (Some([]), None, None) => {
                    let mut witness = [0u8; 8];
                    rand::rngs::OsRng.fill_bytes(&mut witness);
                    self.session.witness = Some(witness);
                    self.session.mgm_authenticated = false;
                    let block = des_block(&cipher, &witness, true);
                    Ok((tlv(0x7c, &tlv(0x80, &block)), SW_OK))
                }
                // Step 2: the decrypted witness proves the host's key; answer its challenge.
                (Some(decrypted), Some(challenge), None)
                    if decrypted.len() == 8 && challenge.len() == 8 =>
                {
                    match self.session.witness.take() {
                        Some(w) if w == decrypted => {
                            self.session.mgm_authenticated = true;
                            let block = des_block(&cipher, challenge, true);
                            Ok((tlv(0x7c, &tlv(0x82, &block)), SW_OK))
                        }
                        _ => Err(SW_SECURITY),
                    }
                }
                // Single challenge-response: the card sends a challenge...
                (None, Some([]), None) => {
                    let mut challenge = [0u8; 8];
                    rand::rngs::OsRng.fill_bytes(&mut challenge);
                    self.session.challenge = Some(challenge);
                    self.session.mgm_authenticated = false;
                    Ok((tlv(0x7c, &tlv(0x81, &challenge)), SW_OK))
                }
                // ...and the host answers with it encrypted.
                (None, None, Some(response)) if response.len() == 8 => {
                    let Some(challenge) = self.session.challenge.take() else {
                        return Err(SW_SECURITY);
                    };
                    if des_block(&cipher, response, false) == challenge {
                        self.session.mgm_authenticated = true;
                        Ok((Vec::new(), SW_OK))
                    } else {
                        Err(SW_SECURITY)
                    }
                }
                _ => Err(SW_WRONG_DATA),
            };
        }
        if !is_key_slot(slot) {
            return Err(SW_BAD_SLOT);
        }
        if alg != 0x11 {
            return Err(SW_WRONG_DATA);
        }
        let (key, entry) = self.key(slot).ok_or(SW_WRONG_DATA)?;
        let (Some([]), Some(digest)) = (get(0x82), get(0x81)) else {
            // ECDH (tag 0x85) and anything else is not implemented.
            return Err(SW_WRONG_DATA);
        };
        match entry.pin_policy {
            1 => {}
            3 if !self.session.pin_fresh => return Err(SW_SECURITY),
            _ if !self.session.pin_verified => return Err(SW_SECURITY),
            _ => {}
        }
        if digest.is_empty() || digest.len() > 32 {
            return Err(SW_WRONG_DATA);
        }
        let mut padded = [0u8; 32];
        padded[32 - digest.len()..].copy_from_slice(digest);
        let sig: Signature = key.sign_prehash(&padded).map_err(|_| SW_WRONG_DATA)?;
        self.session.pin_fresh = false;
        // Cards don't normalize S: emit the high-S twin half of the time, as hardware does.
        let sig = if rand::rngs::OsRng.next_u32() & 1 == 1 {
            let (r, s) = sig.split_scalars();
            Signature::from_scalars(r, -*s).unwrap_or(sig)
        } else {
            sig
        };
        let der = sig.to_der();
        Ok((tlv(0x7c, &tlv(0x82, der.as_bytes())), SW_OK))
    }

    fn policies(slot: u8, tlvs: &[(u8, Vec<u8>)]) -> std::result::Result<(u8, u8), u16> {
        let mut pin = match slot {
            0x9e => 1,
            0x9c => 3,
            _ => 2,
        };
        let mut touch = 1;
        for (tag, value) in tlvs {
            match (tag, value.as_slice()) {
                (0xaa, [0]) | (0xab, [0]) => {}
                (0xaa, [p @ 1..=3]) => pin = *p,
                (0xab, [t @ 1..=3]) => touch = *t,
                (0xaa | 0xab, _) => return Err(SW_WRONG_DATA),
                _ => {}
            }
        }
        Ok((pin, touch))
    }

    fn store_key(&mut self, slot: u8, key: &SigningKey, pin: u8, touch: u8, origin: u8) {
        self.state.slots.insert(
            format!("{slot:02x}"),
            SlotKey {
                d: hex::encode(key.to_bytes()),
                pin_policy: pin,
                touch_policy: touch,
                origin,
            },
        );
        let _ = self.save();
    }

    fn generate(&mut self, slot: u8, data: &[u8]) -> Reply {
        self.require_mgm()?;
        if !is_key_slot(slot) {
            return Err(SW_BAD_SLOT);
        }
        let outer = parse_tlvs(data).ok_or(SW_WRONG_DATA)?;
        let [(0xac, inner)] = outer.as_slice() else {
            return Err(SW_WRONG_DATA);
        };
        let tlvs = parse_tlvs(inner).ok_or(SW_WRONG_DATA)?;
        if !tlvs
            .iter()
            .any(|(t, v)| *t == 0x80 && v.as_slice() == [0x11])
        {
            return Err(SW_WRONG_DATA); // only ECC P-256
        }
        let (pin, touch) = Self::policies(slot, &tlvs)?;
        let key = SigningKey::random(&mut rand::rngs::OsRng);
        self.store_key(slot, &key, pin, touch, 1);
        let point = key.verifying_key().to_encoded_point(false);
        Ok((tlv2(0x7f49, &tlv(0x86, point.as_bytes())), SW_OK))
    }

    fn import(&mut self, alg: u8, slot: u8, data: &[u8]) -> Reply {
        self.require_mgm()?;
        if !is_key_slot(slot) {
            return Err(SW_BAD_SLOT);
        }
        if alg != 0x11 {
            return Err(SW_WRONG_DATA);
        }
        let tlvs = parse_tlvs(data).ok_or(SW_WRONG_DATA)?;
        let scalar = tlvs
            .iter()
            .find(|(t, _)| *t == 0x06)
            .map(|(_, v)| v.as_slice())
            .ok_or(SW_WRONG_DATA)?;
        let key = SigningKey::from_slice(scalar).map_err(|_| SW_WRONG_DATA)?;
        let (pin, touch) = Self::policies(slot, &tlvs)?;
        self.store_key(slot, &key, pin, touch, 2);
        Ok((Vec::new(), SW_OK))
    }

    fn object_tag(p1: u8, p2: u8, data: &[u8]) -> std::result::Result<(String, Vec<u8>), u16> {
        if (p1, p2) != (0x3f, 0xff) {
            return Err(SW_WRONG_P1P2);
        }
        let tlvs = parse_tlvs(data).ok_or(SW_WRONG_DATA)?;
        let Some((0x5c, tag)) = tlvs.first() else {
            return Err(SW_WRONG_DATA);
        };
        let rest = tlvs
            .iter()
            .skip(1)
            .find(|(t, _)| *t == 0x53)
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        Ok((hex::encode(tag), rest))
    }

    fn get_data(&mut self, p1: u8, p2: u8, data: &[u8]) -> Reply {
        let (tag, _) = Self::object_tag(p1, p2, data)?;
        if tag == "7e" {
            // Discovery object: the PIV AID and the PIN usage policy (PIN only).
            let mut body = tlv(
                0x4f,
                &[
                    0xa0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x10, 0x00, 0x01, 0x00,
                ],
            );
            body.extend(tlv2(0x5f2f, &[0x40, 0x00]));
            return Ok((tlv(0x7e, &body), SW_OK));
        }
        if tag == OBJ_PRINTED && !self.session.pin_verified {
            return Err(SW_SECURITY);
        }
        let value = self.state.objects.get(&tag).ok_or(SW_NOT_FOUND)?;
        Ok((tlv(0x53, &unhex(value)), SW_OK))
    }

    fn put_data(&mut self, p1: u8, p2: u8, data: &[u8]) -> Reply {
        self.require_mgm()?;
        let (tag, value) = Self::object_tag(p1, p2, data)?;
        if value.is_empty() {
            self.state.objects.remove(&tag);
        } else {
            self.state.objects.insert(tag, hex::encode(value));
        }
        let _ = self.save();
        Ok((Vec::new(), SW_OK))
    }

    fn metadata(&mut self, slot: u8) -> Reply {
        if self.state.version < [5, 3, 0] {
            return Err(SW_INS);
        }
        let mut out = Vec::new();
        match slot {
            0x80 | 0x81 => {
                let (default, tries) = if slot == 0x80 {
                    (self.state.pin_is_default, self.state.pin_tries)
                } else {
                    (self.state.puk_is_default, self.state.puk_tries)
                };
                out.extend(tlv(0x01, &[0xff]));
                out.extend(tlv(0x05, &[u8::from(default)]));
                out.extend(tlv(0x06, &[MAX_TRIES, tries]));
            }
            0x9b => {
                out.extend(tlv(0x01, &[0x03]));
                out.extend(tlv(0x02, &[0x00, 0x01]));
                out.extend(tlv(
                    0x05,
                    &[u8::from(self.state.mgm_key == hex::encode(DEFAULT_MGM))],
                ));
            }
            _ => {
                let (key, entry) = self.key(slot).ok_or(SW_NOT_FOUND)?;
                out.extend(tlv(0x01, &[0x11]));
                out.extend(tlv(0x02, &[entry.pin_policy, entry.touch_policy]));
                out.extend(tlv(0x03, &[entry.origin]));
                let point = key.verifying_key().to_encoded_point(false);
                out.extend(tlv(0x04, &tlv(0x86, point.as_bytes())));
            }
        }
        Ok((out, SW_OK))
    }

    fn attest(&mut self, slot: u8) -> Reply {
        if !is_key_slot(slot) {
            return Err(SW_BAD_SLOT);
        }
        let (key, entry) = self.key(slot).ok_or(SW_NOT_FOUND)?;
        if entry.origin != 1 {
            return Err(SW_WRONG_DATA); // only keys generated on the card can be attested
        }
        let (ca_key, _) = self.key(0xf9).ok_or(SW_CONDITIONS)?;
        let ca_object = unhex(
            self.state
                .objects
                .get(OBJ_ATTESTATION)
                .ok_or(SW_CONDITIONS)?,
        );
        let ca_der = cert_from_object(&ca_object).ok_or(SW_CONDITIONS)?;
        let ca = x509_cert::Certificate::from_der(&ca_der).map_err(|_| SW_CONDITIONS)?;
        let issuer = ca.tbs_certificate.subject.clone();
        let subject = Name::from_str(&format!("CN=YubiKey PIV Attestation {slot:02x}"))
            .map_err(|_| SW_CONDITIONS)?;
        let public = spki(key.verifying_key()).map_err(|_| SW_CONDITIONS)?;
        let cert = build_certificate(
            Profile::Manual {
                issuer: Some(issuer),
            },
            subject,
            public,
            &ca_key,
        )
        .map_err(|_| SW_CONDITIONS)?;
        Ok((cert, SW_OK))
    }

    fn set_management_key(&mut self, p1: u8, p2: u8, data: &[u8]) -> Reply {
        self.require_mgm()?;
        if p1 != 0xff || !(p2 == 0xff || p2 == 0xfe) {
            return Err(SW_WRONG_P1P2);
        }
        match data {
            [0x03, 0x9b, 24, key @ ..] if key.len() == 24 => {
                self.state.mgm_key = hex::encode(key);
                let _ = self.save();
                Ok((Vec::new(), SW_OK))
            }
            _ => Err(SW_WRONG_DATA), // 3DES only
        }
    }

    fn reset(&mut self) -> Reply {
        if self.state.pin_tries != 0 || self.state.puk_tries != 0 {
            return Err(SW_CONDITIONS);
        }
        let serial = self.state.serial;
        let version = self.state.version;
        let attestation_key = self.state.slots.get("f9").cloned();
        let attestation_cert = self.state.objects.get(OBJ_ATTESTATION).cloned();
        self.state = State {
            serial,
            version,
            pin: hex::encode(pad8(DEFAULT_PIN)),
            puk: hex::encode(pad8(DEFAULT_PUK)),
            pin_tries: MAX_TRIES,
            puk_tries: MAX_TRIES,
            pin_is_default: true,
            puk_is_default: true,
            mgm_key: hex::encode(DEFAULT_MGM),
            slots: BTreeMap::new(),
            objects: BTreeMap::new(),
        };
        if let (Some(k), Some(c)) = (attestation_key, attestation_cert) {
            self.state.slots.insert("f9".into(), k);
            self.state.objects.insert(OBJ_ATTESTATION.into(), c);
        }
        self.session = Session::default();
        let _ = self.save();
        Ok((Vec::new(), SW_OK))
    }
}

/// Encrypts (or decrypts) one 8-byte block with the management key. `input` is 8 bytes long.
fn des_block(cipher: &TdesEde3, input: &[u8], encrypt: bool) -> [u8; 8] {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&input[..8]);
    let mut block = Block::<TdesEde3>::from(bytes);
    if encrypt {
        cipher.encrypt_block(&mut block);
    } else {
        cipher.decrypt_block(&mut block);
    }
    block.into()
}

/// Checks a new 0xFF-padded PIN or PUK (6 to 8 bytes) and returns it padded.
fn valid_secret(padded: &[u8]) -> std::result::Result<[u8; 8], u16> {
    let len = padded
        .iter()
        .position(|b| *b == 0xff)
        .unwrap_or(padded.len());
    if len < 6 || padded[len..].iter().any(|b| *b != 0xff) {
        return Err(SW_WRONG_DATA);
    }
    let mut out = [0xffu8; 8];
    out[..len].copy_from_slice(&padded[..len]);
    Ok(out)
}

fn is_key_slot(slot: u8) -> bool {
    matches!(slot, 0x9a | 0x9c | 0x9d | 0x9e | 0x82..=0x95)
}

struct Apdu {
    cla: u8,
    ins: u8,
    p1: u8,
    p2: u8,
    data: Vec<u8>,
}

/// Parses a short APDU (cases 1 to 4). Extended lengths are not supported.
fn parse_apdu(bytes: &[u8]) -> Option<Apdu> {
    if bytes.len() < 4 {
        return None;
    }
    let (header, body) = bytes.split_at(4);
    let data = match body.len() {
        0 | 1 => Vec::new(), // no data, maybe Le
        n => {
            let lc = usize::from(body[0]);
            if lc == 0 || (n != lc + 1 && n != lc + 2) {
                return None;
            }
            body[1..=lc].to_vec()
        }
    };
    Some(Apdu {
        cla: header[0],
        ins: header[1],
        p1: header[2],
        p2: header[3],
        data,
    })
}

fn encode_len(len: usize, out: &mut Vec<u8>) {
    match len {
        0..=0x7f => out.push(len as u8),
        0x80..=0xff => out.extend([0x81, len as u8]),
        _ => out.extend([0x82, (len >> 8) as u8, len as u8]),
    }
}

/// BER-TLV with a one-byte tag.
fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    encode_len(value.len(), &mut out);
    out.extend_from_slice(value);
    out
}

/// BER-TLV with a two-byte tag (`7F49`, `5F2F`).
fn tlv2(tag: u16, value: &[u8]) -> Vec<u8> {
    let mut out = tag.to_be_bytes().to_vec();
    encode_len(value.len(), &mut out);
    out.extend_from_slice(value);
    out
}

/// Parses a sequence of one-byte-tag BER-TLVs; None when malformed.
fn parse_tlvs(mut data: &[u8]) -> Option<Vec<(u8, Vec<u8>)>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let tag = data[0];
        let (len, header) = match *data.get(1)? {
            n @ 0..=0x7f => (usize::from(n), 2),
            0x81 => (usize::from(*data.get(2)?), 3),
            0x82 => (
                (usize::from(*data.get(2)?) << 8) | usize::from(*data.get(3)?),
                4,
            ),
            _ => return None,
        };
        let value = data.get(header..header + len)?;
        out.push((tag, value.to_vec()));
        data = &data[header + len..];
    }
    Some(out)
}

fn spki(key: &VerifyingKey) -> Result<SubjectPublicKeyInfoOwned> {
    let der = key.to_public_key_der()?;
    Ok(SubjectPublicKeyInfoOwned::from_der(der.as_bytes())?)
}

/// A certificate signed by `signer`, valid for ten years, DER.
fn build_certificate(
    profile: Profile,
    subject: Name,
    public: SubjectPublicKeyInfoOwned,
    signer: &SigningKey,
) -> Result<Vec<u8>> {
    let mut serial = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut serial);
    serial[0] &= 0x7f;
    let validity = Validity::from_now(Duration::from_secs(10 * 365 * 24 * 3600))?;
    let builder = CertificateBuilder::new(
        profile,
        SerialNumber::new(&serial)?,
        validity,
        subject,
        public,
        signer,
    )?;
    let cert = builder.build::<DerSignature>()?;
    Ok(cert.to_der()?)
}

/// The PIV certificate object: 70 cert, 71 00 (not compressed), FE 00 (LRC).
fn cert_object(der: &[u8]) -> Vec<u8> {
    let mut out = tlv(0x70, der);
    out.extend(tlv(0x71, &[0x00]));
    out.extend(tlv(0xfe, &[]));
    out
}

fn cert_from_object(object: &[u8]) -> Option<Vec<u8>> {
    parse_tlvs(object)?
        .into_iter()
        .find(|(t, _)| *t == 0x70)
        .map(|(_, v)| v)
}

/// Serves vpcd on one connection until it closes.
fn serve(mut stream: TcpStream, card: &mut Card) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    loop {
        let mut len = [0u8; 2];
        stream.read_exact(&mut len)?;
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut msg)?;
        if card.trace && msg.len() == 1 {
            eprintln!("virtual_piv: vpcd control {:#04x}", msg[0]);
        }
        let reply = match msg.as_slice() {
            [0x00] | [0x01] | [0x02] => {
                // Power off, power on, reset: the volatile state is gone; no answer.
                card.session = Session::default();
                continue;
            }
            [0x04] => ATR.to_vec(),
            [other] => {
                eprintln!("virtual_piv: unknown vpcd control {other:#04x}");
                continue;
            }
            apdu => card.transmit(apdu),
        };
        let mut out = (reply.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&reply);
        stream.write_all(&out)?;
    }
}
