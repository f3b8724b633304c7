"""The lost DEVICE_NEEDS_RESET deviation explains that one difference from VQ-DEV-STATUS-1 and no other, and only
on the QEMU versions its bounds name (the differential, the regression test and the corpus replay all ask
`deviation_for` with the judge's name of the difference).

Broken on purpose once: with the deviation's `difference` key removed from known-deviations.toml, the loop chain's
differences came out explained on QEMU 7.2 and test_only_the_lost_bit_is_explained failed.
"""

from __future__ import annotations

import dataclasses

import pytest

from vballoon.matrix import Variant
from vballoon.reference.device import INFLATEQ
from vballoon.requirements import Version, deviation_for
from vballoon.scenario.judge import LOST_NEEDS_RESET, Difference, compare
from vballoon.scenario.observation import NO_ANSWER
from vballoon.scenario.operations import POOL_PFNS, MalformedChain, Negotiate
from vballoon.scenario.reference_executor import ReferenceExecutor
from vballoon.spec import Feature, Status, encode_pfns, feature_mask


def lost_bit() -> Difference:
    """The judge's verdict on a device error whose DEVICE_NEEDS_RESET is gone."""
    reference = ReferenceExecutor(Variant(), False)
    expected = dataclasses.replace(reference.observe(NO_ANSWER), status=0x4F, device_errors=1)
    (lost,) = compare(reference, expected, dataclasses.replace(expected, status=0x0F))
    return lost


def loop_chain_used() -> list[Difference]:
    """The judge's verdict on a device that used a looped chain (only a device error is allowed)."""
    reference = ReferenceExecutor(Variant(transport="transitional"), False, follow_device=True)
    reference.apply(Negotiate(feature_mask(Feature.STATS_VQ)))
    reference.observe(NO_ANSWER)
    reference.apply(MalformedChain(INFLATEQ, "loop", encode_pfns(POOL_PFNS[:1])))
    reference.settle(True)
    expected = reference.observe(NO_ANSWER)
    got = dataclasses.replace(expected, device_errors=0, status=expected.status & ~Status.DEVICE_NEEDS_RESET)
    return compare(reference, expected, got)


@pytest.mark.req("VQ-DEV-STATUS-1")
@pytest.mark.parametrize("version", [(7, 2, 22), (10, 0, 13)], ids=["7.2.22", "10.0.13"])
def test_only_the_lost_bit_is_explained(version: Version) -> None:
    lost = lost_bit()
    assert (lost.requirement, lost.what) == ("VQ-DEV-STATUS-1", LOST_NEEDS_RESET), f"got {lost}"
    assert deviation_for(lost.requirement, version, difference=lost.what) is not None, \
        f"VQ-DEV-STATUS-1: expected the lost bit explained on QEMU {version}, got no deviation"
    loop = loop_chain_used()
    assert {d.requirement for d in loop} == {"VQ-DEV-STATUS-1"}, f"expected loop differences of VQ-DEV-STATUS-1, got {loop}"
    explained = [str(d) for d in loop if deviation_for(d.requirement or "", version, difference=d.what)]
    assert explained == [], f"VQ-DEV-STATUS-1: expected a used loop chain unexplained on QEMU {version}, got {explained}"
    assert deviation_for("VQ-DEV-STATUS-1", version) is None, \
        "VQ-DEV-STATUS-1: expected a check that is not the judge's (no difference named) unexplained"


@pytest.mark.req("VQ-DEV-STATUS-1")
@pytest.mark.parametrize("version", [(3, 1, 1), (10, 1, 0)], ids=["3.1.1", "10.1.0"])
def test_the_lost_bit_is_strict_outside_the_versions_read(version: Version) -> None:
    """Before QEMU 4.0 no free page hint iothread existed; after 10.0 nobody has read the source."""
    deviation = deviation_for("VQ-DEV-STATUS-1", version, difference=LOST_NEEDS_RESET)
    assert deviation is None, f"VQ-DEV-STATUS-1: expected QEMU {version} strict, got {deviation}"
