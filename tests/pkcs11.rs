//! The `pkcs11` backend against a real SoftHSM token: key management, signing through the
//! signer `Handle`, attributes read back on an independent path (cryptoki directly), wrong
//! PINs, concurrency, and recovery from session loss, logout and token removal.
//!
//! Every scenario loads SoftHSM in-process, so each runs in its own child process with its
//! own `SOFTHSM2_CONF` (see `common::softhsm::isolated`).

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};

use common::softhsm::{isolated, SoftHsm, MODULE, USER_PIN};
use common::{b64url_decode, bundle_json, ring_verify_der, ring_verify_raw};
use tm_agent::jose;
use tm_agent::signer::pin::PinSource;
use tm_agent::signer::pkcs11::{self, Pkcs11Settings};
use tm_agent::signer::{ActorOptions, Handle, SignerError};

const KEY_ID: &str = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn handle(settings: &Pkcs11Settings, sessions: usize) -> Handle {
    let mut s = settings.clone();
    s.sessions = sessions;
    let (info, workers) = pkcs11::open(&s, 0).expect("open the key");
    assert_eq!(workers.len(), sessions);
    Handle::spawn(
        info,
        workers,
        ActorOptions {
            name: "test-signer".into(),
            ..ActorOptions::default()
        },
    )
    .expect("spawn with self-test")
}

fn open_err(settings: &Pkcs11Settings) -> SignerError {
    match pkcs11::open(settings, 0) {
        Ok(_) => panic!("open succeeded"),
        Err(e) => e,
    }
}

/// A cryptoki context of our own on the same library (the test's independent path). The
/// backend may have initialized the library already: that is fine, the state is shared.
fn raw_ctx() -> Pkcs11 {
    let ctx = Pkcs11::new(MODULE).unwrap();
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => ctx,
        Err(e) => panic!("C_Initialize: {e}"),
    }
}

fn raw_slot(ctx: &Pkcs11, label: &str) -> Slot {
    ctx.get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).is_ok_and(|i| i.label() == label))
        .unwrap_or_else(|| panic!("token {label} not found"))
}

fn raw_login(session: &Session) {
    match session.login(UserType::User, Some(&AuthPin::from(USER_PIN))) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("C_Login: {e}"),
    }
}

fn uncompressed(key: &VerifyingKey) -> Vec<u8> {
    key.to_encoded_point(false).as_bytes().to_vec()
}

/// Checks an Auth API challenge body: the signature is 86 chars of base64url, 64 bytes raw
/// r||s, verifies over exactly `{key_id}.{timestamp}` with p256 and with ring (raw and DER).
fn check_challenge(body: &jose::ChallengeBody, key: &VerifyingKey, timestamp: i64) {
    assert_eq!(body.key_id, KEY_ID);
    assert_eq!(body.timestamp, timestamp);
    assert_eq!(body.signature.len(), 86);
    let raw = b64url_decode(&body.signature);
    assert_eq!(raw.len(), 64);
    let message = format!("{KEY_ID}.{timestamp}");
    let sig = Signature::from_slice(&raw).unwrap();
    assert!(sig.normalize_s().is_none(), "low-S");
    key.verify(message.as_bytes(), &sig).unwrap();
    ring_verify_raw(&uncompressed(key), message.as_bytes(), &raw);
}

#[test]
fn generated_key_signs_challenges_that_verify_independently() {
    isolated(
        "generated_key_signs_challenges_that_verify_independently",
        |hsm| {
            let settings = hsm.settings(Some("tm-gen"));
            let entry = pkcs11::generate(&settings, "tm-gen", None).unwrap();
            assert_eq!(entry.id.len(), pkcs11::GENERATED_ID_LEN);
            assert_eq!(entry.key_type, "EC P-256");
            let public = entry.public_key.expect("public key");
            assert_eq!(pkcs11::public(&settings).unwrap(), public);

            let h = handle(&settings, 2);
            assert_eq!(*h.public_key(), public);
            assert_eq!(h.info().backend, "pkcs11");
            assert!(h.info().hardware_backed);
            assert!(h.info().location.contains("tm-gen"));
            let rt = runtime();
            for ts in [1_700_000_000, 1_700_000_001, 1_700_000_002] {
                let body = rt.block_on(h.sign_challenge(KEY_ID, ts)).unwrap();
                check_challenge(&body, &public, ts);
            }
        },
    );
}

#[test]
fn imported_bundle_signs_with_the_bundle_key() {
    isolated("imported_bundle_signs_with_the_bundle_key", |hsm| {
        let sk = SigningKey::random(&mut rand::rngs::OsRng);
        let bundle = jose::parse_key_bundle(&bundle_json(&sk, KEY_ID)).unwrap();
        let settings = hsm.settings(Some("tm-imp"));
        let entry = pkcs11::import(&settings, &bundle, "tm-imp", None).unwrap();
        assert_eq!(entry.public_key, Some(*sk.verifying_key()));
        assert_eq!(entry.id, pkcs11::default_import_id(sk.verifying_key()));

        let h = handle(&settings, 1);
        assert_eq!(h.public_key(), sk.verifying_key());
        let rt = runtime();
        let body = rt
            .block_on(h.sign_challenge(KEY_ID, 1_700_000_123))
            .unwrap();
        check_challenge(&body, sk.verifying_key(), 1_700_000_123);

        // The same key again, under another label: refused (same derived CKA_ID).
        let err = pkcs11::import(&settings, &bundle, "tm-imp-2", None).unwrap_err();
        assert!(matches!(err, SignerError::KeyExists(_)), "{err}");
    });
}

