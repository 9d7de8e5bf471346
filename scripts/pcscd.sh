#!/usr/bin/env bash
# Starts pcscd (the PC/SC daemon) if it is not running: idempotent, safe to call from every
# test run. The PIV tests need it, with the vsmartcard-vpcd driver installed, so that the
# virtual PIV card (examples/virtual_piv.rs) appears as the reader "Virtual PCD 00 00".
#
#   scripts/pcscd.sh            # start if needed, wait until its socket answers
#   PCSCD_LOG=/tmp/pcscd.log scripts/pcscd.sh   # foreground daemon with APDU logs in a file
#
# It never stops or restarts a pcscd that is already running (other programs may use it).
set -euo pipefail

socket=/run/pcscd/pcscd.comm

running() {
  [ -S "$socket" ] && pgrep -x pcscd >/dev/null 2>&1
}

# Debian's pcscd is socket-activated under systemd and exits when idle (--auto-exit): its
# socket is there with no process behind it. A connection starts it again.
wake_socket_activated() {
  command -v systemctl >/dev/null 2>&1 || return 0
  systemctl is-active --quiet pcscd.socket 2>/dev/null || return 0
  pgrep -x pcscd >/dev/null 2>&1 && return 0
  python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$socket" 2>/dev/null || true
  for _ in $(seq 50); do
    pgrep -x pcscd >/dev/null 2>&1 && return 0
    sleep 0.1
  done
}

# vpcd listens on 127.0.0.1:35963 (0x8C7B) once pcscd has loaded it.
vpcd_listening() {
  grep -qi ':8C7B 00000000:0000 0A' /proc/net/tcp 2>/dev/null
}

wake_socket_activated
if running; then
  if [ -e /usr/lib/pcsc/drivers/serial/libifdvpcd.so ] && ! vpcd_listening; then
    if [ -n "${CI:-}" ] && [ "$(id -u)" = 0 ] && [ -r /run/pcscd/pcscd.pid ]; then
      # A throw-away CI machine whose pcscd started before vsmartcard-vpcd was installed.
      echo "== restarting pcscd to load the vpcd reader (CI)"
      kill "$(cat /run/pcscd/pcscd.pid)"
      for _ in $(seq 50); do running || break; sleep 0.1; done
    else
      echo "pcscd is running without the vpcd reader (it started before vsmartcard-vpcd was installed):" >&2
      echo "restart it (systemctl restart pcscd) so that the virtual PIV card has a reader" >&2
      exit 1
    fi
  else
    exit 0
  fi
fi

if [ ! -x /usr/sbin/pcscd ]; then
  echo "pcscd is not installed: apt-get install -y pcscd vsmartcard-vpcd" >&2
  exit 1
fi
if [ ! -e /usr/lib/pcsc/drivers/serial/libifdvpcd.so ]; then
  echo "note: vsmartcard-vpcd is not installed (apt-get install -y vsmartcard-vpcd): no virtual reader" >&2
fi
if [ "$(id -u)" != 0 ]; then
  echo "pcscd is not running and only root can start it here: sudo $0 (or systemctl start pcscd.socket)" >&2
  exit 1
fi

if [ -n "${PCSCD_LOG:-}" ]; then
  # Foreground mode with APDU logging, detached from this shell.
  setsid /usr/sbin/pcscd --foreground --apdu --debug >"$PCSCD_LOG" 2>&1 </dev/null &
else
  /usr/sbin/pcscd
fi

for _ in $(seq 100); do
  if running && { [ ! -e /usr/lib/pcsc/drivers/serial/libifdvpcd.so ] || vpcd_listening; }; then
    exit 0
  fi
  sleep 0.1
done
echo "pcscd did not come up (no $socket after 10 s)" >&2
exit 1
