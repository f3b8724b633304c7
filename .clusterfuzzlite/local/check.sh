#!/bin/bash -eu
# check.sh: build the fuzz targets with .clusterfuzzlite/build.sh, unchanged, the way ClusterFuzzLite would but
# without Docker, then run each built binary from its seed corpus and check that it exits 0.
#   SRC, OUT, WORK   temporary folders (removed at the end; VBALLOON_CFLITE_KEEP=1 keeps them)
#   $SRC/vballoon    a copy of the project without what .dockerignore leaves out of the image
#   PATH             .clusterfuzzlite/local first, for its compile_python_fuzzer; pyinstaller and pip3 from the
#                    environment this runs in (`make cflite-check`: tox env cflite)
# VBALLOON_CFLITE_RUNS: executions per target (default 2000); VBALLOON_CFLITE_DIFFERENTIAL_RUNS: for qemu_differential
# (default 300, each one a QEMU round trip), which runs the QEMU bundled in $OUT/qemu/ (VBALLOON_QEMU is unset).
# One line per target: executions, seconds, coverage, exit status.

here=$(cd "$(dirname "$0")" && pwd)
project=$(cd "$here/../.." && pwd)
runs=${VBALLOON_CFLITE_RUNS:-2000}
differential_runs=${VBALLOON_CFLITE_DIFFERENTIAL_RUNS:-300}
unset VBALLOON_QEMU

scratch=$(mktemp -d "${TMPDIR:-/tmp}/vballoon-cflite.XXXXXX")
if [ "${VBALLOON_CFLITE_KEEP:-0}" = 1 ]; then
  echo "check.sh: keeping $scratch"
else
  trap 'rm -rf "$scratch"' EXIT
fi
export SRC=$scratch/src OUT=$scratch/out WORK=$scratch/work
mkdir -p "$SRC/vballoon" "$OUT" "$WORK"
export PATH="$here:$PATH"

# COPY . $SRC/vballoon, less .dockerignore's patterns (as tar patterns: "**/" dropped, comments skipped).
sed -e '/^#/d' -e '/^$/d' -e 's#^\*\*/##' "$project/.dockerignore" > "$WORK/excludes"
tar -C "$project" --exclude-from="$WORK/excludes" -cf - . | tar -C "$SRC/vballoon" -xf -
cp "$project/.clusterfuzzlite/build.sh" "$SRC/"

started=$(date +%s)
if ! (cd "$SRC/vballoon" && bash -eu "$SRC/build.sh") > "$WORK/build.log" 2>&1; then
  tail -n 30 "$WORK/build.log"
  echo "check.sh: build.sh failed (log above)"
  exit 1
fi
echo "check.sh: build.sh built $(ls "$OUT"/*.pkg | wc -l) fuzzers in $(( $(date +%s) - started )) s"

# The fuzzers run with a PATH of the few commands the wrappers use and no QEMU: the differential target has to find
# the QEMU bundled in $OUT/qemu/, as on a runner image without QEMU installed.
mkdir -p "$WORK/bin"
for command in sh dirname chmod readlink; do
  ln -s "$(command -v "$command")" "$WORK/bin/"
done

failed=0
for fuzzer in "$OUT"/fuzz_*; do
  [ -x "$fuzzer" ] && [ "${fuzzer%.pkg}" = "$fuzzer" ] || continue
  name=$(basename "$fuzzer")
  corpus=$WORK/corpus/$name
  mkdir -p "$corpus"
  python3 -m zipfile -e "$OUT/${name}_seed_corpus.zip" "$corpus"
  options=(-runs="$runs" -print_final_stats=1 -artifact_prefix="$WORK/$name-")
  [ "$name" = fuzz_qemu_differential ] && options[0]=-runs=$differential_runs
  if [ -f "$SRC/vballoon/fuzz/$name.dict" ]; then
    [ -f "$OUT/$name.dict" ] || { echo "$name: fuzz/$name.dict is not in \$OUT"; failed=$((failed + 1)); }
    options+=(-dict="$OUT/$name.dict")
  fi
  log=$WORK/$name.log
  begin=$EPOCHREALTIME
  status=0
  (cd "$WORK" && PATH=$WORK/bin VBALLOON_FUZZ_CRASHES=$WORK/crashes "$fuzzer" "${options[@]}" "$corpus") > "$log" 2>&1 ||
    status=$?
  seconds=$(awk "BEGIN {print $EPOCHREALTIME - $begin}")
  executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  coverage=$(grep -Eo '^#[0-9]+[[:space:]]+DONE +cov: [0-9]+' "$log" | grep -Eo '[0-9]+$' || true)
  printf '%s: %s execs in %.1f s, cov %s, exit %s\n' "$name" "${executions:-?}" "$seconds" "${coverage:-?}" "$status"
  if [ "$status" != 0 ]; then
    failed=$((failed + 1))
    grep -v '^INFO: Instrumenting' "$log" | tail -n 20 | sed 's/^/    /'
  fi
done

[ "$failed" = 0 ] || { echo "check.sh: $failed fuzzer(s) did not exit 0"; exit 1; }
echo "check.sh: every fuzzer built by build.sh ran from its seeds and exited 0"
