#!/bin/bash -eu
# Builds vballoon's fuzz targets into $OUT the ClusterFuzzLite / OSS-Fuzz way; runs in $SRC/vballoon.
# .clusterfuzzlite/local/check.sh runs this same script without Docker.

pip3 install '.[fuzz]'

# Seed corpora and dictionaries: $OUT/fuzz_<target>_seed_corpus.zip, $OUT/fuzz_<target>.dict.
python3 fuzz/make_corpora.py --out "$OUT"

# One PyInstaller binary per target, $OUT/fuzz_<target>. vballoon/data (the requirement catalogue, the known
# deviations) is read through importlib.resources, so it goes into each binary.
for fuzzer in fuzz/fuzz_*.py; do
  compile_python_fuzzer "$fuzzer" --collect-data vballoon
done

# The differential target's QEMU, with its libraries, modules and firmware, in $OUT/qemu/: a frozen target
# tests that one when VBALLOON_QEMU is unset (vballoon/fuzz/frozen.py).
.clusterfuzzlite/bundle_qemu.sh "$OUT/qemu"
