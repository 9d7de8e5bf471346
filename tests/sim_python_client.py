#!/usr/bin/env python3
"""Independent client for tm-auth-sim, written the way the official True Markets SDKs sign.

Usage: sim_python_client.py BASE_URL KEY_ID PUBLIC_PEM_OUT

Generates a P-256 key, writes its public key (PEM, SubjectPublicKeyInfo) to PUBLIC_PEM_OUT,
registers it under KEY_ID through the simulator's admin API, mints tokens with an ES256
signature over "{key_id}.{timestamp}" (DER from `cryptography`, decoded with
decode_dss_signature into r||s, 32 bytes big-endian each, base64url without padding), then
exchanges the refresh token. Prints one JSON line per step (statuses and shapes only, never
tokens) and exits 0 only if both steps answered 200.
"""

import base64
import json
import sys
import time
import urllib.error
import urllib.request

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

# Loopback only: never go through a proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with OPENER.open(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def sign_challenge(key: ec.EllipticCurvePrivateKey, key_id: str, timestamp: int) -> str:
    der = key.sign(f"{key_id}.{timestamp}".encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def main() -> int:
    base, key_id, pem_out = sys.argv[1], sys.argv[2], sys.argv[3]
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with open(pem_out, "wb") as f:
        f.write(pem)
    status, body = post(f"{base}/_sim/keys", {"key_id": key_id, "public_key": pem.decode()})
    if status != 200:
        print(json.dumps({"step": "register", "status": status, "body": body}))
        return 1

    timestamp = int(time.time())
    status, body = post(
        f"{base}/v1/auth/api-key/token",
        {"key_id": key_id, "timestamp": timestamp, "signature": sign_challenge(key, key_id, timestamp)},
    )
    print(json.dumps({
        "step": "mint",
        "status": status,
        "token_type": body.get("token_type"),
        "expires_in": body.get("expires_in"),
        "error": body.get("message"),
    }))
    if status != 200:
        return 1

    status, body = post(f"{base}/v1/auth/token/refresh", {"refresh_token": body["refresh_token"]})
    print(json.dumps({
        "step": "refresh",
        "status": status,
        "token_type": body.get("token_type"),
        "expires_in": body.get("expires_in"),
        "error": body.get("message"),
    }))
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
