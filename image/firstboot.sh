#!/usr/bin/env bash
# First boot of a flashed node: apply edge-provision.toml from the boot partition, create
# the encrypted data partition with the node's own key, then start the node.
#
# Run by edge-firstboot.service (only while the provisioning file exists). Idempotent: a
# power cut mid-way repeats the steps not yet done on the next boot. EDGE_DRY_RUN=1 prints
# the privileged steps (cryptsetup, mkfs, mount, systemctl) instead of running them, and
# the paths below can be pointed elsewhere: that is how tests/ops/test_image.py runs it.
set -euo pipefail

BOOT="${EDGE_BOOT:-/boot/efi}"
PROVISION="$BOOT/edge-provision.toml"
EDGE="${EDGE_BIN:-/opt/clinic-edge/venv/bin/edge}"
DEV="${EDGE_DATA_DEV:-/dev/disk/by-partlabel/edge-data}"
MNT="${EDGE_DATA_MNT:-/var/lib/clinic-edge}"
KEY="${EDGE_KEY_DIR:-/run/cryptsetup-keys.d}/edge-data.key"
DEFAULT_CONFIG="${EDGE_DEFAULT_CONFIG:-/usr/lib/clinic-edge/edge.toml}"
TPM="${EDGE_TPM:-/sys/class/tpm/tpm0}"
DRY_RUN="${EDGE_DRY_RUN:-0}"

say() { echo "firstboot: $*"; }
priv() {  # privileged steps: printed always, run unless dry-run
  echo "+ $*"
  if [[ "$DRY_RUN" != 1 ]]; then "$@"; fi
}

if [[ ! -f "$PROVISION" ]]; then
  say "no $PROVISION: already provisioned"
  exit 0
fi

# 1. The node's data key, from the provisioning file to a tmpfs (never to a disk).
mkdir -p "$(dirname "$KEY")"
chmod 0700 "$(dirname "$KEY")"
"$EDGE" provision --from-file "$PROVISION" --disk-key-out "$KEY"

# 2. LUKS2 on the data partition, once.
if ! priv cryptsetup isLuks "$DEV" || [[ "$DRY_RUN" == 1 ]]; then
  priv cryptsetup luksFormat --type luks2 --batch-mode --key-file "$KEY" "$DEV"
  FRESH=1
else
  FRESH=0
fi

# 3. Unlock without a person: the TPM2 where the box has one (the key then leaves the box
#    with the field engineer only), else a key file on the boot partition (see README:
#    that protects a stolen data disk only if the boot medium is not stolen with it).
if [[ -e "$TPM" ]]; then
  priv systemd-cryptenroll --unlock-key-file="$KEY" --tpm2-device=auto --tpm2-pcrs=7 "$DEV"
else
  say "no TPM2: keeping the data key on the boot partition"
  mkdir -p "$BOOT/edge"
  install -m 0600 "$KEY" "$BOOT/edge/data.key"
fi

# 4. Open, format once, mount.
priv cryptsetup open --key-file "$KEY" "$DEV" edge-data
if [[ "$FRESH" == 1 ]]; then
  priv mkfs.ext4 -q -L edge-data /dev/mapper/edge-data
fi
priv mount /dev/mapper/edge-data "$MNT"
priv systemd-tmpfiles --create clinic-edge.conf
mkdir -p "$MNT/etc"

# 5. Config and credentials, onto the encrypted partition.
if [[ ! -f "$MNT/etc/edge.toml" ]]; then
  install -m 0600 "$DEFAULT_CONFIG" "$MNT/etc/edge.toml"
fi
"$EDGE" --config "$MNT/etc/edge.toml" provision --from-file "$PROVISION"
priv chown -R edge:edge "$MNT/etc"

# 6. The provisioning file held credentials on a FAT partition: gone now.
shred -u "$PROVISION" 2>/dev/null || rm -f "$PROVISION"
if [[ -e "$TPM" ]]; then
  rm -f "$KEY"
fi
say "provisioned; starting the node"
priv systemctl --no-block start edge.target
