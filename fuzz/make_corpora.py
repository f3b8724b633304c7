#!/usr/bin/env python3
"""Write the seed corpora, the dictionaries and the OSS-Fuzz seed zips: `make fuzz-corpora`.

fuzz/corpora/<target>/<name>   hand-made seeds: every operation, and the historical bugs of
                               /work/shared/spec-notes.md that a scenario can express
fuzz/fuzz_<target>.dict        libFuzzer dictionaries (targets that have one)
OUT/fuzz_<target>_seed_corpus.zip and OUT/fuzz_<target>.dict, OSS-Fuzz's layout (OUT: --out)

Seeds are rewritten only when their bytes change; nothing else in the corpus directories is touched.
"""

from __future__ import annotations

import argparse
import zipfile
from dataclasses import replace
from pathlib import Path

from vballoon.fuzz.crashes import write_new
from vballoon.fuzz.format import VERSION, device_byte, encode
from vballoon.fuzz.targets import DIFFERENTIAL_VARIANT, TARGETS
from vballoon.matrix import Variant
from vballoon.qemu.virtio_pci import FIRST_FREE_RAM
from vballoon.reference.device import DEFLATEQ, FREE_PAGE_VQ, INFLATEQ, REPORTING_VQ, STATSQ
from vballoon.scenario.malformed import PACKED_KINDS, SPLIT_KINDS
from vballoon.scenario.operations import (POOL_PFNS, AddBuffer, Cont, FillPage, MalformedChain, Negotiate, Operation,
                                          ReadConfig, Reset, Scenario, SetPollingInterval, SetTarget, Stop, WriteConfig)
from vballoon.spec import (CMD_ID_DONE, CMD_ID_FIRST, CMD_ID_MIN, CMD_ID_STOP, PFN_SHIFT, ConfigField, Feature,
                           encode_cmd_id, encode_pfns, encode_stats, feature_mask)

FUZZ = Path(__file__).resolve().parent
ALL_FEATURES = 0b111110
"""Every balloon feature but MUST_TELL_HOST (the decoder masks what a variant does not offer)."""
EVERY_DEVICE = device_byte(DIFFERENTIAL_VARIANT, False)


