#!/bin/bash
# Boots the test guest (mkguest.sh's output) under QEMU with TCG, one vfio-user-pci device per
# --socket, runs SCRIPT inside it as /test.sh (busybox sh) and exits with SCRIPT's status. The
# guest's console is copied to stdout. Arguments after `--` go to QEMU as they are (a reference
# device built into QEMU, for instance).
#
#   scripts/peers/run-guest.sh [options] SCRIPT [-- QEMU_ARGS...]
#     --qemu PATH     qemu-system-x86_64 with vfio-user-pci (default $VFIO_USER_QEMU)
#     --guest DIR     mkguest.sh's output (default $VFIO_USER_GUEST)
#     --socket PATH   a vfio-user server's socket; repeat for more devices
#     --mem SIZE      guest RAM (default 1G)
#     --smp N         guest CPUs (default 2)
#     --timeout SECS  the whole run, boot included (default 300)
#     --append TEXT   more kernel command line
#
# Exit status: SCRIPT's; 124 when the timeout hit; 125 when the guest never got ready (QEMU did
# not start, or no server on a socket); 126 when it died after that without a status (a panic).
set -uo pipefail
usage() { sed -n '/^#   /,/^# Exit/{/^# Exit/d;s/^# \{0,1\}//;p}' "$0" >&2; exit 2; }

qemu=${VFIO_USER_QEMU:-} guest=${VFIO_USER_GUEST:-} mem=1G smp=2 timeout=300 append=''
devices=()
while [ $# -gt 0 ]; do
  case $1 in
    --qemu) qemu=${2:?}; shift 2 ;;
    --guest) guest=${2:?}; shift 2 ;;
    --socket) devices+=(-device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"${2:?}\"}}"); shift 2 ;;
    --mem) mem=${2:?}; shift 2 ;;
    --smp) smp=${2:?}; shift 2 ;;
    --timeout) timeout=${2:?}; shift 2 ;;
    --append) append=${2:?}; shift 2 ;;
    -*) usage ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] && [ -f "$1" ] || usage
script=$1
shift
[ "${1:-}" = -- ] && shift
[ -n "$qemu" ] && [ -x "$qemu" ] || { echo "run-guest: --qemu or VFIO_USER_QEMU must name QEMU" >&2; exit 2; }
[ -f "$guest/vmlinuz" ] && [ -f "$guest/initramfs.cpio.gz" ] ||
  { echo "run-guest: --guest or VFIO_USER_GUEST must name mkguest.sh's output" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Linux unpacks concatenated archives in turn: the kit's, then one holding the script.
mkdir "$work/add"
install -m 0755 "$script" "$work/add/test.sh"
(cd "$work/add" && echo test.sh | cpio -o -H newc -R 0:0 --quiet | gzip) >"$work/test.cpio.gz"
cat "$guest/initramfs.cpio.gz" "$work/test.cpio.gz" >"$work/initrd"

# Guest RAM is a shared memfd: vfio-user servers map it from the fds DMA_MAP passes.
# no_timer_check: on a loaded host TCG can miss the kernel's IO-APIC timer check, which panics.
# SeaBIOS writes terminal resets and escape sequences to the console, stripped on the way out.
timeout --foreground -k 5 "$timeout" "$qemu" -accel tcg -nodefaults -nographic -no-reboot \
  -serial mon:stdio -smp "$smp" -m "$mem" \
  -object "memory-backend-memfd,id=mem,size=$mem,share=on" -machine q35,memory-backend=mem \
  -kernel "$guest/vmlinuz" -initrd "$work/initrd" \
  -append "console=ttyS0 panic=-1 loglevel=4 edd=off no_timer_check $append" \
  "${devices[@]}" "$@" </dev/null | sed -u 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g' | tee "$work/console"
qemu_status=${PIPESTATUS[0]}

status=$(tr -d '\r' <"$work/console" | sed -n 's/.*=== GUEST TEST RC=\([0-9]\{1,3\}\).*/\1/p' | tail -n 1)
if [ -z "$status" ]; then
  if [ "$qemu_status" = 124 ] || [ "$qemu_status" = 137 ]; then status=124
  elif grep -q '=== GUEST READY' "$work/console"; then status=126
  else status=125
  fi
fi
echo "run-guest: exit $status after ${SECONDS}s" >&2
exit "$status"
