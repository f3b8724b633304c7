"""Host side: QEMU processes, QMP, qtest, migration."""
