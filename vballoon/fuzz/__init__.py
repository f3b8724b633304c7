"""Fuzzing the balloon: the binary input format, the targets, the QEMU differential executor, crash files,
campaigns and replay."""