def _scenario_seeds() -> dict[str, tuple[Operation, ...]]:
    """One scenario per operation, and the historical bugs a scenario can express."""
    negotiate = Negotiate(ALL_FEATURES, 0)
    pools = encode_pfns(POOL_PFNS[:4])
    return {
        "negotiate-every-feature": (negotiate,),
        "negotiate-stats-only-poison": (Negotiate(0b10, 0xAAAAAAAA),),
        "set-target-and-back": (negotiate, SetTarget(64), SetTarget(0), SetTarget(-256), SetTarget(1 << 20)),
        "write-actual-every-width": (negotiate, WriteConfig(4, 4, 64), WriteConfig(4, 1, 1), WriteConfig(6, 2, 1)),
        "write-poison-val-after-driver-ok": (negotiate, WriteConfig(ConfigField.POISON_VAL, 4, 0x55555555)),
        "read-config-every-width": (negotiate, *(ReadConfig(o, w) for w in (1, 2, 4) for o in range(0, 20, w))),
        "inflate-deflate-pool": tuple(FillPage(p, 0x5A) for p in POOL_PFNS) + (
            negotiate, AddBuffer(INFLATEQ, pools), AddBuffer(DEFLATEQ, pools)),
        "inflate-outside-ram": (negotiate, AddBuffer(INFLATEQ, encode_pfns([0x8000, 0xFFFFF, 0xFFFFFFFF]) + b"\0")),
        "inflate-with-writable-pages": (negotiate, AddBuffer(INFLATEQ, pools, POOL_PFNS[4:6])),
        "stats-every-tag": (negotiate, AddBuffer(STATSQ, encode_stats([(t, t << 20) for t in range(17)]))),
        "stats-replaced-and-polled": (negotiate, AddBuffer(STATSQ, encode_stats([(4, 1)])),
                                      AddBuffer(STATSQ, encode_stats([(5, 2)]) + b"\1\2"), SetPollingInterval(3600),
                                      SetPollingInterval(0), SetPollingInterval(-1), SetPollingInterval(1 << 32)),
        "hint-command-ids": (FillPage(POOL_PFNS[0], 0x11), negotiate,
                             *(AddBuffer(FREE_PAGE_VQ, encode_cmd_id(i), POOL_PFNS[:1])
                               for i in (CMD_ID_FIRST, CMD_ID_STOP, CMD_ID_DONE, CMD_ID_MIN))),
        "hint-short-command-id": (negotiate, AddBuffer(FREE_PAGE_VQ, b"\1\0\0")),
        "report-pages-with-poison": tuple(FillPage(p, 0x77) for p in POOL_PFNS) + (
            Negotiate(ALL_FEATURES, 0x77777777), AddBuffer(REPORTING_VQ, b"", POOL_PFNS[:4])),
        "report-pages-without-poison": tuple(FillPage(p, 0x33) for p in POOL_PFNS) + (
            Negotiate(ALL_FEATURES & ~0b10000), AddBuffer(REPORTING_VQ, b"", POOL_PFNS[:4])),
        # Driver violations (BAL-DRV-PP-2): poison_val left unpopulated is any value, whatever bytes QEMU kept.
        "poison-val-written-without-page-poison": (Negotiate(0b10), WriteConfig(ConfigField.POISON_VAL, 4, 0xF8F8F8F8),
                                                   Negotiate(ALL_FEATURES), WriteConfig(ConfigField.ACTUAL, 4, 16)),
        # QEMU holds hint buffers while the VM is stopped; the bad command id's error comes after cont.
        "hint-short-command-id-while-stopped": (negotiate, Stop(), AddBuffer(FREE_PAGE_VQ, b"\0")),
        "fill-stop-cont-reset": (FillPage(POOL_PFNS[7], 0xEE), negotiate, Stop(), Cont(), Reset(), negotiate),
        # At cont QEMU's hint iothread raises that error while the main loop's virtio_set_status stores the status
        # it was called with: the DEVICE_NEEDS_RESET the error set is often lost (VQ-DEV-STATUS-1 deviation).
        "hint-short-command-id-stopped-then-cont": (negotiate, Stop(), AddBuffer(FREE_PAGE_VQ, b"\0"), Cont()),
        # A hint held while stopped is gone after a reset: no error at cont, though the command id is bad.
        "hint-short-command-id-stopped-then-reset": (negotiate, Stop(), AddBuffer(FREE_PAGE_VQ, b"\0"), negotiate,
                                                     Cont(), negotiate),
        # QEMU's hint iothread raises the bad command id's error while the main loop takes the stats buffer.
        "hint-bad-command-id-then-stats": (negotiate, AddBuffer(FREE_PAGE_VQ, b"\1\0\1"),
                                           AddBuffer(STATSQ, encode_stats([(0, 1 << 40)]))),
        # Ballooning its own ring page (BAL-DRV-OP-6): QEMU zeroes it, used entries read back as id 0.
        "inflate-own-ring-page": (negotiate, *[AddBuffer(INFLATEQ, encode_pfns(POOL_PFNS[4:5]))] * 3,
                                  AddBuffer(INFLATEQ, encode_pfns([FIRST_FREE_RAM >> PFN_SHIFT])), negotiate),
        # A page reported under poison_val 0 (QEMU discards it: zeros) stays allowed after poison_val changes.
        "report-under-zero-poison-then-renegotiate": (FillPage(POOL_PFNS[0], 0x77), negotiate,
                                                      AddBuffer(REPORTING_VQ, b"", POOL_PFNS[:1]),
                                                      Negotiate(ALL_FEATURES, 0x100)),
        # QEMU < 4.1 sign-extended PFNs with bit 31 set.
        "historical-pfn-bit31-sign-extension": (negotiate,
                                                AddBuffer(INFLATEQ, encode_pfns([0x80000000 | POOL_PFNS[0]]))),
        # QEMU 9.2-rc aborted in qom-get guest-stats once tags 10-15 had been named (NULL names).
        "historical-stats-tags-10-15-qom-get": (negotiate,
                                                AddBuffer(STATSQ, encode_stats([(t, 1) for t in range(10, 16)])),
                                                SetPollingInterval(3600)),
    }


def _malformed_seeds(kinds: tuple[str, ...] = SPLIT_KINDS) -> dict[str, tuple[Operation, ...]]:
    """Each malformed chain kind of `kinds` on inflateq, then a buffer the device ignores if it broke, and a
    renegotiation after which it works again; for the split kinds, a loop on deflateq."""
    negotiate = Negotiate(ALL_FEATURES | feature_mask(Feature.INDIRECT_DESC), 0)
    pools = encode_pfns(POOL_PFNS[:2])
    seeds = {f"malformed-{kind}": (*(FillPage(p, 0x5A) for p in POOL_PFNS[:3]), negotiate,
                                   MalformedChain(INFLATEQ, kind, pools), AddBuffer(INFLATEQ, encode_pfns(POOL_PFNS[2:3])),
                                   negotiate, AddBuffer(DEFLATEQ, pools))
             for kind in kinds}
    if kinds != SPLIT_KINDS:
        return seeds
    seeds["malformed-loop-on-deflateq"] = (negotiate, AddBuffer(INFLATEQ, pools), MalformedChain(DEFLATEQ, "loop", pools),
                                           Reset(), negotiate, AddBuffer(DEFLATEQ, pools))
    return seeds


