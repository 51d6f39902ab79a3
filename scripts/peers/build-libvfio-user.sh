#!/bin/sh
# Builds libvfio-user's library and samples (server, client, gpio-pci-idio-16, null, lspci) from
# a source tree (docs/interop.md names the commit the interop rows were run against) into the
# meson build folder OUT, the folder VFIO_USER_LIBVFIO_USER names.
#
#   scripts/peers/build-libvfio-user.sh SRC OUT [--bar1-16k]
#
# --bar1-16k builds a copy of SRC (OUT/source, SRC itself is left alone) whose samples/server.c
# serves a 16 KiB BAR1: the stock 12 KiB is refused by the library itself ("must be a power of
# 2"), so only this build's `server` sample starts (VFIO_USER_LIBVFIO_USER_16K). The stock build
# keeps the 12 KiB its `client` sample counts migration chunks by.
# Debian: meson ninja-build libjson-c-dev libcmocka-dev pkg-config. JOBS limits parallelism.
set -eu

usage() { echo "usage: $0 SRC OUT [--bar1-16k]" >&2; exit 2; }
[ $# -ge 2 ] || usage
SRC=$(realpath "$1")
OUT=$(realpath -m "$2")
shift 2
BAR1_16K=false
for arg in "$@"; do
  case "$arg" in
    --bar1-16k) BAR1_16K=true ;;
    *) usage ;;
  esac
done

[ -f "$SRC/samples/server.c" ] || { echo "$SRC is not a libvfio-user source tree" >&2; exit 1; }
mkdir -p "$OUT"
if $BAR1_16K; then
  rm -rf "$OUT/source"
  mkdir "$OUT/source"
  # Only the sources: a build folder or .git inside SRC would be copied for nothing.
  tar -C "$SRC" --exclude=./.git --exclude=./build -cf - . | tar -C "$OUT/source" -xf -
  SRC="$OUT/source"
  grep -q 'bar1_size = 0x3000;' "$SRC/samples/server.c" ||
    { echo "samples/server.c has no 'bar1_size = 0x3000;' to change: another version?" >&2; exit 1; }
  sed -i 's/bar1_size = 0x3000;/bar1_size = 0x4000;/' "$SRC/samples/server.c"
fi

if [ -f "$OUT/build.ninja" ]; then
  meson setup --reconfigure "$OUT" "$SRC" -Dtran-pipe=false
else
  meson setup "$OUT" "$SRC" -Dtran-pipe=false
fi
ninja -C "$OUT" -j "${JOBS:-$(nproc)}"
for sample in server client gpio-pci-idio-16 null lspci; do
  [ -x "$OUT/samples/$sample" ] || { echo "$OUT/samples/$sample was not built" >&2; exit 1; }
done
echo "built $OUT (samples/ inside)"
