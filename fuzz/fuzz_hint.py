#!/usr/bin/env python3
"""libFuzzer entry point of the 'hint' target (see vballoon.fuzz.targets):

    python fuzz/fuzz_hint.py [libFuzzer options] [CORPUS_DIR...]
"""

from vballoon.fuzz.harness import main

if __name__ == "__main__":
    main("hint")
