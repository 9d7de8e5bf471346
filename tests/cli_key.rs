//! `tm-agent key …` end to end: the real binary against a real SoftHSM token, checked with
//! independent tools: OpenSC's `pkcs11-tool` for the key's protection flags, and `ring` plus
//! hand-written base64/DER code for the signatures.
//!
//! Every command runs as its own process with the test's `SOFTHSM2_CONF`, so these tests
//! never load SoftHSM in the test process itself.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};

use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::DecodePublicKey as _;

use common::daemon::{assert_success, output_with_stdin};
use common::softhsm::SoftHsm;
use common::{b64url_decode, bundle_json, ring_verify_der, ring_verify_raw};

const BIN: &str = env!("CARGO_BIN_EXE_tm-agent");
const KEY_ID: &str = "0b9b3f3e-8d4c-4c1e-9f1a-2b3c4d5e6f70";

/// Runs `tm-agent key <args>` on the fixture's token with its PIN file.
fn key(hsm: &SoftHsm, args: &[&str]) -> Output {
    key_with_stdin(hsm, args, None)
}

fn key_with_stdin(hsm: &SoftHsm, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = hsm.command(BIN);
    cmd.arg("key")
        .args(["--module", common::softhsm::MODULE])
        .args(["--token-label", &hsm.label])
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("TM_AGENT_PKCS11_MODULE");
    output_with_stdin(&mut cmd, stdin)
}

fn pin_args(hsm: &SoftHsm) -> Vec<String> {
    vec!["--pin-file".into(), hsm.pin_file.display().to_string()]
}

#[track_caller]
fn ok(out: &Output) -> String {
    assert_success(out, "tm-agent")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn args<'a>(fixed: &[&'a str], extra: &'a [String]) -> Vec<&'a str> {
    let mut v: Vec<&str> = fixed.to_vec();
    v.extend(extra.iter().map(String::as_str));
    v
}

/// The objects `pkcs11-tool --list-objects` prints, as (header, attribute lines).
fn pkcs11_tool_objects(hsm: &SoftHsm) -> Vec<(String, Vec<String>)> {
    let out = hsm.pkcs11_tool(&["--list-objects"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "pkcs11-tool failed: {text}{}",
        stderr(&out)
    );
    let mut objects: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        if line.starts_with(char::is_whitespace) {
            if let Some(last) = objects.last_mut() {
                last.1.push(line.trim().to_string());
            }
        } else if !line.trim().is_empty() {
            objects.push((line.trim().to_string(), Vec::new()));
        }
    }
    objects
}

fn field<'a>(lines: &'a [String], name: &str) -> Option<&'a str> {
    lines.iter().find_map(|l| {
        l.strip_prefix(name)
            .map(|rest| rest.trim_start_matches(':').trim())
    })
}

/// The private key object labelled `label`, as pkcs11-tool sees it: its `Access:` flags
/// and `Usage:`.
fn private_key_flags(hsm: &SoftHsm, label: &str) -> (Vec<String>, Vec<String>) {
    let objects = pkcs11_tool_objects(hsm);
    let (_, lines) = objects
        .iter()
        .find(|(header, lines)| {
            header.starts_with("Private Key Object; EC") && field(lines, "label") == Some(label)
        })
        .unwrap_or_else(|| panic!("pkcs11-tool lists no EC private key {label}: {objects:?}"));
    let split = |name| {
        field(lines, name)
            .unwrap_or("")
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
    };
    (split("Access"), split("Usage"))
}

/// Verifies a `sign-challenge` output on independent paths and returns its timestamp.
fn check_challenge_json(stdout: &str, key: &VerifyingKey, expect_ts: Option<i64>) -> i64 {
    let body: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let obj = body.as_object().unwrap();
    assert_eq!(
        obj.len(),
        3,
        "exactly key_id, timestamp, signature: {stdout}"
    );
    assert_eq!(obj["key_id"], KEY_ID);
    let ts = obj["timestamp"].as_i64().expect("integer timestamp");
    if let Some(expected) = expect_ts {
        assert_eq!(ts, expected);
    }
    let sig_text = obj["signature"].as_str().unwrap();
    assert_eq!(sig_text.len(), 86);
    assert!(!sig_text.contains('=') && !sig_text.contains('+') && !sig_text.contains('/'));
    let raw = b64url_decode(sig_text);
    assert_eq!(raw.len(), 64);
    let message = format!("{KEY_ID}.{ts}");
    key.verify(message.as_bytes(), &Signature::from_slice(&raw).unwrap())
        .expect("p256 verifies raw r||s");
    ring_verify_raw(
        key.to_encoded_point(false).as_bytes(),
        message.as_bytes(),
        &raw,
    );
    ts
}

