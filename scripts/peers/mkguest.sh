#!/bin/bash
# Builds the test guest from Debian 12 packages into OUT: OUT/vmlinuz (the kernel
# linux-image-amd64 depends on, 6.1) and OUT/initramfs.cpio.gz (guest-init as /init, static
# busybox, and the host's kmod, lspci, libgpiod tools, nvme-cli, mke2fs and fio with their shared
# libraries, plus the kernel modules below with their dependencies).
#
#   scripts/peers/mkguest.sh OUT
#
# Installs missing host packages with apt-get, so it runs as root. Re-running rebuilds OUT.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUT" >&2; exit 2; }
HERE=$(dirname "$(realpath "$0")")
OUT=$(realpath -m "$1")

# The drivers the tests bind (the 8250 UART is built into Debian's kernel).
MODULES="gpio-pci-idio-16 nvme ext4 virtio_pci virtio_blk virtio_net virtio_console virtio-rng"
TOOLS="/usr/bin/kmod /usr/bin/lspci /usr/bin/gpiodetect /usr/bin/gpioinfo /usr/bin/gpioget
       /usr/bin/gpioset /usr/bin/gpiomon /usr/sbin/nvme /usr/sbin/mke2fs /usr/bin/fio"
HOST_PACKAGES="busybox-static cpio kmod pciutils gpiod nvme-cli e2fsprogs fio xz-utils zstd"

missing=()
for p in $HOST_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

kernel_package=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
[ -n "$kernel_package" ] || { echo "apt knows no linux-image-amd64: run apt-get update" >&2; exit 1; }
version=${kernel_package#linux-image-}

mkdir -p "$OUT"
scratch=$(mktemp -d "$OUT/.build.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
kernel=$scratch/kernel root=$scratch/root
mkdir "$kernel" "$root"
(cd "$scratch" && apt-get download -q -o APT::Sandbox::User=root "$kernel_package")
dpkg-deb -x "$scratch/${kernel_package}"_*.deb "$kernel"

# The host's merged-/usr layout, so the library paths ldd prints exist in the guest as they are.
mkdir -p "$root"/usr/{bin,sbin,lib,lib64,share/misc} "$root"/{dev,proc,sys,tmp,etc,mnt}
for d in bin sbin lib lib64; do ln -s "usr/$d" "$root/$d"; done
cp /bin/busybox "$root/usr/bin/busybox"
install -m 0755 "$HERE/guest-init" "$root/init"

for tool in $TOOLS; do
  cp "$tool" "$root$tool"
  # ldd lines are "name => /path (addr)" or "/path (addr)" for the loader.
  ldd "$tool" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | while read -r lib; do
    if [ ! -e "$root$lib" ]; then
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    fi
  done
done
for name in modprobe insmod rmmod lsmod modinfo; do ln -s ../bin/kmod "$root/usr/sbin/$name"; done
ln -s mke2fs "$root/usr/sbin/mkfs.ext4"
cp /usr/share/misc/pci.ids "$root/usr/share/misc/"
cp /etc/mke2fs.conf "$root/etc/"

# The package's modules.dep names the dependencies; the guest gets them uncompressed (busybox's
# and kmod's loaders then need no decompressor) and an index of its own.
depmod -b "$kernel" "$version"
modules=lib/modules/$version
for m in $MODULES; do modprobe -S "$version" -d "$kernel" --show-depends "$m"; done |
  awk '$1 == "insmod" { print $2 }' | sort -u | while read -r ko; do
    rel=${ko#"$kernel"/}
    mkdir -p "$root/$(dirname "$rel")"
    case $ko in
      *.xz) xz -dc "$ko" >"$root/${rel%.xz}" ;;
      *.zst) zstd -qdc "$ko" >"$root/${rel%.zst}" ;;
      *) cp "$ko" "$root/$rel" ;;
    esac
  done
cp "$kernel/$modules"/modules.{order,builtin,builtin.modinfo} "$root/$modules/"
depmod -b "$root" "$version"

cp "$kernel/boot/vmlinuz-$version" "$OUT/vmlinuz"
(cd "$root" && find . | cpio -o -H newc -R 0:0 --quiet | gzip -6) >"$OUT/initramfs.cpio.gz.tmp"
mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
echo "guest kit: kernel $version, $(find "$root/$modules" -name '*.ko' | wc -l) modules," \
  "initramfs $(du -h "$OUT/initramfs.cpio.gz" | cut -f1) in $OUT"
