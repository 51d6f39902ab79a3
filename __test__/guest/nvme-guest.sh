# Runs inside the guest kit (busybox sh) with QEMU's built-in NVMe (serial "qemu") and ours:
# "ts-trap-shadow" (the defaults), "ts-trap" (no shadow doorbells), "ts-mmap" (mapped doorbells)
# and "ts-ioeventfd" (ioeventfd doorbells).
# Prints NVME-* lines that __test__/guest/nvme.ts reads.
set -e
RUNTIME=__RUNTIME__
ROUNDS=__ROUNDS__
DEVICES=__DEVICES__
modprobe nvme
i=0
until [ "$(ls /dev/nvme*n1 2>/dev/null | wc -l)" -ge "$DEVICES" ]; do
  i=$((i + 1)); [ $i -lt 1500 ] || { echo "NVME-FAIL namespaces did not appear"; ls /dev; dmesg | grep nvme; exit 1; }
  sleep 0.2
done
nvme list
# The namespace of the controller whose serial is $1.
device() {
  for c in /sys/class/nvme/nvme*; do
    [ "$(tr -d ' ' < "$c/serial")" = "$1" ] && echo "/dev/${c##*/}n1"
  done
  return 0
}
ours=$(device ts-trap-shadow)
qemu=$(device qemu)
echo "NVME-DEVICES ts-trap-shadow=$ours ts-trap=$(device ts-trap) ts-mmap=$(device ts-mmap) qemu=$qemu"
[ -n "$ours" ] && [ -n "$qemu" ]
nvme list | grep -q "vfio-user TypeScript NVMe"

# fio first, while every image is as sparse as the others: each job on every device in turn, the
# devices taking turns within each round, in rotated order (terse v3: field 7 read KiB/s, 8 read IOPS).
for job in "randread 4k 1" "randread 4k 32" "read 128k 32"; do
  set -- $job
  for round in $(seq "$ROUNDS"); do
    for name in $(rotate $((round - 1)) qemu ts-trap ts-trap-shadow ts-mmap ts-ioeventfd); do
      dev=$(device $name)
      [ -n "$dev" ] || continue
      line=$(fio --name=j --filename="$dev" --rw="$1" --bs="$2" --iodepth="$3" --ioengine=libaio --direct=1 \
        --runtime="$RUNTIME" --time_based --size=256M --output-format=terse --terse-version=3 | tail -n 1)
      echo "NVME-FIO round=$round device=$name job=$1-$2-qd$3 kibps=$(echo "$line" | cut -d';' -f7) iops=$(echo "$line" | cut -d';' -f8)"
    done
  done
done

# A filesystem on ours (as Linux drives it by default): write a file, drop every cache, read it back.
mkfs.ext4 -q -F "$ours"
mkdir -p /mnt/ours
mount -t ext4 "$ours" /mnt/ours
dd if=/dev/urandom of=/tmp/data bs=1M count=16 2>/dev/null
cp /tmp/data /mnt/ours/data
sync
written=$(md5sum < /tmp/data)
umount /mnt/ours
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 "$ours" /mnt/ours
read=$(md5sum < /mnt/ours/data)
umount /mnt/ours
echo "NVME-CHECKSUM written=${written%% *} read=${read%% *}"
[ "$written" = "$read" ]
