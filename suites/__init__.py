"""The conformance suites: what users run against their QEMU and kernel."""