#[test]
fn keys_are_sensitive_non_extractable_and_their_value_unreadable() {
    isolated(
        "keys_are_sensitive_non_extractable_and_their_value_unreadable",
        |hsm| {
            let settings = hsm.settings(None);
            pkcs11::generate(&settings, "gen", None).unwrap();
            let sk = SigningKey::random(&mut rand::rngs::OsRng);
            let bundle = jose::parse_key_bundle(&bundle_json(&sk, KEY_ID)).unwrap();
            pkcs11::import(&settings, &bundle, "imp", None).unwrap();

            // Independent path: cryptoki directly.
            let ctx = raw_ctx();
            let session = ctx.open_ro_session(raw_slot(&ctx, &hsm.label)).unwrap();
            raw_login(&session);
            for (label, generated) in [("gen", true), ("imp", false)] {
                let found = session
                    .find_objects(&[
                        Attribute::Class(ObjectClass::PRIVATE_KEY),
                        Attribute::Label(label.as_bytes().to_vec()),
                    ])
                    .unwrap();
                assert_eq!(found.len(), 1, "{label}");
                let key = found[0];
                let attrs = session
                    .get_attributes(
                        key,
                        &[
                            AttributeType::Sensitive,
                            AttributeType::Extractable,
                            AttributeType::NeverExtractable,
                            AttributeType::AlwaysSensitive,
                            AttributeType::Token,
                            AttributeType::Private,
                            AttributeType::Sign,
                            AttributeType::Decrypt,
                            AttributeType::Value,
                        ],
                    )
                    .unwrap();
                let flag = |t: AttributeType| {
                    attrs.iter().find_map(|a| match (a, t) {
                        (Attribute::Sensitive(v), AttributeType::Sensitive)
                        | (Attribute::Extractable(v), AttributeType::Extractable)
                        | (Attribute::NeverExtractable(v), AttributeType::NeverExtractable)
                        | (Attribute::AlwaysSensitive(v), AttributeType::AlwaysSensitive)
                        | (Attribute::Token(v), AttributeType::Token)
                        | (Attribute::Private(v), AttributeType::Private)
                        | (Attribute::Sign(v), AttributeType::Sign)
                        | (Attribute::Decrypt(v), AttributeType::Decrypt) => Some(*v),
                        _ => None,
                    })
                };
                assert_eq!(flag(AttributeType::Sensitive), Some(true), "{label}");
                assert_eq!(flag(AttributeType::Extractable), Some(false), "{label}");
                assert_eq!(flag(AttributeType::Token), Some(true), "{label}");
                assert_eq!(flag(AttributeType::Private), Some(true), "{label}");
                assert_eq!(flag(AttributeType::Sign), Some(true), "{label}");
                assert_eq!(flag(AttributeType::Decrypt), Some(false), "{label}");
                // Never extractable and always sensitive only when born in the token: an
                // imported key existed outside it, and the token says so.
                assert_eq!(
                    flag(AttributeType::NeverExtractable),
                    Some(generated),
                    "{label}"
                );
                assert_eq!(
                    flag(AttributeType::AlwaysSensitive),
                    Some(generated),
                    "{label}"
                );
                assert!(
                    !attrs.iter().any(|a| matches!(a, Attribute::Value(_))),
                    "{label}: CKA_VALUE must not be readable"
                );
                let info = session
                    .get_attribute_info(key, &[AttributeType::Value])
                    .unwrap();
                assert!(
                    matches!(info[0], AttributeInfo::Sensitive),
                    "{label}: CKA_VALUE is {:?}",
                    info[0]
                );
            }
            drop(session);

            // The backend's own listing agrees.
            let entries = pkcs11::list(&settings).unwrap();
            assert_eq!(entries.len(), 2);
            for e in &entries {
                assert!(e.has_private_key);
                assert_eq!(e.sensitive, Some(true));
                assert_eq!(e.extractable, Some(false));
                assert_eq!(e.never_extractable, Some(e.label == "gen"));
                assert_eq!(e.local, Some(e.label == "gen"));
                assert_eq!(e.can_sign, Some(true));
                assert!(e.public_key.is_some());
            }
        },
    );
}

#[test]
fn wrong_pin_is_tried_exactly_once_and_does_not_lock() {
    isolated("wrong_pin_is_tried_exactly_once_and_does_not_lock", |hsm| {
        let good = hsm.settings(Some("k"));
        pkcs11::generate(&good, "k", None).unwrap();
        let mut wrong = good.clone();
        wrong.pin = PinSource::File(hsm.wrong_pin_file.clone());
        wrong.sessions = 4;

        let before = pkcs11::login_attempts();
        let err = open_err(&wrong);
        assert!(matches!(err, SignerError::WrongPin { .. }), "{err}");
        assert!(err.to_string().contains("will not retry"), "{err}");
        assert!(!err.to_string().contains("not-the-pin"));
        assert_eq!(
            pkcs11::login_attempts() - before,
            1,
            "one C_Login for four sessions"
        );

        // SoftHSM flags a failed login on the token; the PIN is not locked.
        let ctx = raw_ctx();
        let info = ctx.get_token_info(raw_slot(&ctx, &hsm.label)).unwrap();
        assert!(info.user_pin_count_low(), "SoftHSM marks the failed login");
        assert!(!info.user_pin_locked());

        // The token refused a PIN: this process sends it no other, not even another
        // key's (the backend cannot tell a good PIN from the next wrong one).
        let err = open_err(&good);
        assert!(matches!(err, SignerError::WrongPin { .. }), "{err}");
        assert_eq!(pkcs11::login_attempts() - before, 1);

        // The good PIN does work (independent path), and clears the flag.
        let session = ctx.open_ro_session(raw_slot(&ctx, &hsm.label)).unwrap();
        raw_login(&session);
        let info = ctx.get_token_info(raw_slot(&ctx, &hsm.label)).unwrap();
        assert!(!info.user_pin_count_low(), "a good login clears the flag");
    });
}

