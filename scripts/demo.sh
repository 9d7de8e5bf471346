#!/usr/bin/env bash
# The demo: tm-agent on a throw-away SoftHSM token against the local Auth API simulator.
#
# Installs what is missing (as root), builds, creates a SoftHSM token in a temp dir,
# generates a P-256 key in it, starts tm-auth-sim over HTTPS on 127.0.0.1 with that key
# registered, starts the agent, then shows `tm-agent status`, a real token and its claims,
# and a challenge signature. Everything is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
ensure_system_packages

echo "== building (release)"
cargo build --release --quiet --bin tm-agent --bin tm-auth-sim
bin=$PWD/target/release

work=$(mktemp -d /tmp/tm-agent-demo.XXXXXX)
chmod 700 "$work"
stack_pids=()
cleanup() {
  for pid in "${stack_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

STACK_VERBOSE=1 start_stack "$work" "$bin" 60 2

step "tm-agent status"
"$bin/tm-agent" status

step "tm-agent token"
token=$("$bin/tm-agent" token)
echo "$token"

step "the token's claims (verified by the agent against the simulator's JWKS)"
python3 - "$token" <<'EOF'
import base64, json, sys
part = sys.argv[1].split(".")[1]
claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
print(json.dumps(claims, indent=2))
EOF

step "tm-agent sign (the body of POST /v1/auth/api-key/token)"
"$bin/tm-agent" sign

step "agent log"
sed -e 's/^/  /' "$work/agent.log"
echo
echo "demo done: everything under $work is removed now."
