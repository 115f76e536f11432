#!/usr/bin/env bash
# Two builds of one commit: are they the same image, and if not, where do they differ?
#
#   image/compare.sh A/clinic-edge-<version>.img B/clinic-edge-<version>.img
#
# Compares the GPT, the ESP (bytes, then file by file with mtools) and root A (bytes, then
# the squashfs listing with times and modes, then file contents). Exits 0 when the images
# are the same bytes, 1 when they differ (it says where), 2 on bad arguments.
# The partition offsets are build.sh's (ESP_MB, SLOT_MB).
set -euo pipefail
A="${1:?usage: compare.sh IMAGE_A IMAGE_B}"
B="${2:?usage: compare.sh IMAGE_A IMAGE_B}"
for f in "$A" "$B"; do [[ -f "$f" ]] || { echo "compare.sh: $f: no such image" >&2; exit 2; }; done
for tool in mcopy unsquashfs cmp; do
  command -v "$tool" >/dev/null || { echo "compare.sh: needs $tool (apt-get install mtools squashfs-tools)" >&2; exit 2; }
done
ESP_MB=256
SLOT_MB=768
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
export MTOOLS_SKIP_CHECK=1

MIB=$((1024 * 1024))
ESP_AT=$((1 * MIB))
ROOT_AT=$(((1 + ESP_MB) * MIB))
same() {  # same OFFSET LENGTH: are both images' bytes there equal
  cmp -s -n "$2" -i "$1:$1" "$A" "$B"
}

if cmp -s "$A" "$B"; then
  echo "same: the two images are the same bytes ($(sha256sum < "$A" | cut -c1-16)…)"
  exit 0
fi
same 0 "$ESP_AT" && echo "same: GPT" || echo "DIFFERS: GPT (partition table, first MiB)"
if same "$ESP_AT" $((ESP_MB * MIB)); then
  echo "same: ESP"
else
  echo "DIFFERS: ESP; by file:"
  for side in a b; do
    img=$([[ $side == a ]] && echo "$A" || echo "$B")
    mkdir "$W/$side.espf"; mcopy -s -n -m -i "$img@@$ESP_AT" ::/ "$W/$side.espf/"
  done
  files=$(diff -rq "$W/a.espf" "$W/b.espf" | sed 's|'"$W"'/[ab].espf||g' || true)
  echo "${files:-  (the same files and contents: only FAT metadata, e.g. times, differs)}"
fi
if same "$ROOT_AT" $((SLOT_MB * MIB)); then
  echo "same: root A (squashfs)"
else
  echo "DIFFERS: root A (squashfs); listing (mode, owner, size, time) then contents:"
  for side in a b; do unsquashfs -o "$ROOT_AT" -lls "$([[ $side == a ]] && echo "$A" || echo "$B")" | sed 1,3d > "$W/$side.lls"; done
  diff "$W/a.lls" "$W/b.lls" | head -40 || true
  if [[ $(id -u) -eq 0 ]]; then  # extracting device nodes needs root
    for side in a b; do unsquashfs -o "$ROOT_AT" -q -n -d "$W/$side.rootf" "$([[ $side == a ]] && echo "$A" || echo "$B")" >/dev/null; done
    diff -rq --no-dereference "$W/a.rootf" "$W/b.rootf" 2>&1 | grep -v 'character special file' | sed 's|'"$W"'/[ab].rootf||g' | head -40 || true
  else
    echo "  (contents: run as root to compare them file by file)"
  fi
fi
exit 1