/// Two keys on one token, opened with a wrong PIN at the same time (as the daemon opens its
/// keys), then again one after the other, then key management: the token sees one wrong
/// PIN in all, not one per key, per session or per call.
#[test]
fn keys_on_one_token_send_one_wrong_pin_between_them() {
    isolated("keys_on_one_token_send_one_wrong_pin_between_them", |hsm| {
        let good_a = hsm.settings(Some("a"));
        let good_b = hsm.settings(Some("b"));
        pkcs11::generate(&good_a, "a", None).unwrap();
        pkcs11::generate(&good_b, "b", None).unwrap();
        let wrong = |good: &Pkcs11Settings| {
            let mut s = good.clone();
            s.pin = PinSource::File(hsm.wrong_pin_file.clone());
            s.sessions = 2;
            s
        };
        let (wrong_a, wrong_b) = (wrong(&good_a), wrong(&good_b));

        let before = pkcs11::login_attempts();
        let (err_a, err_b) = std::thread::scope(|scope| {
            let a = scope.spawn(|| open_err(&wrong_a));
            let b = scope.spawn(|| open_err(&wrong_b));
            (a.join().unwrap(), b.join().unwrap())
        });
        for err in [err_a, err_b, open_err(&wrong_a), open_err(&wrong_b)] {
            assert!(matches!(err, SignerError::WrongPin { .. }), "{err}");
        }
        let err = pkcs11::list(&wrong_b).unwrap_err();
        assert!(matches!(err, SignerError::WrongPin { .. }), "{err}");
        let err = pkcs11::generate(&wrong_a, "c", None).unwrap_err();
        assert!(matches!(err, SignerError::WrongPin { .. }), "{err}");
        assert_eq!(
            pkcs11::login_attempts() - before,
            1,
            "one C_Login for two keys, four sessions and two key-management calls"
        );

        // What the token saw. SoftHSM has no retry counter: it sets COUNT_LOW on any
        // failure and never sets FINAL_TRY or locks, so its flags cannot tell one
        // failure from several; the login counter above is the evidence.
        let ctx = raw_ctx();
        let info = ctx.get_token_info(raw_slot(&ctx, &hsm.label)).unwrap();
        assert!(info.user_pin_count_low());
        assert!(!info.user_pin_final_try());
        assert!(!info.user_pin_locked());
    });
}

/// Two keys on the token lose their login to a PIN change: their recoveries send the
/// (now wrong) PIN once between them, and never again.
#[test]
fn pin_refused_during_recovery_is_never_retried() {
    isolated("pin_refused_during_recovery_is_never_retried", |hsm| {
        let settings = hsm.settings(Some("k"));
        pkcs11::generate(&settings, "k", None).unwrap();
        let other = hsm.settings(Some("other"));
        pkcs11::generate(&other, "other", None).unwrap();
        let h = handle(&settings, 2);
        let h2 = handle(&other, 1);
        let rt = runtime();
        rt.block_on(h.sign(b"before")).unwrap();
        rt.block_on(h2.sign(b"before")).unwrap();

        // Change the PIN under the agent, then log everyone out: the agent's re-login
        // with its (now wrong) PIN must happen once, and never again.
        let ctx = raw_ctx();
        let session = ctx.open_rw_session(raw_slot(&ctx, &hsm.label)).unwrap();
        session
            .set_pin(&AuthPin::from(USER_PIN), &AuthPin::from("a-new-pin-42"))
            .unwrap();
        session.logout().unwrap();
        drop(session);

        let before = pkcs11::login_attempts();
        for _ in 0..6 {
            for h in [&h, &h2] {
                let err = rt.block_on(h.sign(b"after")).unwrap_err();
                assert!(matches!(err, SignerError::WrongPin { .. }), "{err}");
            }
        }
        assert_eq!(pkcs11::login_attempts() - before, 1);
    });
}

#[test]
fn concurrent_signatures_over_two_sessions_all_verify() {
    isolated(
        "concurrent_signatures_over_two_sessions_all_verify",
        |hsm| {
            const TOTAL: usize = 2000;
            const TASKS: usize = 64;
            let settings = hsm.settings(Some("k"));
            pkcs11::generate(&settings, "k", None).unwrap();
            let h = handle(&settings, 2);
            let public = *h.public_key();
            let rt = runtime();
            let results = rt.block_on(async {
                let mut tasks = Vec::new();
                for t in 0..TASKS {
                    let h = h.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut out = Vec::new();
                        for i in (t..TOTAL).step_by(TASKS) {
                            let ts = 1_700_000_000 + i as i64;
                            out.push((ts, h.sign_challenge(KEY_ID, ts).await));
                        }
                        out
                    }));
                }
                let mut all = Vec::new();
                for t in tasks {
                    all.extend(t.await.unwrap());
                }
                all
            });
            assert_eq!(results.len(), TOTAL);
            let point = uncompressed(&public);
            for (ts, result) in results {
                let body = result.expect("signature");
                let raw = b64url_decode(&body.signature);
                // ring is the faster verifier in debug builds; p256 checks a sample.
                ring_verify_raw(&point, format!("{KEY_ID}.{ts}").as_bytes(), &raw);
                if ts % 100 == 0 {
                    check_challenge(&body, &public, ts);
                }
            }
            let health = h.health();
            assert_eq!(health.signatures, TOTAL as u64);
            assert_eq!(health.errors, 0);
        },
    );
}

