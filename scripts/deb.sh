#!/usr/bin/env bash
# Builds the Debian package of tm-agent and lists its contents.
#
#   scripts/deb.sh        # -> target/debian/tm-agent_<version>-1_<arch>.deb
#
# Installs cargo-deb (from crates.io, the version scripts/test.sh pins) when missing, and
# dpkg-dev when dpkg-shlibdeps is missing (root only). A release build of the tm-agent
# binary: minutes on a small machine. The test suite (tests/systemd_units.rs) builds the
# .deb too, from the debug binary of the test run, and checks its layout with dpkg.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
  echo "== installing cargo-deb"
  cargo install cargo-deb --locked --version 3.8.0
fi
if ! command -v dpkg-shlibdeps >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing dpkg-dev (dpkg-shlibdeps computes the library dependencies)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpkg-dev >/dev/null
  else
    echo "dpkg-shlibdeps missing: apt-get install dpkg-dev" >&2
    exit 1
  fi
fi

echo "== cargo build --release --bin tm-agent"
# Only the agent ships (tm-auth-sim is a test tool), so only it is built.
cargo build --release --locked --bin tm-agent
echo "== cargo deb"
deb=$(cargo deb --no-build --locked | tail -n 1)
echo "== $deb"
dpkg-deb --info "$deb"
dpkg-deb --contents "$deb"
