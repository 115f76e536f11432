#!/usr/bin/env bash
# Build the Clinic Edge appliance's root filesystem from Debian packages (debootstrap).
#
#   sudo image/build.sh [--dry-run] [--out DIR]
#
# Reproducible: packages come from one snapshot.debian.org timestamp (SNAPSHOT), Python
# dependencies from image/requirements.lock with hashes, file times are clamped to
# SOURCE_DATE_EPOCH, and the result is a sorted tarball. Two builds from the same commit
# and SNAPSHOT give the same package set and the same node; see image/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

SNAPSHOT="${SNAPSHOT:-20251101T000000Z}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-https://snapshot.debian.org/archive/debian/${SNAPSHOT}/}"
OUT="${OUT:-image/out}"
DRY_RUN=0
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "build.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}"
export SOURCE_DATE_EPOCH
ROOT="$OUT/rootfs"
PACKAGES=$(grep -v '^\s*#' image/packages.txt | grep -v '^\s*$' | paste -sd, -)

run() {  # every step is printed; --dry-run prints only
  echo "+ $*"
  if ((DRY_RUN == 0)); then "$@"; fi
}
in_root() { run chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 "$@"; }

if ((DRY_RUN == 0)) && [[ $(id -u) -ne 0 ]]; then
  echo "build.sh: debootstrap needs root" >&2
  exit 1
fi

# 1. The Debian root filesystem.
run mkdir -p "$OUT"
run debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR"

# 2. The node: a wheel of this commit plus locked dependencies, in its own venv.
run python3 -m pip wheel --no-deps -w "$OUT/wheels" .
run mkdir -p "$ROOT/opt/clinic-edge"
run cp image/requirements.lock "$OUT"/wheels/*.whl "$ROOT/opt/clinic-edge/"
in_root python3 -m venv /opt/clinic-edge/venv
in_root /opt/clinic-edge/venv/bin/pip install --no-cache-dir -r /opt/clinic-edge/requirements.lock
in_root sh -c '/opt/clinic-edge/venv/bin/pip install --no-cache-dir --no-deps /opt/clinic-edge/*.whl'
run cp README.md "$ROOT/opt/clinic-edge/README.md"

# 3. Units, the node's user, its folders, first boot.
run cp systemd/edge.target systemd/edge-*.service image/edge-firstboot.service image/edge-datakey.service "$ROOT/etc/systemd/system/"
run cp systemd/sysusers.d/clinic-edge.conf "$ROOT/usr/lib/sysusers.d/clinic-edge.conf"
run cp systemd/tmpfiles.d/clinic-edge.conf "$ROOT/usr/lib/tmpfiles.d/clinic-edge.conf"
run install -D -m 0755 image/firstboot.sh "$ROOT/usr/lib/clinic-edge/firstboot.sh"
in_root systemctl enable edge.target edge-firstboot.service edge-datakey.service systemd-timesyncd.service

# 4. Read-only-friendly layout: / is mounted read-only; everything that changes lives on
#    the encrypted data partition mounted at /var/lib/clinic-edge; config follows it.
run install -m 0644 image/fstab "$ROOT/etc/fstab"
run install -m 0644 image/crypttab "$ROOT/etc/crypttab"
run ln -sfn /var/lib/clinic-edge/etc "$ROOT/etc/clinic-edge"
if ((DRY_RUN == 0)); then image/appliance-config.sh edge.toml > "$ROOT/usr/lib/clinic-edge/edge.toml"; fi
echo "+ image/appliance-config.sh edge.toml > $ROOT/usr/lib/clinic-edge/edge.toml"
run mkdir -p "$ROOT/etc/cryptsetup-keys.d"

# 5. Clamp times and pack.
in_root apt-get clean
run find "$ROOT" -newermt "@$SOURCE_DATE_EPOCH" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
run tar --sort=name --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" -C "$ROOT" -cf "$OUT/rootfs.tar" .
echo "build.sh: root filesystem in $OUT/rootfs.tar (flash with image/flash.sh, see image/README.md)"
