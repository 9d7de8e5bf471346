# Shared by scripts/test.sh and scripts/demo.sh: install what the tests and the demo need.

# Debian packages the tests and the demo use, with the command that proves each is present.
ensure_system_packages() {
  local missing=()
  [ -e /usr/lib/softhsm/libsofthsm2.so ] || missing+=(softhsm2)
  command -v pkcs11-tool >/dev/null || missing+=(opensc)
  command -v systemd-socket-activate >/dev/null || missing+=(systemd)
  command -v setpriv >/dev/null || missing+=(util-linux)
  # Debian's python3 makes venvs (the official SDK's) only with python3-venv.
  if ! command -v python3 >/dev/null; then
    missing+=(python3 python3-venv)
  elif ! python3 -c 'import ensurepip' 2>/dev/null; then
    missing+=(python3-venv)
  fi
  command -v dpkg-shlibdeps >/dev/null || missing+=(dpkg-dev)
  # pcsc-sys finds libpcsclite through pkg-config; scripts/pcscd.sh looks for pcscd with pgrep.
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  command -v pgrep >/dev/null || missing+=(procps)
  # YubiKey PIV: the pcsc crate links libpcsclite (the build needs the -dev package); the
  # PIV tests run real pcscd with the vpcd virtual reader and call yubico-piv-tool.
  [ -e /usr/include/PCSC/winscard.h ] || missing+=(libpcsclite-dev)
  [ -x /usr/sbin/pcscd ] || missing+=(pcscd)
  [ -e /usr/lib/pcsc/drivers/serial/libifdvpcd.so ] || missing+=(vsmartcard-vpcd)
  command -v yubico-piv-tool >/dev/null || missing+=(yubico-piv-tool)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
      echo "missing packages: ${missing[*]} — install them (sudo apt-get install -y ${missing[*]}) and run again" >&2
      return 1
    fi
    echo "== installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if ! python3 -c 'import cryptography' 2>/dev/null; then
    echo "== installing the Python cryptography package (independent signature checks)"
    if ! python3 -m pip install -q cryptography; then
      if [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-cryptography >/dev/null
      fi
    fi
    if ! python3 -c 'import cryptography' 2>/dev/null; then
      echo "python3 cannot import cryptography: install it for $(command -v python3) (pip install cryptography, or apt-get install python3-cryptography)" >&2
      return 1
    fi
  fi
}

# The local stack used by the demo and the bench: a throw-away SoftHSM token with a fresh
# P-256 key, tm-auth-sim over HTTPS on 127.0.0.1 with that key registered, and the agent.
#   start_stack WORK BIN [ACCESS_TTL_SECS] [SESSIONS]
# WORK: an empty private directory; BIN: the directory holding tm-agent and tm-auth-sim.
# Sets: key_id, https_url, agent_pid, stack_pids (kill them on exit), and exports
# SOFTHSM2_CONF and TM_AGENT_SOCK. Say what it does with STACK_VERBOSE=1.
stack_say() { [ -n "${STACK_VERBOSE:-}" ] && printf '\n\033[1m== %s\033[0m\n' "$*"; return 0; }

start_stack() {
  local work=$1 bin=$2 ttl=${3:-60} sessions=${4:-2}
  local module=/usr/lib/softhsm/libsofthsm2.so
  stack_pids=()

  stack_say "a throw-away SoftHSM token"
  export SOFTHSM2_CONF=$work/softhsm2.conf
  mkdir -p "$work/tokens"
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$work/tokens" >"$SOFTHSM2_CONF"
  softhsm2-util --init-token --free --label tm-demo --so-pin 87654321 --pin 123456 >/dev/null
  install -m 600 /dev/null "$work/pin"
  echo 123456 >"$work/pin"
  local key_args=(--module "$module" --token-label tm-demo --pin-file "$work/pin")

  stack_say "tm-agent key generate (P-256, sensitive, non-extractable)"
  "$bin/tm-agent" key generate "${key_args[@]}" --label tm-demo-key >"$work/generate.out"
  [ -n "${STACK_VERBOSE:-}" ] && cat "$work/generate.out"
  "$bin/tm-agent" key public "${key_args[@]}" --key-label tm-demo-key >"$work/public.pem"

  key_id=$(python3 -c 'import uuid; print(uuid.uuid4())')
  stack_say "tm-auth-sim over HTTPS on 127.0.0.1, key_id $key_id registered"
  "$bin/tm-auth-sim" --http 127.0.0.1:0 --https 127.0.0.1:0 \
    --cert-out "$work/sim-ca.pem" --ready-file "$work/sim.json" \
    --access-ttl "$ttl" --register "$key_id=$work/public.pem" >"$work/sim.log" 2>&1 &
  stack_pids+=($!)
  local _
  for _ in $(seq 100); do [ -s "$work/sim.json" ] && break; sleep 0.1; done
  if [ ! -s "$work/sim.json" ]; then
    echo "tm-auth-sim did not start within 10 s; its log:" >&2
    cat "$work/sim.log" >&2
    return 1
  fi
  https_url=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["https"])' "$work/sim.json")
  [ -n "${STACK_VERBOSE:-}" ] && echo "simulator at $https_url"

  cat >"$work/config.toml" <<CONF
[agent]
log_level = "info"

[socket]
path = "$work/agent.sock"
mode = 0o660

[server]
max_connections = 4096

[keys.demo]
backend = "pkcs11"
module = "$module"
token_label = "tm-demo"
key_label = "tm-demo-key"
pin = { file = "$work/pin" }
sessions = $sessions

[profiles.default]
key = "demo"
key_id = "$key_id"
base_url = "$https_url/v1/auth"
ca_file = "$work/sim-ca.pem"

[[access]]
uid = $(id -u)
# "*" would leave out sign_challenge (and stamp); the demo runs \`tm-agent sign\`.
ops = ["ping", "token", "watch", "public_key", "status", "sign_challenge"]
profiles = "*"
CONF

  stack_say "tm-agent run --config $work/config.toml"
  "$bin/tm-agent" run --config "$work/config.toml" >"$work/agent.log" 2>&1 &
  agent_pid=$!
  stack_pids+=($agent_pid)
  export TM_AGENT_SOCK=$work/agent.sock
  for _ in $(seq 100); do
    "$bin/tm-agent" ping >/dev/null 2>&1 && return 0
    if ! kill -0 "$agent_pid" 2>/dev/null; then
      echo "the agent exited; its log:" >&2
      cat "$work/agent.log" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "the agent did not answer within 10 s; its log:" >&2
  cat "$work/agent.log" >&2
  return 1
}

# The official True Markets Python SDK (PyPI `truemarkets`), in a venv under target/, for
# tests/official_sdk.rs: proof that the simulator accepts the real client unchanged. Its
# telemetry dependency (posthog) is left out on purpose, so nothing can phone home.
ensure_official_sdk() {
  local venv=target/official-sdk-venv
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import truemarkets.auth' 2>/dev/null; then
    return 0
  fi
  echo "== installing the official truemarkets SDK into $venv (without its telemetry)"
  mkdir -p target
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --no-deps truemarkets==0.3.0
  "$venv/bin/pip" install -q httpx attrs python-dateutil python-dotenv cryptography
}

# cargo-deb, for the .deb the systemd suite builds and lists (tests/systemd_units.rs).
ensure_cargo_deb() {
  if ! cargo deb --version >/dev/null 2>&1; then
    echo "== installing cargo-deb (builds the Debian package in the tests)"
    cargo install -q cargo-deb --locked --version 3.8.0
  fi
}

ensure_cargo_deny() {
  if ! cargo deny --version >/dev/null 2>&1; then
    echo "== installing cargo-deny (checks the dependency tree against deny.toml; about 5 minutes)"
    cargo install -q cargo-deny --locked --version 0.20.2
  fi
}
