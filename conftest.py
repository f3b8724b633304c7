"""The vballoon pytest plugin: options, matrix parametrisation, requirement marks, the requirements property.

Options (see README): --qemu, --kernel, --modules, --accel, --matrix, --variant, --cold;
--shard splits a run over machines (fixtures/shards.py).
A test that takes a `variant` argument runs once per variant of the chosen
tier (or of the --variant names). A test names the spec statements it checks
with `@pytest.mark.req("BAL-...")`; unknown IDs stop collection.
"""

from __future__ import annotations

import logging
import os
import signal

import pytest

from vballoon.errors import VballoonError
from vballoon.matrix import TIERS, Variant, tier
from vballoon.requirements import check_marker_args
from vballoon.rerun import RUN_OPTIONS, rerun_command
from vballoon.session import Session

pytest_plugins = ["fixtures.machines", "fixtures.guest_vm", "fixtures.qtest_device", "fixtures.migration",
                  "fixtures.run_identity", "fixtures.shards", "fixtures.timeline"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vballoon")
    group.addoption("--qemu", default=os.environ.get("VBALLOON_QEMU"),
                    help="qemu-system-x86_64 to test (default: the one on PATH)")
    group.addoption("--kernel", default=os.environ.get("VBALLOON_KERNEL"),
                    help="guest bzImage to test (default: Debian's cloud kernel)")
    group.addoption("--modules", default=os.environ.get("VBALLOON_MODULES"),
                    help="modules_install tree or folder of .ko files replacing the Debian modules")
    group.addoption("--accel", default=os.environ.get("VBALLOON_ACCEL", "auto"), choices=("auto", "kvm", "tcg"),
                    help="accelerator: auto probes KVM and falls back to TCG")
    group.addoption("--matrix", default=os.environ.get("VBALLOON_MATRIX", "quick"), choices=TIERS,
                    help="variant tier: quick (3), standard (pairwise), full (every combination)")
    group.addoption("--cold", action="store_true", default=os.environ.get("VBALLOON_WARM") == "0",
                    help="boot every guest: no warm starts from guests saved after their boot (VBALLOON_WARM=0)")
    group.addoption("--variant", action="append", default=[],
                    help="run only this variant (repeatable), e.g. pci-modern+doom+fph")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (make conformance's default JOBS, vballoon bench matrix's --jobs): one worker more than the CPUs.
    A worker waiting on its guest's clock (paced events, reporting delays, stats intervals) leaves its CPU to the
    extra one: on 2 CPUs the quick tier took 452 s on 2 workers (71% of the CPUs busy) and 370 s on 3 (85%), the
    standard tier 1267 s and 1045 s, the same tests passing."""
    return len(os.sched_getaffinity(0)) + 1


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "req(*ids): the spec requirement IDs a test checks")
    config.addinivalue_line("markers", "xdist_group(name): tests pytest-xdist keeps on one worker")
    # Ctrl-C and SIGTERM both unwind through fixture teardown, so QEMU is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # vballoon's INFO messages (image builds, the accelerator) reach pytest's log capture, shown with a failing
    # test; with -s they are printed as they happen.
    logging.getLogger("vballoon").setLevel(logging.INFO)
    if config.getoption("capture") == "no":
        logging.getLogger("vballoon").addHandler(logging.StreamHandler())
    # Resolved once here, so a bad --variant or --matrix is one line before collection, not a traceback.
    names: list[str] = config.getoption("--variant")
    try:
        config.vballoon_variants = (  # type: ignore[attr-defined]
            [Variant.from_name(n) for n in names] if names else list(tier(config.getoption("--matrix"))))
    except VballoonError as error:
        raise pytest.UsageError(str(error)) from None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "variant" not in metafunc.fixturenames:
        return
    variants: list[Variant] = metafunc.config.vballoon_variants  # type: ignore[attr-defined]
    metafunc.parametrize("variant", variants, ids=[v.name for v in variants], scope="function")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for mark in item.iter_markers("req"):
            try:
                check_marker_args(mark.args)
            except VballoonError as error:
                raise pytest.UsageError(f"{item.nodeid}: {error}") from None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """A failed test names the one command that reruns it alone, with this run's QEMU, kernel and accelerator."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        options = {name: item.config.getoption(name) for name in RUN_OPTIONS}
        report.sections.append(("vballoon rerun", rerun_command(item.nodeid, item.config.getoption("--matrix"),
                                                                 options)))


@pytest.fixture(scope="session")
def session(pytestconfig: pytest.Config) -> Session:
    """The run's QEMU, kernel, modules and accelerator request, resolved once."""
    try:
        return Session.from_options(pytestconfig.getoption("--qemu"), pytestconfig.getoption("--accel"),
                                    pytestconfig.getoption("--kernel"), pytestconfig.getoption("--modules"),
                                    warm=not pytestconfig.getoption("--cold"))
    except VballoonError as error:
        pytest.exit(str(error), returncode=4)


@pytest.fixture(autouse=True)
def _requirement_properties(request: pytest.FixtureRequest) -> None:
    """Every JUnit testcase carries the requirement IDs it checks."""
    ids = [i for mark in request.node.iter_markers("req") for i in mark.args]
    if ids:
        request.node.user_properties.append(("requirements", ",".join(dict.fromkeys(ids))))
