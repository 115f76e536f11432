#!/usr/bin/env bash
# Build the Clinic Edge appliance: a raw GPT disk image, UEFI-bootable with systemd-boot.
#
#   sudo image/build.sh [--out DIR] [--snapshot 20251101T000000Z | --mirror URL] [--dry-run]
#
# Packages come from this machine's configured apt sources (what a field laptop can reach);
# --snapshot pins one snapshot.debian.org timestamp instead, for a bit-for-bit rebuild.
# Python dependencies come from image/requirements.lock, file times are clamped to
# SOURCE_DATE_EPOCH. No loop devices or mounts: the ESP is filled with mtools, the root is
# a squashfs, the disk is assembled with sfdisk and dd, so this also runs in a container.
#
# Out: DIR/clinic-edge-<version>.img (flash it), .img.zst (download it), .update (the
# bundle `edge update` installs into the other slot). See image/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

OUT=image/out
MIRROR=""
DRY_RUN=0
REUSE=0
KEEP=0
SUITE=bookworm
while (($#)); do
  case "$1" in
    --out) OUT="$2"; shift ;;
    --snapshot) MIRROR="http://snapshot.debian.org/archive/debian/$2/"; shift ;;
    --mirror) MIRROR="$2"; shift ;;
    --dry-run) DRY_RUN=1 ;;
    --reuse-root) REUSE=1; KEEP=1 ;;  # developers: keep DIR/work/rootfs from the last build, redo the rest
    *) echo "build.sh: unknown option $1 (see the header of this file)" >&2; exit 2 ;;
  esac
  shift
done

# Sizes (MiB). A slot holds one squashfs root; the data partition is made at first boot
# in whatever the card has beyond these.
ESP_MB=256
SLOT_MB=768

SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}"
export SOURCE_DATE_EPOCH
COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
BASE_VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' edge/__init__.py)
VERSION="${EDGE_IMAGE_VERSION:-$BASE_VERSION+g$COMMIT}"
NAME="clinic-edge-$VERSION"
PACKAGES=$(grep -v '^\s*#' image/packages.txt | grep -v '^\s*$' | paste -sd, -)

run() {  # every step is printed (a build: with the seconds since it started); --dry-run prints only
  if ((DRY_RUN)); then echo "+ $*"; return; fi
  echo "+ [$(($(date +%s) - started)) s] $*"
  "$@"
}

if ((DRY_RUN == 0)) && [[ $(id -u) -ne 0 ]]; then
  echo "build.sh: mmdebstrap needs root (or run it under unshare)" >&2
  exit 1
fi
for tool in mmdebstrap mksquashfs mkfs.vfat mcopy sfdisk zstd; do
  command -v "$tool" >/dev/null || { echo "build.sh: needs $tool (apt-get install mmdebstrap squashfs-tools dosfstools mtools fdisk zstd)" >&2; exit 1; }
done

# The apt sources: a pinned mirror if asked, else the host's own (deb822 or one-line).
SOURCES=()
if [[ -n "$MIRROR" ]]; then
  SOURCES=("deb $MIRROR $SUITE main")