def scenario_seed(ops: tuple[Operation, ...], variant: Variant = DIFFERENTIAL_VARIANT) -> bytes:
    return encode(Scenario(variant, False, ops))


def seeds() -> dict[str, dict[str, bytes]]:
    """target -> seed name -> bytes."""
    scenarios = {name: scenario_seed(ops) for name, ops in (_scenario_seeds() | _malformed_seeds()).items()}
    packed = replace(DIFFERENTIAL_VARIANT, packed=True)  # the device byte's bit 6: fuzzing reaches packed rings
    scenarios |= {f"packed-{name}": scenario_seed(ops, packed) for name, ops in _malformed_seeds(PACKED_KINDS).items()}
    legacy = Variant(transport="transitional")
    scenarios["legacy-interface-actual-bytes"] = encode(Scenario(legacy, True, (
        Negotiate(0b10010), WriteConfig(4, 1, 1), WriteConfig(5, 1, 1), AddBuffer(STATSQ, encode_stats([(0, 1)])))))
    scenarios["legacy-interface-malformed-nested-indirect"] = encode(Scenario(legacy, True, (
        Negotiate(0b10 | feature_mask(Feature.INDIRECT_DESC)), MalformedChain(INFLATEQ, "nested-indirect", b"\0\x08\0\0"),
        AddBuffer(INFLATEQ, encode_pfns(POOL_PFNS[:1])))))
    dev = bytes([EVERY_DEVICE])
    corpora = {
        "scenario": scenarios,
        "qemu_differential": {n: s for n, s in scenarios.items() if not n.startswith("legacy-")},
        "stats": {"empty": dev, "one-entry": dev + encode_stats([(4, 1 << 30)]),
                  "every-tag-any-order": dev + encode_stats([(t, t) for t in reversed(range(17))]),
                  "duplicate-tag-partial-tail": dev + encode_stats([(1, 1), (1, 2)]) + b"\xff" * 7,
                  "unknown-tags": dev + encode_stats([(16, 1), (0xFFFF, 2)]),
                  "historical-tags-10-15": dev + encode_stats([(t, 1) for t in range(10, 16)])},
        "pfn": {"inflate-pool": dev + b"\0" + encode_pfns(POOL_PFNS),
                "deflate-pool": dev + b"\1" + encode_pfns(POOL_PFNS),
                "inflate-then-deflate": dev + b"\2" + encode_pfns(POOL_PFNS[:2]),
                "outside-ram-trailing": dev + b"\0" + encode_pfns([0x8000, 0xFFFFFFFF]) + b"\1\2",
                "historical-bit31": dev + b"\0" + encode_pfns([0x80000000 | POOL_PFNS[0]])},
        "hint": {f"cmd-id-{i:#x}": dev + b"\1" + encode_cmd_id(i) for i in (CMD_ID_STOP, CMD_ID_DONE, CMD_ID_MIN,
                                                                             CMD_ID_FIRST)}
        | {"short-cmd-id": dev + b"\0" + b"\1\0\0", "pages-only": dev + b"\x0f"},
        "report": {"with-poison": dev + b"\x1f\x01", "without-poison": dev + b"\x0f\x00",
                   "poison-mismatch": dev + b"\x13\x02", "zero-poison": dev + b"\x1f\x00"},
        "config": {"reads": dev + bytes(b for w, code in ((1, 0x03), (2, 0x13), (4, 0x23)) for o in range(0, 20, w)
                                        for b in (code, o)),
                   "writes": dev + bytes([0x22, 4]) + (64).to_bytes(4, "little") + bytes([0x02, 5, 1, 0x12, 12, 1, 2])},
    }
    assert set(corpora) == set(TARGETS), "every target has seeds"
    assert all(data[0] == VERSION for data in scenarios.values())
    return corpora


def write_corpora(out: Path) -> None:
    for target, named in seeds().items():
        directory = FUZZ / "corpora" / target
        for name, data in named.items():
            path = directory / name
            if path.exists() and path.read_bytes() != data:
                path.unlink()  # a seed whose recipe changed; seeds are generated, crashes never are
            write_new(path, data)
        dictionary = TARGETS[target].dictionary
        if dictionary:
            text = "".join('"' + "".join(f"\\x{b:02x}" for b in word) + '"\n' for word in dictionary)
            (FUZZ / f"fuzz_{target}.dict").write_text(text)
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(out / f"fuzz_{target}_seed_corpus.zip", "w") as archive:
            for seed in sorted(directory.iterdir()):
                archive.write(seed, seed.name)
        if dictionary:
            (out / f"fuzz_{target}.dict").write_text((FUZZ / f"fuzz_{target}.dict").read_text())
    print(f"seed corpora in {FUZZ / 'corpora'}, OSS-Fuzz seed zips and dictionaries in {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/fuzz-out", help="where the seed zips go (OSS-Fuzz: $OUT)")
    write_corpora(Path(parser.parse_args().out))
