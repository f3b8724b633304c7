"""A test that fails on purpose, run explicitly by tests/test_rerun.py to see its failure report."""


def test_planted_failure() -> None:
    raise AssertionError("planted failure")
