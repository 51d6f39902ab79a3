# Shell functions the guest scripts of the fio runs share; GuestRunner.script puts them first.

# Its arguments after the first, rotated left by the first: each round starts the devices at the
# next one, so none always runs first or right after the same one (a slot's own bias cancels out).
rotate() {
  n=$1; shift
  while [ "$n" -gt 0 ]; do x=$1; shift; set -- "$@" "$x"; n=$((n - 1)); done
  echo "$@"
}
