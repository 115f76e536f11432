#!/usr/bin/env bash
# The test command: installs everything the tests need (Debian peers + Python deps), runs them.
# Usage: ./scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# Real peers the tests talk to (see README: "What the tests run against").
DEBIAN_PACKAGES=(dcmtk orthanc orthanc-dicomweb orthanc-python python3-cryptography socat iproute2 prometheus prometheus-pushgateway systemd openssl
  chromium cups printer-driver-cups-pdf poppler-utils zbar-tools fonts-dejavu-core
  mtools dosfstools fdisk strace mmdebstrap squashfs-tools zstd
  qemu-system-x86 ovmf)

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "test.sh: need Debian packages: ${missing[*]} (run as root, or install them)" >&2
    exit 1
  fi
  echo "test.sh: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

./scripts/venv.sh test
if (($#)); then  # a file, a test, options: as asked, in one process
  exec .venv/bin/python -m pytest "$@"
fi
# The whole suite: the appliance's QEMU tests (image build, then one emulated box's life:
# mostly a VM booting and waiting) start first, in the background; the node's tests run beside
# them on three workers (a file stays on one worker: its fixtures share peers). Their output
# follows the node's; either failing fails the run.
appliance_log=$(mktemp /tmp/clinic-edge-appliance.XXXXXX.log)
.venv/bin/python -m pytest --durations=0 -p no:cacheprovider --basetemp=/tmp/clinic-edge-appliance-tmp tests/appliance > "$appliance_log" 2>&1 &
appliance=$!
trap 'kill "$appliance" 2>/dev/null || true' EXIT
node_rc=0
.venv/bin/python -m pytest -n 3 --dist loadfile --durations=15 --ignore=tests/appliance || node_rc=$?
appliance_rc=0
wait "$appliance" || appliance_rc=$?
trap - EXIT
echo "=== the appliance's tests (QEMU), run beside the node's ==="
cat "$appliance_log"
rm -f "$appliance_log"
((node_rc == 0 && appliance_rc == 0)) || { echo "test.sh: node tests rc=$node_rc, appliance tests rc=$appliance_rc" >&2; exit 1; }
