#!/usr/bin/env bash
# Runs every check CI runs: installs missing system packages (as root), then
# cargo fmt --check, cargo clippy -D warnings, cargo deny, and the whole test suite in one
# cargo test.
#
#   scripts/test.sh            # everything
#   scripts/test.sh --no-lint  # skip fmt, clippy and cargo deny (quicker while iterating)
set -euo pipefail
cd "$(dirname "$0")/.."

lint=1
for arg in "$@"; do
  case "$arg" in
    --no-lint) lint=0 ;;
    *) echo "usage: scripts/test.sh [--no-lint]" >&2; exit 2 ;;
  esac
done

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
ensure_system_packages
ensure_official_sdk
ensure_cargo_deb
if [ "$lint" = 1 ]; then ensure_cargo_deny; fi
# pcscd for the PIV tests (tests/piv.rs also calls this when it finds pcscd not running).
bash scripts/pcscd.sh

if [ "$lint" = 1 ]; then
  echo "== cargo fmt --check"
  cargo fmt --all -- --check
  echo "== cargo clippy"
  cargo clippy --all-targets --all-features -- -D warnings
  echo "== cargo deny (licences, banned crates, sources; advisories need GitHub: see deny.toml)"
  cargo deny --log-level error check licenses bans sources
fi

echo "== cargo test"
# One invocation: unit tests, integration tests (SoftHSM, simulator, socket), doc tests.
mkdir -p target
set +e
cargo test --all-features --no-fail-fast 2>&1 | tee target/test-output.txt
status=${PIPESTATUS[0]}
set -e

# Roll the per-binary "test result" lines into one closing line.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' \
  target/test-output.txt
exit "$status"
