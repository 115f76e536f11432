#!/usr/bin/env bash
# Write a built root filesystem onto a node's disk: GPT with an ESP, two root slots (A/B)
# and the data partition (left empty: first boot encrypts it with the node's own key).
#
#   sudo image/flash.sh [--dry-run] image/out/rootfs.tar /dev/sdX
set -euo pipefail
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && { DRY_RUN=1; shift; }
TAR="${1:?usage: flash.sh [--dry-run] ROOTFS.tar DEVICE}"
DISK="${2:?usage: flash.sh [--dry-run] ROOTFS.tar DEVICE}"
run() { echo "+ $*"; if ((DRY_RUN == 0)); then "$@"; fi; }
part() { if [[ "$DISK" =~ [0-9]$ ]]; then echo "${DISK}p$1"; else echo "${DISK}$1"; fi; }

run sgdisk --zap-all \
  --new=1:0:+512M --typecode=1:ef00 --change-name=1:esp \
  --new=2:0:+3G   --typecode=2:8304 --change-name=2:root-a \
  --new=3:0:+3G   --typecode=3:8304 --change-name=3:root-b \
  --new=4:0:0     --typecode=4:8309 --change-name=4:edge-data \
  "$DISK"
run mkfs.vfat -F 32 -n ESP "$(part 1)"
run mkfs.ext4 -q -L root-a "$(part 2)"
run mkfs.ext4 -q -L root-b "$(part 3)"
MNT=$(mktemp -d)
run mount "$(part 2)" "$MNT"
run tar --numeric-owner -xpf "$TAR" -C "$MNT"
run mkdir -p "$MNT/boot/efi"
run mount "$(part 1)" "$MNT/boot/efi"
run chroot "$MNT" bootctl install --no-variables
run chroot "$MNT" kernel-install add "$(ls "$MNT/lib/modules" 2>/dev/null | head -1)" "/boot/vmlinuz-$(ls "$MNT/lib/modules" 2>/dev/null | head -1)"
run umount "$MNT/boot/efi" "$MNT"
echo "flash.sh: done. Drop edge-provision.toml on the ESP (edge provision --image-boot DIR) before first boot."
