#!/usr/bin/env python3
"""A tm-agent client written only from proto/PROTOCOL.md, in another language.

Usage: protocol_client.py SOCKET PROFILE

Speaks the v1 protocol over the Unix socket with nothing but the standard library, checks
every reply's shape, verifies the challenge signature and the Turnkey stamp with the
`cryptography` package (an ES256 implementation independent of tm-agent), and prints one
line per check. Exits non-zero on the first failure.
"""
import base64
import json
import socket
import sys
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature


def b64url_decode(text):
    assert "=" not in text, "base64url must come without padding"
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Agent:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""
        self.next_id = 1

    def send(self, obj):
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def send_raw(self, data):
        self.sock.sendall(data)

    def read(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("agent closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, op, **fields):
        rid = self.next_id
        self.next_id += 1
        self.send(dict(v=1, id=rid, op=op, **fields))
        reply = self.read()
        assert reply["id"] == rid, reply
        return reply


def ok(what):
    print("ok  " + what, flush=True)


def main():
    path, profile = sys.argv[1], sys.argv[2]
    a = Agent(path)

    r = a.call("ping")
    assert r["ok"] is True and r["result"] == {"pong": True}, r
    ok("ping")

    r = a.call("public_key", profile=profile)
    assert r["ok"], r
    pub = serialization.load_pem_public_key(r["result"]["pem"].encode())
    assert isinstance(pub.curve, ec.SECP256R1), "P-256"
    compressed = pub.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    ).hex()
    assert r["result"]["hex"] == compressed, (r["result"]["hex"], compressed)
    key_id = r["result"]["key_id"]
    ok("public_key")

    r = a.call("token", profile=profile)
    assert r["ok"], r
    t = r["result"]
    assert t["token_type"] == "Bearer" and t["access_token"].count(".") == 2, t
    assert t["expires_at"] > time.time(), t
    ok("token")

    r = a.call("sign_challenge", profile=profile)
    assert r["ok"], r
    body = r["result"]
    assert body["key_id"] == key_id and abs(body["timestamp"] - time.time()) < 30, body
    raw = b64url_decode(body["signature"])
    assert len(body["signature"]) == 86 and len(raw) == 64, body
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    message = f"{key_id}.{body['timestamp']}".encode()
    pub.verify(der, message, ec.ECDSA(hashes.SHA256()))
    try:
        pub.verify(der, message + b"x", ec.ECDSA(hashes.SHA256()))
        raise AssertionError("a signature over another message verified")
    except InvalidSignature:
        pass
    ok("sign_challenge verifies over {key_id}.{timestamp}")

    payload = '{"type":"ACTIVITY_TYPE_SIGN_TRANSACTION_V2","timestampMs":"1"}'
    r = a.call("stamp", profile=profile, payload=payload)
    assert r["ok"], r
    stamp = json.loads(b64url_decode(r["result"]["stamp"]))
    assert stamp["scheme"] == "SIGNATURE_SCHEME_TK_API_P256", stamp
    assert stamp["publicKey"] == compressed, stamp
    pub.verify(bytes.fromhex(stamp["signature"]), payload.encode(), ec.ECDSA(hashes.SHA256()))
    ok("stamp verifies over the payload")

    # Several requests in flight on one connection: replies carry their ids.
    for rid in (101, 102, 103):
        a.send({"v": 1, "id": rid, "op": "ping"})
    ids = sorted(a.read()["id"] for _ in range(3))
    assert ids == [101, 102, 103], ids
    ok("pipelined requests")

    r = a.call("status")
    assert r["ok"] and r["result"]["protocol"] == 1, r
    names = [p["name"] for p in r["result"]["profiles"]]
    assert profile in names, names
    ok("status")

    a.send({"v": 2, "id": 7, "op": "ping"})
    r = a.read()
    assert r == {"id": 7, "ok": False, "error": r["error"]} and r["error"]["code"] == "unsupported_version", r
    ok("unsupported_version")

    a.send({"v": 1, "id": 8, "op": "fly"})
    r = a.read()
    assert not r["ok"] and r["error"]["code"] == "bad_request", r
    ok("unknown op")

    r = a.call("token", profile="no-such-profile")
    assert not r["ok"] and r["error"]["code"] in ("unknown_profile", "forbidden"), r
    ok("unknown profile")

    a.send_raw(b"{not json\n")
    r = a.read()
    assert not r["ok"] and r["error"]["code"] == "bad_request", r
    ok("malformed JSON")
    print("all checks passed")


if __name__ == "__main__":
    main()
