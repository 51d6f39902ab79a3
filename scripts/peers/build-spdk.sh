#!/bin/sh
# Builds SPDK's NVMe-over-vfio-user target and hosts (build/bin/nvmf_tgt, spdk_tgt,
# spdk_nvme_identify, spdk_nvme_perf; scripts/rpc.py), its vfio-user virtio-blk endpoint (in
# spdk_tgt) and bdevperf (build/examples/bdevperf: SPDK's virtio driver as a host) from an SPDK
# source tree with its dpdk and libvfio-user submodules checked out (docs/interop.md names the
# commits). SPDK builds only in its own tree, so SRC is copied to OUT (without .git) and built
# there; SRC is left alone.
# VFIO_USER_SPDK names OUT.
#
#   scripts/peers/build-spdk.sh SRC OUT
#
# Debian: libnuma-dev uuid-dev libssl-dev libaio-dev python3-pyelftools python3-tabulate
# python3-yaml python3-jinja2 meson ninja-build libjson-c-dev libcmocka-dev pkg-config.
# JOBS limits parallelism (default: all cores).
set -eu

[ $# -eq 2 ] || { echo "usage: $0 SRC OUT" >&2; exit 2; }
SRC=$(realpath "$1")
OUT=$(realpath -m "$2")
[ -x "$SRC/configure" ] && [ -d "$SRC/lib/nvmf" ] || { echo "$SRC is not an SPDK source tree" >&2; exit 1; }
for sub in dpdk libvfio-user; do
  [ -f "$SRC/$sub/meson.build" ] || { echo "$SRC/$sub is not checked out (see docs/interop.md, 'SPDK')" >&2; exit 1; }
done

mkdir -p "$OUT"
tar -C "$SRC" --exclude=.git -cf - . | tar -C "$OUT" -xf -
cd "$OUT"

# The dpdk submodule's pinned commit is not public; its spdk-23.11 branch builds, but has no
# rte_argparse, which env.mk links unconditionally: link it only when DPDK built it.
if grep -q '^DPDK_LIB_LIST = rte_eal rte_kvargs rte_log rte_telemetry rte_argparse$' lib/env_dpdk/env.mk; then
  sed -i 's/^DPDK_LIB_LIST = rte_eal rte_kvargs rte_log rte_telemetry rte_argparse$/DPDK_LIB_LIST = rte_eal rte_kvargs rte_log rte_telemetry\
ifneq (, $(wildcard $(DPDK_LIB_DIR)\/librte_argparse.*))\
DPDK_LIB_LIST += rte_argparse\
endif/' lib/env_dpdk/env.mk
fi
# configure disables ISA-L by itself when nasm is missing, but first insists on its sources.
[ -f isa-l/autogen.sh ] || touch isa-l/autogen.sh

# SPDK's build scripts want Debian's python3 (with pyelftools), not a virtual environment's.
PATH=/usr/bin:$PATH
export PATH
./configure --with-vfio-user --with-vhost --with-virtio --disable-tests --disable-unit-tests --disable-examples \
  --without-crypto --without-isal-crypto --without-fio --without-xnvme --without-ocf \
  --without-rdma --without-uring --without-usdt --without-idxd --without-nvme-cuse
make -j "${JOBS:-$(nproc)}"
# The examples are configured out (--disable-examples: the rest are not needed), bdevperf is built alone.
make -j "${JOBS:-$(nproc)}" -C examples/bdev/bdevperf
for bin in bin/nvmf_tgt bin/spdk_tgt bin/spdk_nvme_identify bin/spdk_nvme_perf examples/bdevperf; do
  [ -x "build/$bin" ] || { echo "build/$bin was not built" >&2; exit 1; }
done
echo "built $OUT (build/bin/, build/examples/bdevperf, scripts/rpc.py)"
