"""Scenarios of balloon operations, the executors that run them, and the judge of their observations.

`operations` is the data model (operation types, `Scenario`, its JSON form) and `observation` what an executor
shows after an operation. `reference_executor` runs a scenario on the reference device in memory and
`qemu_executor` on QEMU's balloon over qtest (with the standalone reproducer); each maps every operation type
to a handler in one table. `judge` compares a QEMU observation with the reference's, and `differential_run`
steps one scenario through both executors.

The data model, the reference executor and the judge import nothing of QEMU, SSH or QMP: the fuzz format and
the reference-only fuzz targets load without them (tests/test_scenario.py checks it).
"""
