#!/usr/bin/env bash
# First boot of a flashed node, in two stages (image/README.md "First boot").
#
#   firstboot.sh disk     early, before the data partition is unlocked (edge-firstboot.service):
#                         check edge-provision.toml, put its data key in /run, make the data
#                         partition in the card's free space and LUKS2-format it, once.
#   firstboot.sh open     every boot (edge-data.service): unlock the data partition (TPM2 or the
#                         key in /run), make its filesystem if it has none, mount it.
#   firstboot.sh config   once the data partition is mounted (edge-provision.service):
#                         default config + the file applied (secrets mode 600), file deleted.
#
# Idempotent: a power cut mid-way repeats what was not done on the next boot. A bad file
# stops here with the reason on the console and in firstboot-error.txt on the ESP; fix the
# file (edge provision --image-file …) and reboot. EDGE_DRY_RUN=1 prints the privileged
# steps instead of running them; the paths can be pointed elsewhere (tests/ops/test_image.py).
set -euo pipefail

STAGE="${1:?usage: firstboot.sh disk|open|config}"
BOOT="${EDGE_BOOT:-/boot/efi}"
PROVISION="$BOOT/edge-provision.toml"
ERRORS="$BOOT/firstboot-error.txt"
EDGE="${EDGE_BIN:-/opt/clinic-edge/venv/bin/edge}"
DEV="${EDGE_DATA_DEV:-/dev/disk/by-partlabel/edge-data}"
MNT="${EDGE_DATA_MNT:-/var/lib/clinic-edge}"
KEY="${EDGE_KEY_DIR:-/run/cryptsetup-keys.d}/edge-data.key"
DEFAULT_CONFIG="${EDGE_DEFAULT_CONFIG:-/usr/lib/clinic-edge/edge.toml}"
TPM="${EDGE_TPM:-/sys/class/tpm/tpm0}"
DRY_RUN="${EDGE_DRY_RUN:-0}"
# Argon2id at 64 MiB: the LUKS2 default (up to 1 GiB) does not fit a 1 GB box. The key is
# 32+ random bytes, so the KDF's cost adds nothing against guessing it.
PBKDF=(--pbkdf argon2id --pbkdf-memory 65536 --pbkdf-parallel 1 --pbkdf-force-iterations 4)

say() { echo "firstboot: $*"; }
priv() {  # privileged steps: printed always, run unless dry-run
  echo "+ $*"
  if [[ "$DRY_RUN" != 1 ]]; then "$@"; fi
}
fail() {  # the reason, where a field engineer looks: the console and the card itself
  say "FAILED: $*" >&2
  if [[ -w /dev/console && "$DRY_RUN" != 1 ]]; then echo "clinic-edge first boot FAILED: $*" > /dev/console || true; fi
  printf 'Clinic Edge first boot failed (%s):\n%s\nFix edge-provision.toml (edge provision --image-file ...) and restart the box.\n' \
    "$(date -u +%FT%TZ)" "$*" > "$ERRORS" || true
  exit 1
}

if [[ ! -f "$PROVISION" && "$STAGE" != open ]]; then
  say "no $PROVISION: nothing to provision"
  exit 0
fi

