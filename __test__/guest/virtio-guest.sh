# Runs inside the guest kit (busybox sh) with our virtio-blk (serial "ts-blk", notified through its
# mapped notification page; "ts-trap" by trapped writes), our virtio-rng and
# QEMU's built-in virtio-blk-pci (serial "qemu"). Prints VIRTIO-* lines that __test__/guest/virtio.ts reads.
set -e
RUNTIME=__RUNTIME__
ROUNDS=__ROUNDS__
modprobe virtio_pci
modprobe virtio_blk
modprobe virtio-rng
modprobe virtio_console
# The disk whose serial is $1.
disk() {
  for b in /sys/block/vd*; do
    [ "$(cat "$b/serial" 2>/dev/null)" = "$1" ] && echo "/dev/${b##*/}"
  done
  return 0
}
i=0
until [ -n "$(disk ts-blk)" ] && [ -n "$(disk ts-trap)" ] && [ -n "$(disk qemu)" ]; do
  i=$((i + 1)); [ $i -lt 1500 ] || { echo "VIRTIO-FAIL the disks did not appear"; ls /sys/block; dmesg | grep -i virtio; exit 1; }
  sleep 0.2
done
ours=$(disk ts-blk)
qemu=$(disk qemu)
echo "VIRTIO-DISKS ts-blk=$ours qemu=$qemu sectors=$(cat /sys/block/${ours#/dev/}/size)"
lspci -nn -k | grep -A3 '1af4:104'
# The ring layout virtio_ring negotiated with each device (feature bit 34, RING_PACKED; bit 0 comes first).
for d in /sys/bus/virtio/devices/*; do echo "VIRTIO-RING device=$(cat "$d/device") packed=$(cut -c35 "$d/features")"; done

# fio first, each job on every disk in turn, the disks taking turns within each round in rotated order (terse v3:
# field 7 read KiB/s, 8 read IOPS).
for job in "randread 4k 1" "randread 4k 32"; do
  set -- $job
  for round in $(seq "$ROUNDS"); do
    for name in $(rotate $((round - 1)) qemu ts-blk ts-trap); do
      line=$(fio --name=j --filename="$(disk $name)" --rw="$1" --bs="$2" --iodepth="$3" --ioengine=libaio --direct=1 \
        --runtime="$RUNTIME" --time_based --size=128M --output-format=terse --terse-version=3 | tail -n 1)
      echo "VIRTIO-FIO round=$round device=$name job=$1-$2-qd$3 kibps=$(echo "$line" | cut -d';' -f7) iops=$(echo "$line" | cut -d';' -f8)"
    done
  done
done

# ext4 on ours: write a file, drop every cache, read it back.
/usr/sbin/mke2fs -q -t ext4 -F "$ours"
mkdir -p /mnt/ours
mount -t ext4 "$ours" /mnt/ours
dd if=/dev/urandom of=/tmp/data bs=1M count=16 2>/dev/null
cp /tmp/data /mnt/ours/data
sync
written=$(md5sum < /tmp/data)
umount /mnt/ours
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 "$ours" /mnt/ours
[ "$(md5sum < /mnt/ours/data)" = "$written" ] && echo "VIRTIO-EXT4 intact"
fstrim -v /mnt/ours 2>/dev/null || true
umount /mnt/ours

# Our virtio-blk notified by trapped writes: 1 MiB written, caches dropped, read back.
trapped=$(disk ts-trap)
dd if=/dev/urandom of=/tmp/trap-data bs=4k count=256 2>/dev/null
dd if=/tmp/trap-data of="$trapped" bs=4k conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
[ "$(dd if="$trapped" bs=4k count=256 2>/dev/null | md5sum)" = "$(md5sum < /tmp/trap-data)" ] && echo "VIRTIO-TRAP intact"

# /dev/hwrng from our virtio-rng.
echo "VIRTIO-RNG current=$(cat /sys/class/misc/hw_random/rng_current)"
bytes=$(dd if=/dev/hwrng bs=512 count=1 2>/dev/null | wc -c)
[ "$bytes" = 512 ] && echo "VIRTIO-RNG read=$bytes"

# Our virtio-console: a line out through /dev/hvc0, and the host's answer back in.
i=0
until [ -c /dev/hvc0 ]; do i=$((i + 1)); [ $i -lt 100 ] || { echo "VIRTIO-FAIL no /dev/hvc0"; exit 1; }; sleep 0.1; done
# hvc resets its termios on the last close: the line goes out as a tty writes it (\r\n).
(timeout 60 head -n 1 /dev/hvc0 > /tmp/console-in) &
reader=$!
sleep 0.5
echo "ping from the guest" > /dev/hvc0
wait $reader || true
echo "VIRTIO-CONSOLE got=$(tr -d '\r' < /tmp/console-in)"
