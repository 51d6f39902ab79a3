#!/usr/bin/env bash
# An arm64 Node for the platform test's emulated run: Debian's nodejs:arm64
# and the libraries it needs, unpacked into a folder (installing them would
# replace this machine's own nodejs), plus qemu-user-static to run it with
# `qemu-aarch64-static -L FOLDER`. Debian only; needs root for apt.
# Prints the folder.
set -euo pipefail
root="${VFIO_USER_ARM64_ROOT:-$HOME/.cache/vfio-user/arm64-root}"
if [ -x "$root/usr/bin/node" ] && command -v qemu-aarch64-static >/dev/null && command -v readelf >/dev/null; then
  echo "$root"
  exit 0
fi
{
  dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
  apt-get update
  apt-get install -y qemu-user-static binutils
  debs="$(mktemp -d)"
  trap 'rm -rf "$debs"' EXIT
  # nodejs:arm64's run-time closure; the node-* packages are architecture-independent JS.
  packages="$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances --no-pre-depends nodejs:arm64 | grep -E '^(lib|nodejs|zlib)[^ ]*:arm64$' | sort -u)"
  (cd "$debs" && apt-get download $packages node-acorn node-cjs-module-lexer node-undici)
  mkdir -p "$root"
  for deb in "$debs"/*.deb; do dpkg -x "$deb" "$root"; done
} >&2
echo "$root"
