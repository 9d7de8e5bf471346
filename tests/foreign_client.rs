//! A client written only from `proto/PROTOCOL.md`, in Python (`tests/protocol_client.py`),
//! against a live agent on a real Unix socket: the protocol document is enough to build a
//! working client, and the signatures verify with an independent ES256 implementation.

mod common;

use common::agent::TestAgent;

#[test]
fn a_python_client_written_from_the_protocol_document_works() {
    let have_crypto = std::process::Command::new("python3")
        .args(["-c", "import cryptography"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        have_crypto,
        "python3 with the cryptography package is required (scripts/test.sh installs it)"
    );
    let agent = TestAgent::start_default();
    let out = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/protocol_client.py"
        ))
        .arg(&agent.socket)
        .arg("prod")
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("sign_challenge verifies"), "{stdout}");
    assert!(stdout.ends_with("all checks passed\n"), "{stdout}");
}