#[test]
fn generate_public_sign_challenge_verifies_and_key_is_protected() {
    let hsm = SoftHsm::new("cli-generate");
    let pin = pin_args(&hsm);
    let out = key(&hsm, &args(&["generate", "--label", "tm-cli"], &pin));
    let pem = ok(&out);
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{pem}");
    assert!(stderr(&out).contains("API Keys page"));
    let key_from_generate = VerifyingKey::from_public_key_pem(&pem).unwrap();

    // `public` (default PEM) agrees; jwk and hex too.
    let public = ok(&key(&hsm, &["public", "--key-label", "tm-cli"]));
    assert_eq!(public, pem);
    let jwk: serde_json::Value = serde_json::from_str(&ok(&key(
        &hsm,
        &["public", "--key-label", "tm-cli", "--format", "jwk"],
    )))
    .unwrap();
    assert_eq!(jwk["kty"], "EC");
    assert_eq!(jwk["crv"], "P-256");
    assert_eq!(
        jwk["kid"].as_str().unwrap().len(),
        43,
        "RFC 7638 thumbprint"
    );
    let x = b64url_decode(jwk["x"].as_str().unwrap());
    let point = key_from_generate.to_encoded_point(false);
    assert_eq!(&x[..], &point.x().unwrap()[..]);
    let hex_out = ok(&key(
        &hsm,
        &["public", "--key-label", "tm-cli", "--format", "hex"],
    ));
    assert_eq!(
        hex::decode(hex_out.trim()).unwrap(),
        key_from_generate.to_encoded_point(true).as_bytes()
    );

    let sign_challenge = |extra: &[&str]| {
        let mut fixed = vec![
            "sign-challenge",
            "--key-label",
            "tm-cli",
            "--key-id",
            KEY_ID,
        ];
        fixed.extend_from_slice(extra);
        ok(&key(&hsm, &args(&fixed, &pin)))
    };
    let out = sign_challenge(&["--timestamp", "1700000000"]);
    check_challenge_json(&out, &key_from_generate, Some(1_700_000_000));

    // Without --timestamp: now.
    let ts = check_challenge_json(&sign_challenge(&[]), &key_from_generate, None);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - ts).abs() < 30, "timestamp {ts} is not now ({now})");

    // OpenSC's view of the private key: sensitive, never extractable, signing only.
    let (access, usage) = private_key_flags(&hsm, "tm-cli");
    assert!(access.contains(&"sensitive".to_string()), "{access:?}");
    assert!(
        access.contains(&"always sensitive".to_string()),
        "{access:?}"
    );
    assert!(
        access.contains(&"never extractable".to_string()),
        "{access:?}"
    );
    assert!(!access.contains(&"extractable".to_string()), "{access:?}");
    assert!(access.contains(&"local".to_string()), "{access:?}");
    assert_eq!(usage, vec!["sign".to_string()]);

    // `list` agrees.
    let list = ok(&key(&hsm, &args(&["list", "--json"], &pin)));
    let entries: serde_json::Value = serde_json::from_str(&list).unwrap();
    let entries = entries.as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["label"], "tm-cli");
    assert_eq!(entries[0]["sensitive"], true);
    assert_eq!(entries[0]["extractable"], false);
    assert_eq!(entries[0]["never_extractable"], true);
    assert_eq!(
        entries[0]["public_key"],
        hex_out.trim(),
        "list shows the same public key"
    );
}

