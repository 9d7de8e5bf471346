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

if running; then
  exit 0
fi

if ! command -v pcscd >/dev/null 2>&1; then
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
  setsid pcscd --foreground --apdu --debug >"$PCSCD_LOG" 2>&1 </dev/null &
else
  pcscd
fi

for _ in $(seq 100); do
  if running; then
    exit 0
  fi
  sleep 0.1
done
echo "pcscd did not come up (no $socket after 10 s)" >&2
exit 1
