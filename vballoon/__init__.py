"""vballoon: conformance test suite and fuzzer for the virtio memory balloon."""

__version__ = "0.1.0"
