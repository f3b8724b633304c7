"""Migration suites: a running guest moved between two QEMUs."""
