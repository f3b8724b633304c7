"""`--dist loadgroup` keeps a group on one worker: a variant's guest boots once per run, not once per worker.

suites/guest/conftest.py marks each guest test with its variant's `xdist_group`
while collecting, in a tryfirst pytest_collection_modifyitems (pytest-xdist
reads the marks in its own, which otherwise runs first). This checks, with the
installed pytest and pytest-xdist, that marks added that way keep a group
together: without tryfirst every group is split, and pytest 9.2 with
pytest-xdist 3.8 ignores them even then (pytest-dev/pytest-xdist#1386).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

CONFTEST = '''
import pytest

@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(item.callspec.params["variant"]))
'''

TESTS = '''
import pytest

@pytest.mark.parametrize("variant", ["a", "b", "c"])
@pytest.mark.parametrize("n", range(4))
def test_one(variant, n):
    pass
'''


def test_loadgroup_keeps_each_group_on_one_worker(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_groups.py").write_text(TESTS)
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup",
                           "-v", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    workers: dict[str, set[str]] = {}
    for worker, variant in re.findall(r"\[(gw\d+)\].*PASSED .*test_one\[\d+-(\w)\]", done.stdout):
        workers.setdefault(variant, set()).add(worker)
    assert sorted(workers) == ["a", "b", "c"], f"expected 12 passed tests of groups a, b, c; got:\n{done.stdout}"
    split = {variant: sorted(names) for variant, names in workers.items() if len(names) > 1}
    assert not split, (f"expected each xdist_group on one worker under --dist loadgroup; groups split over workers: {split} "
                       "(a pytest / pytest-xdist pair that drops the group, see pyproject.toml)")
