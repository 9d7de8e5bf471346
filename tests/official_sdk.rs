//! The official True Markets Python SDK (`truemarkets` on PyPI, installed into
//! `target/official-sdk-venv` by `scripts/test.sh`) mints and refreshes against
//! `tm-auth-sim` unchanged: its own challenge signing, request models and HTTP client; only
//! its base URL (`TM_BASE_URL`'s setting) points at the simulator on 127.0.0.1.

use std::path::Path;
use std::process::Command;

#[path = "common/sim.rs"]
mod sim_fixture;

#[test]
fn the_official_python_sdk_mints_and_refreshes_against_the_simulator() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/official-sdk-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/test.sh (it installs the truemarkets SDK there)",
        python.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.json");
    let made = Command::new(&python)
        .arg("-c")
        .arg(
            "import base64, json, sys, uuid\n\
             from cryptography.hazmat.primitives.asymmetric import ec\n\
             n = ec.generate_private_key(ec.SECP256R1()).private_numbers()\n\
             b = lambda i: base64.urlsafe_b64encode(i.to_bytes(32, 'big')).rstrip(b'=').decode()\n\
             json.dump({'key_id': str(uuid.uuid4()), 'label': 'sdk', 'algorithm': 'ES256',\n\
                        'private_key': {'kty': 'EC', 'crv': 'P-256', 'x': b(n.public_numbers.x),\n\
                                        'y': b(n.public_numbers.y), 'd': b(n.private_value)}},\n\
                       open(sys.argv[1], 'w'))",
        )
        .arg(&bundle)
        .status()
        .unwrap();
    assert!(made.success(), "could not write a key bundle");
    let sim = sim_fixture::SimProcess::spawn(&["--register".into(), bundle.display().to_string()]);
    let out = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/official_sdk.py"
        ))
        .arg(&sim.ready.http)
        .arg(&bundle)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ok  mint with the official SDK"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok  refresh with the official SDK"),
        "{stdout}"
    );
    assert!(stdout.ends_with("all checks passed\n"), "{stdout}");
}