disk_stage() {
  # 1. The file must be whole and valid before anything is changed; 2. then its data key
  #    goes to a tmpfs (never to a disk). One run of the node's CLI: Python starts slowly.
  local why
  mkdir -p "$(dirname "$KEY")"
  chmod 0700 "$(dirname "$KEY")"
  if ! why=$("$EDGE" --config "$DEFAULT_CONFIG" provision --from-file "$PROVISION" --check --disk-key-out "$KEY" 2>&1); then
    fail "$why"
  fi
  # 3. The data partition, in the card's free space after the slots (once).
  if [[ ! -e "$DEV" ]]; then
    local root_part disk
    root_part=$(findmnt -no SOURCE / 2>/dev/null || true)
    disk="${EDGE_DISK:-/dev/$(lsblk -no PKNAME "$root_part" 2>/dev/null | head -1)}"
    [[ -b "$disk" || "$DRY_RUN" == 1 ]] || fail "cannot find the disk of $root_part"
    priv sfdisk --relocate gpt-bak-std "$disk"
    # A here-string, not a pipe: under pipefail, echo's SIGPIPE (dry run: nothing reads) would fail the step.
    priv sfdisk --append --no-reread "$disk" <<< 'type=CA7D7CCB-63ED-4C53-861C-1742536059CC, name=edge-data'
    priv partx --update "$disk" || priv partprobe "$disk" || true
    priv udevadm settle --timeout=30
  fi
  # 4. LUKS2, once. A header this key opens is ours (a power cut after formatting). One it
  #    does not open is a stale card's or a torn format: reformat, unless this box has been
  #    provisioned before (the marker on the ESP) — then its data is at stake: stop.
  if [[ "$DRY_RUN" == 1 ]] || ! cryptsetup isLuks "$DEV" 2>/dev/null; then
    priv cryptsetup luksFormat --type luks2 --batch-mode "${PBKDF[@]}" --key-file "$KEY" --label edge-data "$DEV"
  elif ! cryptsetup open --test-passphrase --key-file "$KEY" "$DEV" 2>/dev/null; then
    if [[ -e "$BOOT/edge/provisioned" ]]; then
      fail "the data partition is locked with another key than this provisioning file's [disk] luks_key: use this box's escrowed key (its data stays), or wipe the card to start over"
    fi
    say "the data partition has a header this key does not open (stale card or an interrupted format): formatting again"
    priv cryptsetup luksFormat --type luks2 --batch-mode "${PBKDF[@]}" --key-file "$KEY" --label edge-data "$DEV"
  fi
  # 5. Unlock without a person: the TPM2 where the box has one (the key then leaves the box
  #    with the field engineer only), else a key file on the ESP (see image/README.md: that
  #    protects a stolen data disk only if the boot medium is not stolen with it).
  if [[ -e "$TPM" ]]; then
    priv systemd-cryptenroll --unlock-key-file="$KEY" --tpm2-device=auto --tpm2-pcrs=7 "$DEV"
  else
    say "no TPM2: keeping the data key on the ESP"
    mkdir -p "$BOOT/edge"
    # Not install -m: FAT (umask=0077 in fstab) refuses a chmod; a file made under umask 077 is 0600 anywhere.
    (umask 077 && cp "$KEY" "$BOOT/edge/data.key.new" && mv -f "$BOOT/edge/data.key.new" "$BOOT/edge/data.key")
    sync -f "$BOOT/edge/data.key" 2>/dev/null || true
  fi
  rm -f "$ERRORS"
  say "data partition ready"
}

open_stage() {
  # Explicit rather than crypttab/fstab: on a card never provisioned there is no partition,
  # and on first boot it appears only after the disk stage; a device timeout would race it.
  if [[ ! -e "$DEV" ]]; then
    say "no data partition ($DEV): this card is not provisioned"
    exit 0
  fi
  if [[ ! -e /dev/mapper/edge-data ]]; then
    # The key file where the box has no TPM2 (edge-datakey.service put it in /run), else
    # the TPM2 token enrolled at first boot.
    # (systemd 252 with tpm2-device=auto and no TPM2 ignores a given key file: hence two.)
    if [[ -f "$KEY" ]]; then
      priv /lib/systemd/systemd-cryptsetup attach edge-data "$DEV" "$KEY" "luks,discard,headless=true"
    else
      priv /lib/systemd/systemd-cryptsetup attach edge-data "$DEV" - "luks,discard,headless=true,tpm2-device=auto"
    fi
  fi
  if ! priv blkid -p /dev/mapper/edge-data >/dev/null; then
    priv mkfs.ext4 -q -L edge-data /dev/mapper/edge-data
  fi
  mkdir -p "$MNT"
  mountpoint -q "$MNT" || priv mount -o noatime /dev/mapper/edge-data "$MNT"
  priv systemd-tmpfiles --create clinic-edge.conf
  say "data partition mounted on $MNT"
}

config_stage() {
  # The data partition is mounted here (edge-data.service: the open stage).
  mountpoint -q "$MNT" || [[ "$DRY_RUN" == 1 ]] || fail "the data partition is not mounted on $MNT"
  priv systemd-tmpfiles --create clinic-edge.conf
  mkdir -p "$MNT/etc"
  if [[ ! -f "$MNT/etc/edge.toml" ]]; then
    install -m 0600 "$DEFAULT_CONFIG" "$MNT/etc/edge.toml"
  fi
  local why
  if ! why=$("$EDGE" --config "$MNT/etc/edge.toml" provision --from-file "$PROVISION" 2>&1); then
    fail "$why"
  fi
  echo "$why"
  priv chown -R edge:edge "$MNT/etc"
  sync -f "$MNT/etc/edge.toml"
  # The provisioning file held credentials on a FAT partition: gone now.
  shred -u "$PROVISION" 2>/dev/null || rm -f "$PROVISION"
  sync -f "$BOOT" 2>/dev/null || true
  if [[ -e "$TPM" ]]; then
    rm -f "$KEY"
  fi
  rm -f "$ERRORS"
  mkdir -p "$BOOT/edge" && : > "$BOOT/edge/provisioned"
  say "provisioned"
}

case "$STAGE" in
  disk) disk_stage ;;
  open) open_stage ;;
  config) config_stage ;;
  *) echo "usage: firstboot.sh disk|open|config" >&2; exit 2 ;;
esac
