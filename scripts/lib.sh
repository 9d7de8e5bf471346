# Shared by scripts/test.sh and scripts/demo.sh: install what the tests and the demo need.

# Debian packages the tests and the demo use, with the command that proves each is present.
ensure_system_packages() {
  local missing=()
  [ -e /usr/lib/softhsm/libsofthsm2.so ] || missing+=(softhsm2)
  command -v pkcs11-tool >/dev/null || missing+=(opensc)
  command -v systemd-socket-activate >/dev/null || missing+=(systemd)
  command -v setpriv >/dev/null || missing+=(util-linux)
  command -v python3 >/dev/null || missing+=(python3)
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
    python3 -m pip install -q cryptography || {
      [ "$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-cryptography >/dev/null
    }
  fi
}
