"""Guest suites: the Linux driver in a real guest, per variant."""