#[test]
fn import_bundle_then_signatures_verify_with_the_bundle_key() {
    let hsm = SoftHsm::new("cli-import");
    let pin = pin_args(&hsm);
    let sk = SigningKey::random(&mut rand::rngs::OsRng);
    let bundle = hsm.root.join("my bundle.json");
    std::fs::write(&bundle, bundle_json(&sk, KEY_ID)).unwrap();
    let bundle_arg = bundle.display().to_string();

    let out = key(
        &hsm,
        &args(
            &["import", "--bundle", &bundle_arg, "--label", "tm-imported"],
            &pin,
        ),
    );
    let text = ok(&out);
    assert!(text.contains(KEY_ID), "{text}");
    assert!(
        text.contains(&format!("shred -u '{bundle_arg}'")),
        "tells to destroy the bundle: {text}"
    );
    assert!(text.contains("website generated this key"), "{text}");

    // The command the import prints works as printed (module, token and PIN included).
    let hint = text
        .lines()
        .find_map(|l| l.strip_prefix("Sign with: "))
        .unwrap_or_else(|| panic!("no hint: {text}"));
    assert!(
        hint.contains("--module") && hint.contains("--pin-file"),
        "{hint}"
    );
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
    let out = hsm
        .command("sh")
        .args(["-c", &format!("{hint} --timestamp 1700000042")])
        .env("PATH", path)
        .env_remove("RUST_LOG")
        .env_remove("TM_AGENT_PKCS11_MODULE")
        .output()
        .unwrap();
    check_challenge_json(&ok(&out), sk.verifying_key(), Some(1_700_000_042));

    // Sensitive and not extractable, but (truthfully) not "never extractable": it was
    // born outside the token.
    let (access, usage) = private_key_flags(&hsm, "tm-imported");
    assert!(access.contains(&"sensitive".to_string()), "{access:?}");
    assert!(!access.contains(&"extractable".to_string()), "{access:?}");
    assert!(
        !access.contains(&"never extractable".to_string()),
        "{access:?}"
    );
    assert_eq!(usage, vec!["sign".to_string()]);

    // Importing the same bundle again is refused (same derived CKA_ID).
    let out = key(
        &hsm,
        &args(
            &["import", "--bundle", &bundle_arg, "--label", "again"],
            &pin,
        ),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already"), "{}", stderr(&out));
}

#[test]
fn generate_refuses_an_existing_label() {
    let hsm = SoftHsm::new("cli-dup");
    let pin = pin_args(&hsm);
    let first = ok(&key(&hsm, &args(&["generate", "--label", "dup"], &pin)));
    let out = key(&hsm, &args(&["generate", "--label", "dup"], &pin));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with("error: cannot generate key \"dup\""),
        "{err}"
    );
    assert!(err.contains("caused by: key already exists"), "{err}");
    assert!(err.contains("never overwrites"), "{err}");
    assert!(out.stdout.is_empty());
    // The first key is untouched and alone.
    let objects = pkcs11_tool_objects(&hsm);
    let labelled: Vec<_> = objects
        .iter()
        .filter(|(_, lines)| field(lines, "label") == Some("dup"))
        .collect();
    assert_eq!(
        labelled.len(),
        2,
        "one public and one private object: {objects:?}"
    );
    assert_eq!(ok(&key(&hsm, &["public", "--key-label", "dup"])), first);
}

#[test]
fn wrong_pin_fails_with_the_pin_exit_code() {
    let hsm = SoftHsm::new("cli-wrong-pin");
    let pin = pin_args(&hsm);
    ok(&key(&hsm, &args(&["generate", "--label", "k"], &pin)));
    let wrong = hsm.wrong_pin_file.display().to_string();
    let out = key(
        &hsm,
        &[
            "sign-challenge",
            "--key-label",
            "k",
            "--key-id",
            KEY_ID,
            "--pin-file",
            &wrong,
        ],
    );
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("wrong PIN"), "{err}");
    assert!(!err.contains("not-the-pin"), "the PIN never appears: {err}");
    // Not locked: the right PIN still works.
    ok(&key(
        &hsm,
        &args(
            &["sign-challenge", "--key-label", "k", "--key-id", KEY_ID],
            &pin,
        ),
    ));
}

