#!/usr/bin/env bash
# Print the appliance's default edge.toml: the shipped one, with the appliance's paths.
# Usage: image/appliance-config.sh [edge.toml] > rootfs/usr/lib/clinic-edge/edge.toml
set -euo pipefail
source="${1:-$(dirname "$0")/../edge.toml}"
sed -e 's|^data_dir = "var"\( *\)#.*|data_dir = "/var/lib/clinic-edge/data"\1# the encrypted data partition (image/README.md)|' \
    -e 's|^textfile_dir = ""\( *\)#.*|textfile_dir = "/var/lib/prometheus/node-exporter"\1# prometheus-node-exporter'"'"'s textfile folder|' \
    "$source"