#[test]
fn closing_all_sessions_is_recovered_without_restart() {
    isolated("closing_all_sessions_is_recovered_without_restart", |hsm| {
        let settings = hsm.settings(Some("k"));
        pkcs11::generate(&settings, "k", None).unwrap();
        let h = handle(&settings, 2);
        let rt = runtime();
        for _ in 0..4 {
            rt.block_on(h.sign(b"before")).unwrap();
        }
        close_all_sessions(hsm);

        let before = pkcs11::login_attempts();
        let public = *h.public_key();
        for i in 0..20 {
            let msg = format!("after {i}");
            let sig = rt.block_on(h.sign(msg.as_bytes())).expect("recovered");
            public.verify(msg.as_bytes(), &sig).unwrap();
        }
        assert_eq!(
            pkcs11::login_attempts() - before,
            1,
            "logged in again once, for both sessions"
        );
        assert_eq!(h.health().errors, 0, "recovered inside the request");
    });
}

/// The private key is replaced under the same label and CKA_ID while the agent runs, the
/// old public key object staying behind: after the reconnect that follows a session loss,
/// the new key's signature must not be handed out as the agent's.
#[test]
fn a_private_key_replaced_under_the_same_names_is_caught_after_a_reconnect() {
    isolated(
        "a_private_key_replaced_under_the_same_names_is_caught_after_a_reconnect",
        |hsm| {
            let settings = hsm.settings(Some("k"));
            pkcs11::generate(&settings, "k", None).unwrap();
            let h = handle(&settings, 1);
            let rt = runtime();
            let public = *h.public_key();
            let sig = rt.block_on(h.sign(b"before")).unwrap();
            public.verify(b"before", &sig).unwrap();

            // A second pair, then its private key takes the first one's label and id, its
            // public object goes, and so does the first private key.
            pkcs11::generate(&hsm.settings(Some("k2")), "k2", None).unwrap();
            let ctx = raw_ctx();
            let session = ctx.open_rw_session(raw_slot(&ctx, &hsm.label)).unwrap();
            raw_login(&session);
            let find = |class: ObjectClass, label: &str| {
                let found = session
                    .find_objects(&[
                        Attribute::Class(class),
                        Attribute::Label(label.as_bytes().to_vec()),
                    ])
                    .unwrap();
                assert_eq!(found.len(), 1, "{label}");
                found[0]
            };
            let old_private = find(ObjectClass::PRIVATE_KEY, "k");
            let new_private = find(ObjectClass::PRIVATE_KEY, "k2");
            let new_public = find(ObjectClass::PUBLIC_KEY, "k2");
            let old_id = match &session
                .get_attributes(old_private, &[AttributeType::Id])
                .unwrap()[..]
            {
                [Attribute::Id(id)] => id.clone(),
                other => panic!("{other:?}"),
            };
            session.destroy_object(old_private).unwrap();
            session.destroy_object(new_public).unwrap();
            session
                .update_attributes(
                    new_private,
                    &[Attribute::Label(b"k".to_vec()), Attribute::Id(old_id)],
                )
                .unwrap();
            drop(session);

            close_all_sessions(hsm);
            let after = rt.block_on(h.sign(b"after"));
            match after {
                Err(SignerError::SelfTest(msg)) => {
                    assert!(msg.contains("does not verify"), "{msg}")
                }
                Ok(sig) => panic!(
                    "handed out a signature (verifies with the agent's key: {})",
                    public.verify(b"after", &sig).is_ok()
                ),
                Err(e) => panic!("{e}"),
            }
            // And it keeps refusing.
            assert!(rt.block_on(h.sign(b"again")).is_err());
        },
    );
}

/// C_CloseAllSessions on the token's slot, through the raw bindings (cryptoki does not wrap
/// it), on the same already loaded and initialized library.
fn close_all_sessions(hsm: &SoftHsm) {
    let ctx = raw_ctx();
    let slot = raw_slot(&ctx, &hsm.label);
    // SAFETY: loads the library that is already loaded in this process and calls one
    // PKCS#11 function with a valid slot id; no pointers are passed.
    let rv = unsafe {
        let lib = cryptoki_sys::Pkcs11::new(MODULE).expect("load the module");
        lib.C_CloseAllSessions(slot.id() as cryptoki_sys::CK_SLOT_ID)
    };
    assert_eq!(rv, cryptoki_sys::CKR_OK);
}

/// Sessions closed under two workers, then a burst of concurrent requests hits the dead
/// sessions (in odd rounds after a single request has let one worker reopen first), five
/// times over: every request succeeds, the workers recover inside the requests, and log in
/// once per loss. The sessions are closed between bursts, not during one: SoftHSM frees a
/// session that another thread is using inside C_Sign and crashes (measured: SIGSEGV in
/// C_SignInit), a property of that in-process module, not something the agent can prevent.
#[test]
fn session_loss_before_concurrent_bursts_is_recovered() {
    isolated(
        "session_loss_before_concurrent_bursts_is_recovered",
        |hsm| {
            let settings = hsm.settings(Some("k"));
            pkcs11::generate(&settings, "k", None).unwrap();
            let h = handle(&settings, 2);
            let public = *h.public_key();
            let rt = runtime();
            let before = pkcs11::login_attempts();
            for round in 0..5 {
                close_all_sessions(hsm);
                if round % 2 == 1 {
                    // One worker alone notices first and reopens, then the other finds
                    // its own session dead during the burst.
                    let sig = rt.block_on(h.sign(b"first")).unwrap();
                    public.verify(b"first", &sig).unwrap();
                }
                let results = rt.block_on(async {
                    let mut tasks = Vec::new();
                    for t in 0..64 {
                        let h = h.clone();
                        tasks.push(tokio::spawn(async move {
                            let msg = format!("{round}.{t}");
                            let sig = h.sign(msg.as_bytes()).await;
                            (msg, sig)
                        }));
                    }
                    let mut all = Vec::new();
                    for t in tasks {
                        all.push(t.await.unwrap());
                    }
                    all
                });
                for (msg, sig) in results {
                    let sig = sig.unwrap_or_else(|e| panic!("round {round}: {e}"));
                    public.verify(msg.as_bytes(), &sig).unwrap();
                }
            }
            assert_eq!(h.health().errors, 0);
            assert_eq!(
                pkcs11::login_attempts() - before,
                5,
                "one login per loss, not one per worker"
            );
        },
    );
}

