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
# The whole suite: the node's tests on three workers (a file stays on one worker: its
# fixtures share peers), then the appliance's QEMU tests alone, so a VM never competes with
# them for the 2 cores.
.venv/bin/python -m pytest -n 3 --dist loadfile --durations=15 --ignore=tests/appliance
exec .venv/bin/python -m pytest --durations=0 tests/appliance