#[test]
fn no_pin_source_and_no_terminal_is_a_clear_error() {
    let hsm = SoftHsm::new("cli-no-pin");
    ok(&key(
        &hsm,
        &args(&["generate", "--label", "k"], &pin_args(&hsm)),
    ));
    let out = key(&hsm, &["list"]);
    assert_eq!(out.status.code(), Some(77));
    assert!(stderr(&out).contains("not a terminal"), "{}", stderr(&out));
}

#[test]
fn stamp_signs_the_exact_stdin_bytes() {
    let hsm = SoftHsm::new("cli-stamp");
    let pin = pin_args(&hsm);
    let pem = ok(&key(&hsm, &args(&["generate", "--label", "k"], &pin)));
    let public = VerifyingKey::from_public_key_pem(&pem).unwrap();
    // Trailing newline and non-ASCII on purpose: signed exactly as given.
    let payload =
        "{\"type\":\"ACTIVITY_TYPE_SIGN_TRANSACTION_V2\",\"note\":\"caf\u{e9}\"}\n".as_bytes();
    let out = key_with_stdin(
        &hsm,
        &args(&["stamp", "--key-label", "k"], &pin),
        Some(payload),
    );
    let stamp = ok(&out);
    let json: serde_json::Value = serde_json::from_slice(&b64url_decode(stamp.trim())).unwrap();
    assert_eq!(json["scheme"], "SIGNATURE_SCHEME_TK_API_P256");
    assert_eq!(
        hex::decode(json["publicKey"].as_str().unwrap()).unwrap(),
        public.to_encoded_point(true).as_bytes()
    );
    let der = hex::decode(json["signature"].as_str().unwrap()).unwrap();
    ring_verify_der(public.to_encoded_point(false).as_bytes(), payload, &der);
    let trimmed = &payload[..payload.len() - 1];
    assert!(
        public
            .verify(trimmed, &Signature::from_der(&der).unwrap())
            .is_err(),
        "the newline is part of the signed bytes"
    );

    let out = key_with_stdin(&hsm, &args(&["stamp", "--key-label", "k"], &pin), Some(b""));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no payload"), "{}", stderr(&out));
}

#[test]
fn soft_backend_signs_from_a_key_file() {
    let hsm = SoftHsm::new("cli-soft");
    let sk = SigningKey::random(&mut rand::rngs::OsRng);
    let file = hsm.root.join("bundle.json");
    std::fs::write(&file, bundle_json(&sk, KEY_ID)).unwrap();
    let file = file.display().to_string();
    let soft = ["--backend", "soft", "--key-file", &file];
    let mut public_args = vec!["public"];
    public_args.extend(soft);
    let pem = ok(&key(&hsm, &public_args));
    assert_eq!(
        VerifyingKey::from_public_key_pem(&pem).unwrap(),
        *sk.verifying_key()
    );
    let mut sign_args = vec![
        "sign-challenge",
        "--key-id",
        KEY_ID,
        "--timestamp",
        "1700000007",
    ];
    sign_args.extend(soft);
    let out = key(&hsm, &sign_args);
    check_challenge_json(&ok(&out), sk.verifying_key(), Some(1_700_000_007));
    assert!(
        stderr(&out).contains("NOT hardware-backed"),
        "{}",
        stderr(&out)
    );
    let mut gen_args = vec!["generate", "--label", "x"];
    gen_args.extend(soft);
    let out = key(&hsm, &gen_args);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("PKCS#11 tokens only"));
}

