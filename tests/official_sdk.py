#!/usr/bin/env python3
"""Mints and refreshes against tm-auth-sim with the official True Markets Python SDK
(`truemarkets` on PyPI), unchanged: its own signing (`auth.sign_challenge`), its own request
models and its own HTTP client. Only the base URL points at the simulator (TM_BASE_URL, the
SDK's own setting).

Usage: official_sdk.py BASE_URL KEY_BUNDLE_JSON

Telemetry: the SDK reports to PostHog when the `posthog` package is importable. It is not
installed in the test environment, and DO_NOT_TRACK / TM_TELEMETRY opt out as well, so no
traffic leaves the machine.
"""
import os
import sys

os.environ["DO_NOT_TRACK"] = "1"
os.environ["TM_TELEMETRY"] = "0"
os.environ["TM_POSTHOG_HOST"] = "http://127.0.0.1:9"

from truemarkets import auth  # noqa: E402
from truemarkets.config import Config  # noqa: E402


def main():
    base_url, bundle_path = sys.argv[1], sys.argv[2]
    key_id, key = auth.load_key_file(bundle_path)
    cfg = Config(base_url=base_url, key_file=bundle_path)
    minted = auth.mint_token(cfg, key, key_id)
    assert minted["access_token"] and minted["refresh_token"], minted
    print("ok  mint with the official SDK", flush=True)
    refreshed = auth.refresh_token(cfg, minted["refresh_token"])
    assert refreshed["access_token"] and refreshed["access_token"] != minted["access_token"]
    print("ok  refresh with the official SDK", flush=True)
    try:
        auth.refresh_token(cfg, minted["refresh_token"])
        raise AssertionError("a spent refresh token was accepted")
    except Exception as e:  # the SDK raises its APIError for 4xx
        assert "401" in str(e) or getattr(e, "status", None) == 401 or "401" in repr(e), repr(e)
    print("ok  spent refresh token refused", flush=True)
    print("all checks passed")


if __name__ == "__main__":
    main()
