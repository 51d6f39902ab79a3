#!/bin/sh
# Builds qemu-system-x86_64 with the vfio-user client (`-device vfio-user-pci`) and server
# (`-object x-vfio-user-server`) from a QEMU 10.2 source tree prepared as docs/interop.md says
# (its meson subprojects cloned into subprojects/; --disable-download keeps meson offline).
#
#   scripts/peers/build-qemu.sh SRC OUT [--multiprocess]
#
# --multiprocess adds KVM and multiprocess support, which `-machine x-remote,vfio-user=on` needs
# (QEMU's own devices served over vfio-user). The binary is OUT/qemu-system-x86_64.
# Debian: libglib2.0-dev libpixman-1-dev zlib1g-dev libfdt-dev flex bison python3-venv meson
# ninja-build. Set JOBS to limit parallelism (default: all cores).
set -eu

usage() { echo "usage: $0 SRC OUT [--multiprocess]" >&2; exit 2; }
[ $# -ge 2 ] || usage
SRC=$(realpath "$1")
OUT=$(realpath -m "$2")
shift 2
EXTRA=""
for arg in "$@"; do
  case "$arg" in
    --multiprocess) EXTRA="--enable-kvm --enable-multiprocess" ;;
    *) usage ;;
  esac
done

[ -x "$SRC/configure" ] || { echo "$SRC is not a QEMU source tree" >&2; exit 1; }
# configure fails late and obscurely when a subproject is missing: say which one, up front.
for sub in keycodemapdb berkeley-softfloat-3 berkeley-testfloat-3 libvfio-user; do
  [ -f "$SRC/subprojects/$sub/meson.build" ] || {
    echo "$SRC/subprojects/$sub is missing (see docs/interop.md, 'QEMU')" >&2; exit 1; }
done

mkdir -p "$OUT"
cd "$OUT"
# shellcheck disable=SC2086 # EXTRA is a list of flags
"$SRC/configure" --target-list=x86_64-softmmu --without-default-features --disable-docs \
  --disable-tools --disable-guest-agent --disable-user --disable-download \
  --python=/usr/bin/python3 --disable-werror --enable-vfio-user-server $EXTRA
ninja -j "${JOBS:-$(nproc)}" qemu-system-x86_64
echo "built $OUT/qemu-system-x86_64"