else
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -s "$f" ]] && grep -qE '(debian|ubuntu)' "$f" && SOURCES+=("$f")
  done
  ((${#SOURCES[@]})) || { echo "build.sh: no Debian apt sources configured; give --mirror URL or --snapshot TS" >&2; exit 1; }
fi

WORK="$OUT/work"
ROOT="$WORK/rootfs"
if ((REUSE == 0)) || [[ ! -d "$ROOT/usr" ]]; then REUSE=0; run rm -rf "$WORK"; fi
run rm -rf "$WORK/wheels" "$WORK/slot"
run mkdir -p "$WORK/wheels" "$OUT"

# 1. The node as a wheel of this commit, and its locked dependencies as wheels (built here,
#    on the same Debian release as the image, so sdists compile against the same libc).
run python3 -m pip wheel -q --no-deps -w "$WORK/wheels" .
run python3 -m pip wheel -q --no-deps -w "$WORK/wheels" -r image/requirements.lock

# 2. The Debian root. Hooks run with the root as $1.
HOOKS="$WORK/hooks"
run mkdir -p "$HOOKS"
if ((DRY_RUN == 0)); then
  cat > "$HOOKS/setup.sh" <<'EOF'
#!/bin/sh
# Before packages: the initramfs must mount a squashfs root, compressed small.
set -e
mkdir -p "$1/etc/initramfs-tools/hooks" "$1/etc/initramfs-tools/conf.d"
printf '#!/bin/sh\n[ "$1" = prereqs ] && exit 0\n. /usr/share/initramfs-tools/hook-functions\nmanual_add_modules squashfs\n' > "$1/etc/initramfs-tools/hooks/clinic-edge"
chmod 0755 "$1/etc/initramfs-tools/hooks/clinic-edge"
printf 'COMPRESS=zstd\n' > "$1/etc/initramfs-tools/conf.d/clinic-edge"
EOF
  cat > "$HOOKS/customize.sh" <<'EOF'
#!/bin/sh
# After packages: the node, its units, the read-only layout.
set -e
R="$1"
in_root() { chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" "$@"; }
mkdir -p "$R/opt/clinic-edge" "$R/tmp/wheels" "$R/usr/lib/clinic-edge" "$R/boot/efi" "$R/var/lib/clinic-edge"
cp "$WORK"/wheels/*.whl "$R/tmp/wheels/"
cp image/requirements.lock README.md "$R/opt/clinic-edge/"
in_root python3 -m venv /opt/clinic-edge/venv
in_root /opt/clinic-edge/venv/bin/pip install -q --no-cache-dir --no-index --find-links /tmp/wheels -r /opt/clinic-edge/requirements.lock
in_root sh -c '/opt/clinic-edge/venv/bin/pip install -q --no-cache-dir --no-index --no-deps --force-reinstall /tmp/wheels/clinic_edge-*.whl'
rm -rf "$R/tmp/wheels"
# The root is read-only: bytecode that is never re-checked against its source loads fastest.
in_root /opt/clinic-edge/venv/bin/python -m compileall -q -j 2 --invalidation-mode unchecked-hash /opt/clinic-edge/venv/lib /usr/lib/python3.11 >/dev/null || true
echo "$VERSION" > "$R/usr/lib/clinic-edge/version"
cp systemd/edge.target systemd/edge-*.service image/edge-firstboot.service image/edge-provision.service image/edge-datakey.service \
   image/edge-boot-check.service image/edge-slots.service image/edge-data.service "$R/etc/systemd/system/"
cp systemd/sysusers.d/clinic-edge.conf "$R/usr/lib/sysusers.d/clinic-edge.conf"
cp systemd/tmpfiles.d/clinic-edge.conf "$R/usr/lib/tmpfiles.d/clinic-edge.conf"
install -m 0755 image/firstboot.sh "$R/usr/lib/clinic-edge/firstboot.sh"
install -m 0644 image/fstab "$R/etc/fstab"
install -m 0644 image/crypttab "$R/etc/crypttab"
install -D -m 0644 image/bless-boot-slots.conf "$R/etc/systemd/system/systemd-bless-boot.service.d/clinic-edge.conf"
install -D -m 0644 image/network.network "$R/etc/systemd/network/80-clinic.network"
install -D -m 0644 image/modprobe.conf "$R/etc/modprobe.d/clinic-edge.conf"
image/appliance-config.sh edge.toml > "$R/usr/lib/clinic-edge/edge.toml"
ln -sfn /var/lib/clinic-edge/etc "$R/etc/clinic-edge"
ln -sfn /run/systemd/resolve/stub-resolv.conf "$R/etc/resolv.conf"
echo clinic-edge > "$R/etc/hostname"
: > "$R/etc/machine-id"
in_root systemd-sysusers
in_root systemctl enable edge.target edge-firstboot.service edge-provision.service edge-datakey.service edge-boot-check.service \
  edge-slots.service edge-unprovisioned.service edge-data.service \
  systemd-networkd.service systemd-resolved.service systemd-timesyncd.service
in_root systemctl set-default multi-user.target
# What a read-only appliance never uses at run time.
rm -rf "$R/usr/share/doc" "$R/usr/share/man" "$R/usr/share/info" "$R/var/cache/apt" "$R/var/lib/apt/lists"
find "$R/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true
EOF
  chmod +x "$HOOKS"/*.sh
fi
export WORK VERSION
if ((REUSE)); then
  run "$HOOKS/customize.sh" "$ROOT"
else
run mmdebstrap --variant=minbase --include="$PACKAGES" --aptopt='Acquire::Retries "3"' \
  --setup-hook="$HOOKS/setup.sh \"\$1\"" --customize-hook="$HOOKS/customize.sh \"\$1\"" \
  "$SUITE" "$ROOT" "${SOURCES[@]}"
fi

# 3. The slot's files: root squashfs, kernel, initrd, and the manifest that `edge update`
#    checks before it writes anything.
SLOT="$WORK/slot"
run mkdir -p "$SLOT"
if ((DRY_RUN == 0)); then
  KVER=$(ls "$ROOT/lib/modules" | sort -V | tail -1)
  cp "$ROOT/boot/vmlinuz-$KVER" "$SLOT/vmlinuz"
  cp "$ROOT/boot/initrd.img-$KVER" "$SLOT/initrd.img"
  touch -d "@$SOURCE_DATE_EPOCH" "$SLOT/vmlinuz" "$SLOT/initrd.img"
fi
# SOURCE_DATE_EPOCH (exported) sets every timestamp in the squashfs.
run mksquashfs "$ROOT" "$SLOT/root.squashfs" -comp zstd -Xcompression-level 8 -noappend -quiet -no-progress -no-xattrs -processors 2
if ((DRY_RUN == 0)); then
  PYTHONPATH=. python3 -m edge.appliance.bundle "$SLOT" "$VERSION" "$COMMIT" $((SLOT_MB * 1024 * 1024)) > "$SLOT/manifest.json"
  touch -d "@$SOURCE_DATE_EPOCH" "$SLOT/manifest.json"
fi
run tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
  -C "$SLOT" -cf "$OUT/$NAME.update" manifest.json vmlinuz initrd.img root.squashfs

# 4. The ESP: systemd-boot as the removable-media loader, slot A's kernel and its entry.
ESP="$WORK/esp.img"
run mkfs.vfat -C -F 32 -n ESP -i 0ed6e000 --invariant "$ESP" $((ESP_MB * 1024))
if ((DRY_RUN == 0)); then
  EFI="$ROOT/usr/lib/systemd/boot/efi/systemd-bootx64.efi"
  cat > "$WORK/loader.conf" <<EOF
timeout 0
editor no
auto-entries no
auto-firmware no
EOF
  PYTHONPATH=. python3 -m edge.appliance.boot --slot a --version "$VERSION" > "$WORK/entry.conf"
  ENTRY=$(PYTHONPATH=. python3 -m edge.appliance.boot --slot a --version "$VERSION" --filename)
  touch -d "@$SOURCE_DATE_EPOCH" "$WORK/loader.conf" "$WORK/entry.conf"
  export MTOOLS_SKIP_CHECK=1
  mmd -i "$ESP" ::/EFI ::/EFI/BOOT ::/EFI/systemd ::/loader ::/loader/entries ::/clinic-edge ::/clinic-edge/a
  mcopy -m -i "$ESP" "$EFI" ::/EFI/BOOT/BOOTX64.EFI
  mcopy -m -i "$ESP" "$EFI" ::/EFI/systemd/systemd-bootx64.efi
  mcopy -m -i "$ESP" "$WORK/loader.conf" ::/loader/loader.conf
  mcopy -m -i "$ESP" "$WORK/entry.conf" "::/loader/entries/$ENTRY"
  mcopy -m -i "$ESP" "$SLOT/vmlinuz" "$SLOT/initrd.img" "$SLOT/manifest.json" ::/clinic-edge/a/
fi

# 5. The disk: GPT with ESP, root-a (filled), root-b (empty). Fixed disk and partition
#    UUIDs: every card of one build is the same bytes until its first boot.
IMG="$OUT/$NAME.img"
TOTAL_MB=$((1 + ESP_MB + 2 * SLOT_MB + 1))
run rm -f "$IMG"
run truncate -s "${TOTAL_MB}M" "$IMG"
if ((DRY_RUN == 0)); then
  sfdisk -q "$IMG" <<EOF
label: gpt
label-id: 6c696e69-6345-4467-a500-000000000001
start=1MiB, size=${ESP_MB}MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=6c696e69-6345-4467-a500-0000000000e5, name=esp
size=${SLOT_MB}MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=6c696e69-6345-4467-a500-00000000000a, name=root-a
size=${SLOT_MB}MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=6c696e69-6345-4467-a500-00000000000b, name=root-b
EOF
fi
run dd if="$ESP" of="$IMG" bs=1M seek=1 conv=notrunc,sparse status=none
run dd if="$SLOT/root.squashfs" of="$IMG" bs=1M seek=$((1 + ESP_MB)) conv=notrunc,sparse status=none
run sh -c "zstd -q -T0 -3 -f '$IMG' -o '$IMG.zst'"
if ((KEEP == 0)); then run rm -rf "$WORK"; else run rm -rf "$WORK/slot" "$WORK/esp.img"; fi

if ((DRY_RUN == 0)); then
  size() { du --apparent-size -m "$1" | cut -f1; }
  echo "build.sh: $IMG: $(size "$IMG") MB raw ($(du -m "$IMG" | cut -f1) MB allocated), $(size "$IMG.zst") MB compressed; $OUT/$NAME.update: $(size "$OUT/$NAME.update") MB"
  echo "build.sh: built $VERSION in $(($(date +%s) - started)) s"
fi