#[test]
fn logout_from_another_session_is_recovered() {
    isolated("logout_from_another_session_is_recovered", |hsm| {
        let settings = hsm.settings(Some("k"));
        pkcs11::generate(&settings, "k", None).unwrap();
        let h = handle(&settings, 2);
        let rt = runtime();
        rt.block_on(h.sign(b"before")).unwrap();
        let ctx = raw_ctx();
        let session = ctx.open_ro_session(raw_slot(&ctx, &hsm.label)).unwrap();
        session.logout().unwrap();
        drop(session);
        let before = pkcs11::login_attempts();
        for _ in 0..10 {
            rt.block_on(h.sign(b"after")).expect("recovered");
        }
        assert_eq!(pkcs11::login_attempts() - before, 1);
    });
}

#[test]
fn token_removal_is_unavailable_then_recovered_by_the_same_handle() {
    isolated(
        "token_removal_is_unavailable_then_recovered_by_the_same_handle",
        |hsm| {
            let settings = hsm.settings(Some("k"));
            pkcs11::generate(&settings, "k", None).unwrap();
            let h = handle(&settings, 2);
            let rt = runtime();
            rt.block_on(h.sign(b"before")).unwrap();

            let token_dir = hsm.token_dir();
            let away = hsm.root.join("token-moved-away");
            std::fs::rename(&token_dir, &away).unwrap();

            let err = rt.block_on(h.sign(b"gone")).unwrap_err();
            assert_eq!(err.wire_code().as_str(), "unavailable", "{err}");
            assert!(matches!(err, SignerError::Unavailable(_)), "{err}");
            let text = err.to_string();
            assert!(text.contains("next attempt"), "{text}");
            assert!(!text.contains(USER_PIN));
            // Within the back-off: refused fast, without touching the module.
            let start = Instant::now();
            let err = rt.block_on(h.sign(b"gone")).unwrap_err();
            assert!(matches!(err, SignerError::Unavailable(_)), "{err}");
            assert!(start.elapsed() < Duration::from_millis(100));
            // After the back-off: tried again, still gone.
            std::thread::sleep(pkcs11::BACKOFF_INITIAL + Duration::from_millis(50));
            let err = rt.block_on(h.sign(b"gone")).unwrap_err();
            assert!(matches!(err, SignerError::Unavailable(_)), "{err}");

            std::fs::rename(&away, &token_dir).unwrap();
            // SoftHSM lists the token again only after the module is re-initialized, which
            // happens at most once per REINIT_INTERVAL_MIN (counted from loading the module),
            // and the worker is then in a back-off of up to BACKOFF_MAX.
            let deadline = Instant::now()
                + pkcs11::REINIT_INTERVAL_MIN
                + pkcs11::BACKOFF_MAX
                + Duration::from_secs(10);
            loop {
                match rt.block_on(h.sign(b"back")) {
                    Ok(sig) => {
                        h.public_key().verify(b"back", &sig).unwrap();
                        break;
                    }
                    Err(SignerError::Unavailable(_)) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => panic!("not recovered: {e}"),
                }
            }
            // Both sessions work again.
            for i in 0..10 {
                let msg = format!("back {i}");
                let sig = rt.block_on(h.sign(msg.as_bytes())).unwrap();
                h.public_key().verify(msg.as_bytes(), &sig).unwrap();
            }
        },
    );
}

#[test]
fn turnkey_stamp_through_the_handle_verifies() {
    isolated("turnkey_stamp_through_the_handle_verifies", |hsm| {
        let settings = hsm.settings(Some("k"));
        pkcs11::generate(&settings, "k", None).unwrap();
        let h = handle(&settings, 1);
        let payload = br#"{"type":"ACTIVITY_TYPE_SIGN_TRANSACTION_V2","timestampMs":"1700000000000","organizationId":"org"}"#;
        let stamp = runtime().block_on(h.stamp(payload)).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&b64url_decode(&stamp)).unwrap();
        let fields = json.as_object().unwrap();
        assert_eq!(fields.len(), 3);
        assert_eq!(fields["scheme"], "SIGNATURE_SCHEME_TK_API_P256");
        let pk = hex::decode(fields["publicKey"].as_str().unwrap()).unwrap();
        assert_eq!(pk.len(), 33);
        assert!(pk[0] == 2 || pk[0] == 3);
        let key = VerifyingKey::from_sec1_bytes(&pk).unwrap();
        assert_eq!(key, *h.public_key());
        let sig_hex = fields["signature"].as_str().unwrap();
        assert_eq!(sig_hex, sig_hex.to_lowercase());
        let der = hex::decode(sig_hex).unwrap();
        assert_eq!(der[0], 0x30);
        key.verify(payload, &Signature::from_der(&der).unwrap())
            .unwrap();
        ring_verify_der(&uncompressed(&key), payload, &der);
    });
}

