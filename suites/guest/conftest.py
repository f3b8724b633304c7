"""Guest suites: run grouped by variant so one booted guest serves a variant's tests; name kept dmesg files."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.guest_vm import COLD_BOOT_MARK, DMESG_FILE, OOM_REPORT_MARK
from vballoon.matrix import Variant

HERE = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{OOM_REPORT_MARK}: the test exhausts the guest's memory on purpose; the "
                                       "kernel's reports of it (OOM killer, page allocation failure, with their Call "
                                       "Trace) are allowed in the guest's log, nothing else")
    config.addinivalue_line("markers", f"{COLD_BOOT_MARK}: the test checks the guest's boot (probe, negotiation at "
                                       "probe, the boot log): its guest boots, it is never started from a snapshot")


# tryfirst: pytest-xdist reads the xdist_group marks in its own pytest_collection_modifyitems, which runs before
# a conftest's; a mark added after it is ignored and the variant's tests spread over every worker.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Stable-sort this folder's tests by variant, in tier order, keeping each variant's tests in file order,
    except that `cold_boot` tests come first (the guest they boot then serves the variant's other tests) and tests
    taking `fresh_vm` last (they end the variant's shared guest)."""
    def variant_of(item: pytest.Item) -> str | None:
        callspec = getattr(item, "callspec", None)
        in_here = HERE in Path(str(item.fspath)).parents
        return callspec.params["variant"].name if in_here and callspec and "variant" in callspec.params else None

    order: dict[str, int] = {}
    for item in items:
        name = variant_of(item)
        if name is not None:
            order.setdefault(name, len(order))
    def key(item: pytest.Item) -> tuple[int, bool, bool]:
        return (order[variant_of(item) or ""], item.get_closest_marker(COLD_BOOT_MARK) is None,
                "fresh_vm" in getattr(item, "fixturenames", ()))

    guest_items = sorted((i for i in items if variant_of(i) is not None), key=key)
    for item in guest_items:
        # With pytest-xdist's --dist loadgroup, a variant's tests stay on one worker, in this order.
        item.add_marker(pytest.mark.xdist_group(variant_of(item)))
    others = [i for i in items if variant_of(i) is None]
    items[:] = others + guest_items


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """A failed guest test names the guest dmesg file kept beside the other logs."""
    outcome = yield
    report = outcome.get_result()
    dmesg = item.stash.get(DMESG_FILE, None)
    if report.failed and dmesg is not None:
        report.sections.append(("guest dmesg kept", str(dmesg)))


# Variant gates: tests request them before the guest, so a skip boots and checks nothing.

@pytest.fixture
def with_deflate_on_oom(variant: Variant) -> Variant:
    if not variant.deflate_on_oom:
        pytest.skip(f"variant {variant.name} does not offer DEFLATE_ON_OOM")
    return variant


@pytest.fixture
def without_deflate_on_oom(variant: Variant) -> Variant:
    if variant.deflate_on_oom:
        pytest.skip(f"variant {variant.name} offers DEFLATE_ON_OOM")
    return variant
