"""Device suite: QEMU's balloon driven over qtest by vballoon's own driver."""