#[test]
fn generate_refuses_an_existing_label_or_id() {
    isolated("generate_refuses_an_existing_label_or_id", |hsm| {
        let settings = hsm.settings(None);
        let first = pkcs11::generate(&settings, "dup", None).unwrap();
        let err = pkcs11::generate(&settings, "dup", None).unwrap_err();
        assert!(matches!(err, SignerError::KeyExists(_)), "{err}");
        assert!(err.to_string().contains("\"dup\""), "{err}");
        assert!(err.to_string().contains("never overwrites"), "{err}");
        let err = pkcs11::generate(&settings, "other", Some(&first.id)).unwrap_err();
        assert!(matches!(err, SignerError::KeyExists(_)), "{err}");
        let keys = pkcs11::list(&settings).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].public_key, first.public_key);
    });
}

#[test]
fn a_key_that_is_not_p256_is_refused() {
    isolated("a_key_that_is_not_p256_is_refused", |hsm| {
        let ctx = raw_ctx();
        {
            let session = ctx.open_rw_session(raw_slot(&ctx, &hsm.label)).unwrap();
            raw_login(&session);
            let p384 = vec![0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
            session
                .generate_key_pair(
                    &Mechanism::EccKeyPairGen,
                    &[
                        Attribute::Token(true),
                        Attribute::Verify(true),
                        Attribute::EcParams(p384),
                        Attribute::Label(b"p384".to_vec()),
                        Attribute::Id(vec![1]),
                    ],
                    &[
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Sign(true),
                        Attribute::Label(b"p384".to_vec()),
                        Attribute::Id(vec![1]),
                    ],
                )
                .unwrap();
        }
        let err = open_err(&hsm.settings(Some("p384")));
        assert!(matches!(err, SignerError::NotP256(_)), "{err}");
        assert!(err.to_string().contains("1.2.840.10045.3.1.7"), "{err}");
    });
}

#[test]
fn tokens_are_found_by_label_or_serial_never_by_slot() {
    isolated("tokens_are_found_by_label_or_serial_never_by_slot", |hsm| {
        // Before the module is loaded in this process: SoftHSM reads tokens at C_Initialize.
        hsm.add_token("second");
        let first = hsm.settings(Some("k"));
        let mut second = first.clone();
        second.token_label = Some("second".into());
        let a = pkcs11::generate(&first, "k", None).unwrap();
        let b = pkcs11::generate(&second, "k", None).unwrap();
        assert_ne!(a.public_key, b.public_key);
        assert_eq!(pkcs11::public(&first).unwrap(), a.public_key.unwrap());
        assert_eq!(pkcs11::public(&second).unwrap(), b.public_key.unwrap());

        let ctx = raw_ctx();
        let serial = ctx
            .get_token_info(raw_slot(&ctx, "second"))
            .unwrap()
            .serial_number()
            .trim()
            .to_string();
        let mut by_serial = first.clone();
        by_serial.token_label = None;
        by_serial.token_serial = Some(serial);
        let (info, _workers) = pkcs11::open(&by_serial, 1).unwrap();
        assert_eq!(Some(info.public_key), b.public_key);

        let mut neither = first.clone();
        neither.token_label = None;
        let err = open_err(&neither);
        assert!(err.to_string().contains("2 tokens match"), "{err}");
        assert!(err.to_string().contains("--token-serial"), "{err}");

        let mut missing = first.clone();
        missing.token_label = Some("no-such-token".into());
        let err = open_err(&missing);
        assert!(err.to_string().contains("not present"), "{err}");
        assert!(
            err.to_string().contains("\"second\""),
            "lists the tokens: {err}"
        );
        assert!(
            err.to_string().contains("whose files this user can read"),
            "says why a token may be invisible: {err}"
        );
    });
}

#[test]
fn two_keys_in_a_token_need_a_selector_and_the_error_names_them() {
    isolated(
        "two_keys_in_a_token_need_a_selector_and_the_error_names_them",
        |hsm| {
            let settings = hsm.settings(Some("a"));
            pkcs11::generate(&settings, "a", Some(&[1])).unwrap();
            pkcs11::generate(&settings, "b", Some(&[2])).unwrap();
            let mut neither = settings.clone();
            neither.key_label = None;
            let err = open_err(&neither).to_string();
            assert!(err.contains("holds 2 private keys"), "{err}");
            assert!(
                err.contains("key_label or key_id") && err.contains("--cka-id"),
                "names the settings and the flags: {err}"
            );
            assert!(!err.contains("the only private key"), "{err}");
            // A selector picks one.
            let mut by_id = neither.clone();
            by_id.key_id = Some(vec![2]);
            assert!(pkcs11::open(&by_id, 1).is_ok());
        },
    );
}

#[test]
fn public_key_needs_no_pin_when_the_label_names_it() {
    isolated("public_key_needs_no_pin_when_the_label_names_it", |hsm| {
        let settings = hsm.settings(Some("k"));
        let entry = pkcs11::generate(&settings, "k", None).unwrap();
        let mut no_pin = settings.clone();
        no_pin.pin = PinSource::Env("TM_AGENT_TEST_NO_SUCH_VARIABLE".into());
        assert_eq!(pkcs11::public(&no_pin).unwrap(), entry.public_key.unwrap());
        // Without a selector it must look at private keys: that needs the PIN.
        no_pin.key_label = None;
        let err = pkcs11::public(&no_pin).unwrap_err();
        assert!(matches!(err, SignerError::Pin(_)), "{err}");
    });
}

fn token_dirs(hsm: &SoftHsm) -> Vec<PathBuf> {
    std::fs::read_dir(&hsm.tokendir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect()
}

/// One token of two vanishes: its key fails (and keeps trying) while the key on the other
/// token of the same module keeps signing undisturbed: the module is not re-initialized
/// under it, so it never even logs in again.
#[test]
fn a_missing_token_does_not_disturb_a_key_on_another_token() {
    isolated(
        "a_missing_token_does_not_disturb_a_key_on_another_token",
        |hsm| {
            // Before the module is loaded in this process: SoftHSM reads tokens at C_Initialize.
            let before = token_dirs(hsm);
            hsm.add_token("second");
            let second_dir = token_dirs(hsm)
                .into_iter()
                .find(|d| !before.contains(d))
                .expect("the second token's directory");
            let healthy = hsm.settings(Some("a"));
            let mut missing = hsm.settings(Some("b"));
            missing.token_label = Some("second".into());
            pkcs11::generate(&healthy, "a", None).unwrap();
            pkcs11::generate(&missing, "b", None).unwrap();
            let ha = handle(&healthy, 2);
            let hb = handle(&missing, 1);
            let rt = runtime();
            rt.block_on(ha.sign(b"a")).unwrap();
            rt.block_on(hb.sign(b"b")).unwrap();
            let logins = pkcs11::login_attempts();

            std::fs::rename(&second_dir, hsm.root.join("second-moved-away")).unwrap();
            // Long enough for several recovery attempts of the missing key (back-off 250,
            // 500, 1000 ms), as the daemon's watchdog probes would drive them.
            let until = Instant::now() + pkcs11::BACKOFF_INITIAL * 8;
            let mut failures = Vec::new();
            let mut signed = 0;
            while Instant::now() < until {
                match rt.block_on(hb.sign(b"b")) {
                    Ok(_) => panic!("signed without its token"),
                    Err(e) => failures.push(e),
                }
                for i in 0..4 {
                    let msg = format!("a {signed} {i}");
                    let sig = rt
                        .block_on(ha.sign(msg.as_bytes()))
                        .expect("the healthy key signs");
                    ha.public_key().verify(msg.as_bytes(), &sig).unwrap();
                }
                signed += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(signed > 10);
            for err in &failures {
                assert!(matches!(err, SignerError::Unavailable(_)), "{err}");
            }
            assert_eq!(ha.health().errors, 0);
            assert_eq!(
                pkcs11::login_attempts(),
                logins,
                "the healthy key never lost its login"
            );
            let first = failures[0].to_string();
            assert!(first.contains("re-initialized"), "{first}");
        },
    );
}

/// A session left with an operation active (`CKR_OPERATION_ACTIVE`) is closed, not just
/// forgotten, and the request is served from a new session.
#[test]
fn a_busy_session_is_closed_and_replaced() {
    isolated("a_busy_session_is_closed_and_replaced", |hsm| {
        let settings = hsm.settings(Some("k"));
        pkcs11::generate(&settings, "k", None).unwrap();
        let h = handle(&settings, 1);
        let rt = runtime();
        rt.block_on(h.sign(b"before")).unwrap();

        let ctx = raw_ctx();
        let slot = raw_slot(&ctx, &hsm.label);
        let ours = ctx.open_ro_session(slot).unwrap();
        let count = |ctx: &Pkcs11| ctx.get_token_info(slot).unwrap().session_count();
        let sessions_before = count(&ctx);
        // SAFETY: the same already loaded and initialized library; C_GetSessionInfo gets a
        // valid out pointer, C_FindObjectsInit an empty template. The worker's session is
        // idle (the worker waits for a request), so nobody else uses it meanwhile.
        let worker_session = unsafe {
            let lib = cryptoki_sys::Pkcs11::new(MODULE).expect("load the module");
            let mut info = cryptoki_sys::CK_SESSION_INFO::default();
            let worker = (1..64)
                .filter(|&n| n != ours.handle())
                .find(|&n| lib.C_GetSessionInfo(n, &mut info) == cryptoki_sys::CKR_OK)
                .expect("the worker's session");
            // Start a search in the worker's session and leave it open.
            let rv = lib.C_FindObjectsInit(worker, std::ptr::null_mut(), 0);
            assert_eq!(rv, cryptoki_sys::CKR_OK);
            worker
        };

        let sig = rt
            .block_on(h.sign(b"after"))
            .expect("served from a new session");
        h.public_key().verify(b"after", &sig).unwrap();
        assert_eq!(h.health().errors, 0);
        // SAFETY: as above.
        let rv = unsafe {
            let lib = cryptoki_sys::Pkcs11::new(MODULE).expect("load the module");
            let mut info = cryptoki_sys::CK_SESSION_INFO::default();
            lib.C_GetSessionInfo(worker_session, &mut info)
        };
        assert_eq!(
            rv,
            cryptoki_sys::CKR_SESSION_HANDLE_INVALID,
            "the busy session was closed"
        );
        assert_eq!(count(&ctx), sessions_before, "no session leaked");
        drop(ours);
    });
}

/// Runs `f` with this thread's tracing events written to a string.
fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8_lossy(&buffer.0.lock().unwrap()).into_owned();
    (out, text)
}

/// Opening a key the token does not protect (made by another tool) works, with a loud
/// warning; a key made by tm-agent opens without one.
#[test]
fn an_unprotected_key_is_opened_with_a_warning() {
    isolated("an_unprotected_key_is_opened_with_a_warning", |hsm| {
        let ctx = raw_ctx();
        {
            let session = ctx.open_rw_session(raw_slot(&ctx, &hsm.label)).unwrap();
            raw_login(&session);
            session
                .generate_key_pair(
                    &Mechanism::EccKeyPairGen,
                    &[
                        Attribute::Token(true),
                        Attribute::Verify(true),
                        Attribute::EcParams(pkcs11::P256_EC_PARAMS.to_vec()),
                        Attribute::Label(b"loose".to_vec()),
                        Attribute::Id(vec![2]),
                    ],
                    &[
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(false),
                        Attribute::Extractable(true),
                        Attribute::Sign(true),
                        Attribute::Label(b"loose".to_vec()),
                        Attribute::Id(vec![2]),
                    ],
                )
                .unwrap();
        }
        let (opened, logs) = capture_logs(|| pkcs11::open(&hsm.settings(Some("loose")), 1));
        opened.expect("an unprotected key still opens");
        assert!(logs.contains("WARN"), "{logs}");
        assert!(logs.contains("NOT PROTECTED"), "{logs}");
        assert!(logs.contains("CKA_SENSITIVE is false"), "{logs}");
        assert!(logs.contains("CKA_EXTRACTABLE is true"), "{logs}");

        let settings = hsm.settings(Some("tight"));
        pkcs11::generate(&settings, "tight", None).unwrap();
        let (opened, logs) = capture_logs(|| pkcs11::open(&settings, 1));
        opened.unwrap();
        assert!(!logs.contains("NOT PROTECTED"), "{logs}");
    });
}

/// Keeps `SoftHsm` and `hsm.module()` in use for the compiler in this binary.
#[test]
fn fixture_paths_are_consistent() {
    let hsm = SoftHsm::new("fixture-check");
    assert_eq!(hsm.module(), std::path::PathBuf::from(MODULE));
    assert!(hsm.conf.starts_with(&hsm.root));
    let meta = std::fs::metadata(&hsm.pin_file).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(hsm.token_dir().starts_with(&hsm.tokendir));
}

/// Reads the bench inline server's next reply and checks it carries a signature of `line` by
/// the key whose uncompressed point is `point`.
fn expect_signed_reply(reader: &mut impl std::io::BufRead, point: &[u8], line: &str) {
    let mut reply = String::new();
    reader.read_line(&mut reply).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    let raw = b64url_decode(reply["signature"].as_str().unwrap());
    ring_verify_raw(point, line.as_bytes(), &raw);
}

/// `tm-agent bench --inline-server`: the floor server signs every line it reads, with the
/// key's own sessions, on each connection (dealt to its two threads), and cleans up.
#[test]
fn bench_inline_server_signs_each_line_with_the_key() {
    isolated("bench_inline_server_signs_each_line_with_the_key", |hsm| {
        use std::io::{BufReader, Write as _};
        use tm_agent::cli::bench::InlineServer;

        let settings = hsm.settings(Some("k"));
        pkcs11::generate(&settings, "k", None).unwrap();
        let (info, workers) = pkcs11::open(&settings, 2).unwrap();
        let point = uncompressed(&info.public_key);
        let now = Instant::now();
        let server =
            InlineServer::start(&info, workers, now..now + Duration::from_secs(60), false).unwrap();
        let path = server.path().to_path_buf();
        let mut connections: Vec<_> = (0..3)
            .map(|_| {
                let stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                (stream.try_clone().unwrap(), BufReader::new(stream))
            })
            .collect();
        for round in 0..3 {
            for (index, (writer, reader)) in connections.iter_mut().enumerate() {
                let line = format!("{{\"v\":1,\"id\":{round},\"conn\":{index}}}\n");
                writer.write_all(line.as_bytes()).unwrap();
                expect_signed_reply(reader, &point, &line);
            }
        }
        drop(connections);
        let timed = server.finish();
        assert_eq!(timed.len(), 9, "one timing per signature");
        assert!(timed.iter().all(|&ns| ns > 0));
        assert!(!path.exists(), "the socket outlived the server");
    });
}

/// `--inline-server 1 --busy-poll`: the spinning floor server signs every line it reads
/// with its one session, connection after connection; it takes no second session.
#[test]
fn bench_busy_polling_inline_server_signs_each_line_with_the_key() {
    isolated(
        "bench_busy_polling_inline_server_signs_each_line_with_the_key",
        |hsm| {
            use std::io::{BufReader, Write as _};
            use tm_agent::cli::bench::InlineServer;

            let settings = hsm.settings(Some("k"));
            pkcs11::generate(&settings, "k", None).unwrap();
            let now = Instant::now();
            let window = now..now + Duration::from_secs(60);
            let (info, workers) = pkcs11::open(&settings, 2).unwrap();
            let err = InlineServer::start(&info, workers, window.clone(), true)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("one session"), "{err}");

            let (info, workers) = pkcs11::open(&settings, 1).unwrap();
            let point = uncompressed(&info.public_key);
            let server = InlineServer::start(&info, workers, window, true).unwrap();
            let path = server.path().to_path_buf();
            for connection in 0..2 {
                let stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                // Two lines in one write: each is answered, in order.
                let lines = [
                    format!("{{\"v\":1,\"id\":1,\"conn\":{connection}}}\n"),
                    format!("{{\"v\":1,\"id\":2,\"conn\":{connection}}}\n"),
                ];
                writer.write_all(lines.concat().as_bytes()).unwrap();
                for line in &lines {
                    expect_signed_reply(&mut reader, &point, line);
                }
            }
            let timed = server.finish();
            assert_eq!(timed.len(), 4, "one timing per signature");
            assert!(!path.exists(), "the socket outlived the server");
        },
    );
}
