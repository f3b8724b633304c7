"""What identifies a vballoon run in its JUnit files: the names of the testsuite properties that say so.

Every JUnit file a vballoon run writes carries them (fixtures/run_identity.py
adds the identity, the sharding adds the shard). `vballoon report merge`
merges only files whose IDENTITY properties agree.
"""

SHARD = "vballoon.shard"
"""'K/N': this file is shard K of a run split in N."""
COLLECTED = "vballoon.collected"
"""How many tests the sharded run collected in all, before the split."""
VERSION = "vballoon.version"
"""vballoon's version, and the git commit of its source when it runs from a checkout."""
QEMU = "vballoon.qemu"
"""The QEMU under test: the first line of its `--version` and the sha256 of the binary."""
KERNEL = "vballoon.kernel"
"""The guest kernel: a `--kernel` bzImage's release and sha256, else the Debian kernel packages of the variants."""
IDENTITY = (VERSION, QEMU, KERNEL)
"""The properties shards of one run share."""