#[test]
fn config_file_selects_the_key_and_flags_override_it() {
    let hsm = SoftHsm::new("cli-config");
    let pin = pin_args(&hsm);
    let pem = ok(&key(
        &hsm,
        &args(&["generate", "--label", "from-config"], &pin),
    ));
    let public = VerifyingKey::from_public_key_pem(&pem).unwrap();
    let config = hsm.root.join("tm-agent.toml");
    std::fs::write(
        &config,
        format!(
            "[keys.prod]\nbackend = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{}\"\n\
             key_label = \"from-config\"\npin = {{ file = \"{}\" }}\nsessions = 2\n",
            common::softhsm::MODULE,
            hsm.label,
            hsm.pin_file.display()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    // No --token-label/--pin-file on this command line: everything from the config.
    let out = hsm
        .command(BIN)
        .args(["key", "--config", &config, "--key", "prod"])
        .args([
            "sign-challenge",
            "--key-id",
            KEY_ID,
            "--timestamp",
            "1700000100",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    check_challenge_json(&ok(&out), &public, Some(1_700_000_100));
    // A flag overrides the config: a key label that does not exist.
    let out = hsm
        .command(BIN)
        .args([
            "key",
            "--config",
            &config,
            "--key",
            "prod",
            "--key-label",
            "nope",
        ])
        .args(["sign-challenge", "--key-id", KEY_ID])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no private key \"nope\""),
        "{}",
        stderr(&out)
    );
    // A PIN where the PIN file's path goes: the config's own refusal, which quotes nothing.
    let text = std::fs::read_to_string(&config).unwrap();
    let pin_line = format!("pin = {{ file = \"{}\" }}", hsm.pin_file.display());
    std::fs::write(
        &config,
        text.replace(&pin_line, "pin = { file = \"987654\" }"),
    )
    .unwrap();
    let out = hsm
        .command(BIN)
        .args(["key", "--config", &config, "--key", "prod", "public"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "an unusable config");
    assert!(
        stderr(&out).contains("pin.file must be the absolute path of the PIN file"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("987654"), "{}", stderr(&out));
}

#[test]
fn bad_key_id_and_missing_module_are_explained() {
    let hsm = SoftHsm::new("cli-errors");
    // Command lines that parse but make no sense exit 2, like clap's own refusals.
    let out = key(&hsm, &["sign-challenge", "--key-id", "not-a-uuid"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("is not a UUID"), "{}", stderr(&out));
    let pin_file = hsm.pin_file.display().to_string();
    for (args, says) in [
        (
            vec!["--pin-file", &pin_file, "--pin-env", "X", "public"],
            "give at most one of --pin-file",
        ),
        (
            vec!["--config", "/etc/x.toml", "public"],
            "--config and --key go together",
        ),
        // A PIN (or management key) typed where its source's name goes is not echoed.
        (
            vec!["--pin-env", "987654", "public"],
            "--pin-env must be the name of an environment variable",
        ),
        (
            vec!["--pin-credential", "987654", "public"],
            "--pin-credential must be the name of a systemd credential",
        ),
        (
            vec!["--backend", "piv", "generate", "--mgm-key-env", "987654"],
            "--mgm-key-env must be the name of an environment variable",
        ),
        (vec!["generate"], "--label LABEL is required"),
        (vec!["--cka-id", "zz", "public"], "is not hex"),
        (
            vec!["--backend", "piv", "generate", "--label", "x"],
            "--label and --id are for PKCS#11 tokens",
        ),
    ] {
        let out = key(&hsm, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
        assert!(
            !stderr(&out).contains("987654"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let out = hsm
        .command(BIN)
        .args(["key", "--module", "/nonexistent/libpkcs11.so"])
        .args(["public", "--key-label", "k"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("/nonexistent/libpkcs11.so"),
        "{}",
        stderr(&out)
    );
    assert!(Path::new(BIN).exists());
}

#[test]
fn config_errors_do_not_echo_a_pin_written_into_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tm-agent.toml");
    let run = |text: &str| {
        std::fs::write(&config, text).unwrap();
        std::process::Command::new(BIN)
            .args(["key", "--config"])
            .arg(&config)
            .args(["--key", "prod", "public"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    // The PIN itself where its source belongs: toml would say "unknown variant `987654`".
    let out = run(&format!(
        "[keys.prod]\nbackend = \"pkcs11\"\nmodule = \"{}\"\npin = \"987654\"\n",
        common::softhsm::MODULE
    ));
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out);
    assert!(!err.contains("987654"), "{err}");
    assert!(err.contains("[keys.prod]"), "{err}");
    // A syntax error on the PIN's line: toml would print the line.
    let out = run("[keys.prod]\nbackend = \"pkcs11\"\npin = 987654 secret\n");
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out);
    assert!(!err.contains("987654"), "{err}");
    assert!(err.contains("line 3"), "{err}");
}
