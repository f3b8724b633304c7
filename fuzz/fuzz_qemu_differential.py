#!/usr/bin/env python3
"""libFuzzer entry point of the 'qemu_differential' target (see vballoon.fuzz.targets):

    python fuzz/fuzz_qemu_differential.py [libFuzzer options] [CORPUS_DIR...]
"""

from vballoon.fuzz.harness import main

if __name__ == "__main__":
    main("qemu_differential")
