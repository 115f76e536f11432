#!/usr/bin/env bash
# Write a built image onto a box's disk or a card in a reader, with the checks dd lacks.
#
#   sudo image/flash.sh [--dry-run] clinic-edge-<version>.img[.zst] /dev/sdX
#
# Refuses a target that is not a whole block device, is mounted, or is smaller than the
# image. The data partition is made at first boot in whatever the disk has beyond the image.
set -euo pipefail
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && { DRY_RUN=1; shift; }
IMG="${1:?usage: flash.sh [--dry-run] IMAGE DEVICE}"
DISK="${2:?usage: flash.sh [--dry-run] IMAGE DEVICE}"
run() { echo "+ $*"; if ((DRY_RUN == 0)); then "$@"; fi; }

[[ -f "$IMG" ]] || { echo "flash.sh: $IMG: no such image" >&2; exit 2; }
if ((DRY_RUN == 0)); then
  [[ -b "$DISK" ]] || { echo "flash.sh: $DISK is not a block device" >&2; exit 2; }
  [[ "$(lsblk -dno TYPE "$DISK")" == disk ]] || { echo "flash.sh: $DISK is a partition; give the whole disk" >&2; exit 2; }
  if lsblk -no MOUNTPOINTS "$DISK" | grep -q .; then
    echo "flash.sh: $DISK has mounted partitions: unmount them first" >&2; exit 2
  fi
  need=$(if [[ "$IMG" == *.zst ]]; then zstd -lv "$IMG" 2>/dev/null | awk '/Decompressed Size/{gsub(/[(),]/,"",$0); print $(NF-1)}'; else stat -c %s "$IMG"; fi)
  have=$(blockdev --getsize64 "$DISK")
  if [[ -n "$need" ]] && ((have < need)); then
    echo "flash.sh: $DISK has $have bytes, the image needs $need" >&2; exit 2
  fi
fi
if [[ "$IMG" == *.zst ]]; then
  run sh -c "zstd -dc '$IMG' | dd of='$DISK' bs=4M conv=fsync status=progress"
else
  run dd if="$IMG" of="$DISK" bs=4M conv=fsync status=progress
fi
echo "flash.sh: done. Provision it (edge provision --image-file $DISK ...) if not done on the image."
