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
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "a throw-away SoftHSM token"
export SOFTHSM2_CONF=$work/softhsm2.conf
mkdir "$work/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$work/tokens" >"$SOFTHSM2_CONF"
softhsm2-util --init-token --free --label tm-demo --so-pin 87654321 --pin 123456 >/dev/null
install -m 600 /dev/null "$work/pin"
echo 123456 >"$work/pin"
module=/usr/lib/softhsm/libsofthsm2.so
key_args=(--module "$module" --token-label tm-demo --pin-file "$work/pin")

step "tm-agent key generate (P-256, sensitive, non-extractable)"
"$bin/tm-agent" key generate "${key_args[@]}" --label tm-demo-key
"$bin/tm-agent" key public "${key_args[@]}" --key-label tm-demo-key >"$work/public.pem"

key_id=$(python3 -c 'import uuid; print(uuid.uuid4())')
step "tm-auth-sim over HTTPS on 127.0.0.1, key_id $key_id registered"
"$bin/tm-auth-sim" --http 127.0.0.1:0 --https 127.0.0.1:0 \
  --cert-out "$work/sim-ca.pem" --ready-file "$work/sim.json" \
  --access-ttl 60 --register "$key_id=$work/public.pem" >"$work/sim.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/sim.json" ] && break; sleep 0.1; done
https_url=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["https"])' "$work/sim.json")
echo "simulator at $https_url"

cat >"$work/config.toml" <<EOF
[agent]
log_level = "info"

[socket]
path = "$work/agent.sock"
mode = 0o660

[keys.demo]
backend = "pkcs11"
module = "$module"
token_label = "tm-demo"
key_label = "tm-demo-key"
pin = { file = "$work/pin" }
sessions = 2

[profiles.default]
key = "demo"
key_id = "$key_id"
base_url = "$https_url/v1/auth"
ca_file = "$work/sim-ca.pem"

[[access]]
uid = $(id -u)
ops = "*"
profiles = "*"
EOF

step "tm-agent run"
"$bin/tm-agent" run --config "$work/config.toml" >"$work/agent.log" 2>&1 &
pids+=($!)
export TM_AGENT_SOCK=$work/agent.sock
agent_pid=$!
for _ in $(seq 100); do
  "$bin/tm-agent" ping >/dev/null 2>&1 && break
  if ! kill -0 "$agent_pid" 2>/dev/null; then
    echo "the agent exited; its log:" >&2
    cat "$work/agent.log" >&2
    exit 1
  fi
  sleep 0.1
done

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
