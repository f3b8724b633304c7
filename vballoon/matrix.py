"""Balloon variants: device properties, transport, rings, memory backend, guest boot options.

A `Variant` is one point of the test matrix. It knows the QEMU device
properties it stands for, the reference device standing for them (whose
`DeviceProperties.offered_features` is the one model of what QEMU offers), and
the features the Linux driver will accept (6.1 and 6.12 alike): that prediction
is the oracle of the negotiation tests (BAL-DRV-FEAT-POISON, BAL-DRV-FEAT-REPORT).

Names are readable and round-trip: `pci-modern+doom+fph+fpr-poison` is the
modern-only PCI device with deflate-on-oom, free-page-hint and
free-page-reporting on and page-poison off.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Iterator

from allpairspy import AllPairs

from vballoon.errors import UsageError
from vballoon.reference.device import DEFAULT_SHAPE, DeviceProperties, DeviceShape
from vballoon.spec import BALLOON_FEATURES, Feature, feature_mask, has_feature

TRANSPORTS = ("modern", "transitional", "legacy")
BACKENDS = ("anon", "shm", "memfd", "hugetlb")
GUEST_BOOTS = ("plain", "iof", "pgpoison")

RING_SETTINGS = {"indirect_desc": Feature.INDIRECT_DESC, "event_idx": Feature.EVENT_IDX, "packed": Feature.RING_PACKED}
"""The ring features a variant switches on or off, by setting (QEMU's virtio properties of the same names)."""
MODELLED_BITS = frozenset(BALLOON_FEATURES) | {Feature.VERSION_1} | frozenset(RING_SETTINGS.values())
"""The bits a variant's settings decide. QEMU offers further transport bits (NOTIFY_ON_EMPTY, ANY_LAYOUT,
RING_RESET, ...) that no setting controls; comparisons restrict to these."""

# The Linux driver's model: the bits it knows. Transport bits the virtio core keeps (vring_transport_features,
# 6.1; 6.12 adds NOTIFICATION_DATA and ADMIN_VQ, which no variant setting controls), and the balloon bits
# virtio_balloon's feature table lists (all six, 6.1 and 6.12).
LINUX_TRANSPORT_BITS = frozenset({Feature.INDIRECT_DESC, Feature.EVENT_IDX, Feature.VERSION_1, Feature.ACCESS_PLATFORM,
                                  Feature.RING_PACKED, Feature.IN_ORDER})
LINUX_BALLOON_BITS = frozenset(BALLOON_FEATURES)

GENERIC_KERNEL_PACKAGE = "linux-image-amd64"
CLOUD_KERNEL_PACKAGE = "linux-image-cloud-amd64"

# One name token per non-default setting, in the order they appear in a name.
_ON_TOKENS = {"deflate_on_oom": "doom", "free_page_hint": "fph", "free_page_reporting": "fpr", "packed": "packed"}
_OFF_TOKENS = {"page_poison": "poison", "event_idx": "eventidx", "indirect_desc": "indirect"}
_BACKEND_TOKENS = {"shm": "shm", "memfd": "memfd", "hugetlb": "hugetlb"}
_BOOT_TOKENS = {"iof": "iof", "pgpoison": "pgpoison"}


def combination_problem(settings: dict[str, object]) -> str | None:
    """Why a combination of variant settings cannot run, or None."""
    if settings["transport"] not in TRANSPORTS:
        return f"transport {settings['transport']!r} is not one of {', '.join(TRANSPORTS)}"
    if settings["backend"] not in BACKENDS:
        return f"backend {settings['backend']!r} is not one of {', '.join(BACKENDS)}"
    if settings["guest_boot"] not in GUEST_BOOTS:
        return f"guest boot {settings['guest_boot']!r} is not one of {', '.join(GUEST_BOOTS)}"
    if settings["transport"] == "legacy" and settings["packed"]:
        return "the packed ring needs VIRTIO_F_VERSION_1, which a legacy-only device cannot offer"
    return None


@dataclass(frozen=True)
class Variant:
    """One balloon configuration: what QEMU is started with and how the guest boots."""

    transport: str = "modern"
    deflate_on_oom: bool = False
    free_page_hint: bool = False
    free_page_reporting: bool = False
    page_poison: bool = True
    packed: bool = False
    event_idx: bool = True
    indirect_desc: bool = True
    backend: str = "anon"
    guest_boot: str = "plain"

    def __post_init__(self) -> None:
        problem = combination_problem(asdict(self))
        if problem:
            raise UsageError(f"variant {self.name}: {problem}")

    @property
    def name(self) -> str:
        parts = [f"pci-{self.transport}"]
        for attr, token in _ON_TOKENS.items():
            if getattr(self, attr):
                parts.append(f"+{token}")
        for attr, token in _OFF_TOKENS.items():
            if not getattr(self, attr):
                parts.append(f"-{token}")
        if self.backend in _BACKEND_TOKENS:
            parts.append(f"+{_BACKEND_TOKENS[self.backend]}")
        if self.guest_boot in _BOOT_TOKENS:
            parts.append(f"+{_BOOT_TOKENS[self.guest_boot]}")
        return "".join(parts)

    @classmethod
    def from_name(cls, name: str) -> "Variant":
        """Parse a variant name; an unknown token is a UsageError naming --variant."""
        tokens = _split_tokens(name)
        transport_token = tokens.pop(0)
        if not transport_token.startswith("pci-") or transport_token[4:] not in TRANSPORTS:
            raise UsageError(
                f"--variant {name}: must start with one of {', '.join('pci-' + t for t in TRANSPORTS)}"
            )
        settings: dict[str, object] = {"transport": transport_token[4:]}
        on = {v: k for k, v in _ON_TOKENS.items()}
        off = {v: k for k, v in _OFF_TOKENS.items()}
        backends = {v: k for k, v in _BACKEND_TOKENS.items()}
        boots = {v: k for k, v in _BOOT_TOKENS.items()}
        for token in tokens:
            sign, word = token[0], token[1:]
            if sign == "+" and word in on:
                settings[on[word]] = True
            elif sign == "-" and word in off:
                settings[off[word]] = False
            elif sign == "+" and word in backends:
                settings["backend"] = backends[word]
            elif sign == "+" and word in boots:
                settings["guest_boot"] = boots[word]
            else:
                known = [f"+{t}" for t in (*on, *backends, *boots)] + [f"-{t}" for t in off]
                raise UsageError(f"--variant {name}: unknown part {token!r}; known parts: {' '.join(known)}")
        try:
            return cls(**settings)  # type: ignore[arg-type]
        except UsageError as error:
            raise UsageError(f"--{error}") from None

    # --- what QEMU is started with -------------------------------------

    @property
    def kernel_package(self) -> str:
        """page_poison=1 needs CONFIG_PAGE_POISONING, which only the generic kernel has."""
        return GENERIC_KERNEL_PACKAGE if self.guest_boot == "pgpoison" else CLOUD_KERNEL_PACKAGE

    @property
    def kernel_args(self) -> list[str]:
        return {"plain": [], "iof": ["init_on_free=1"], "pgpoison": ["page_poison=1"]}[self.guest_boot]

    def device_properties(self, iothread_id: str = "iothread0") -> dict[str, str]:
        """Properties of `-device virtio-balloon-pci` for this variant."""
        onoff = lambda flag: "on" if flag else "off"  # noqa: E731
        props = {
            "disable-legacy": onoff(self.transport == "modern"),
            "disable-modern": onoff(self.transport == "legacy"),
            "deflate-on-oom": onoff(self.deflate_on_oom),
            "free-page-hint": onoff(self.free_page_hint),
            "free-page-reporting": onoff(self.free_page_reporting),
            "page-poison": onoff(self.page_poison),
            "packed": onoff(self.packed),
            "event_idx": onoff(self.event_idx),
            "indirect_desc": onoff(self.indirect_desc),
        }
        if self.free_page_hint:
            # QEMU (7.2 and 10.0) requires an iothread for free page hinting.
            props["iothread"] = iothread_id
        return props

    # --- the negotiation oracle -----------------------------------------

    def reference_properties(self, legacy_interface: bool = False, ram_size: int = DeviceProperties.ram_size,
                             shape: DeviceShape = DEFAULT_SHAPE) -> DeviceProperties:
        """The reference device standing for QEMU's balloon of this variant, seen through its modern interface or
        (`legacy_interface`, or a legacy-only variant) its legacy one; `shape` is what the QEMU under test chose
        where the spec lets a device choose (`QemuProfile.device_shape`)."""
        return DeviceProperties(
            ram_size=ram_size, deflate_on_oom=self.deflate_on_oom, free_page_hint=self.free_page_hint,
            free_page_reporting=self.free_page_reporting, page_poison=self.page_poison,
            modern=self.transport != "legacy" and not legacy_interface, shape=shape,
            ring_features=feature_mask(*(bit for setting, bit in RING_SETTINGS.items() if getattr(self, setting))))

    def offered_features(self, legacy_interface: bool = False) -> frozenset[int]:
        """The MODELLED_BITS QEMU offers through one interface: the reference device's offer
        (`DeviceProperties.offered_features`, QEMU's virtio_balloon_get_features), as bit numbers."""
        offered = self.reference_properties(legacy_interface).offered_features
        return frozenset(bit for bit in MODELLED_BITS if has_feature(offered, bit))

    def accepted_features(self) -> frozenset[int]:
        """What Linux's virtio_balloon accepts of the offered features (virtballoon_validate: the same in 6.1 and 6.12).

        virtballoon_validate clears PAGE_POISON unless init_on_free or page
        poisoning is on (BAL-DRV-FEAT-POISON), and otherwise clears REPORTING
        when PAGE_POISON is not offered (BAL-DRV-FEAT-REPORT); it always clears
        INDIRECT_DESC. The virtio core keeps only the transport bits it knows.
        """
        offered = self.offered_features()
        accepted = set(offered & (LINUX_BALLOON_BITS | LINUX_TRANSPORT_BITS))
        poisons = self.guest_boot in ("iof", "pgpoison")
        if not poisons:
            accepted.discard(Feature.PAGE_POISON)
        elif Feature.PAGE_POISON not in offered:
            accepted.discard(Feature.REPORTING)
        accepted.discard(Feature.INDIRECT_DESC)
        return frozenset(accepted)


def _split_tokens(name: str) -> list[str]:
    """Split `pci-modern+doom-poison` into ['pci-modern', '+doom', '-poison']."""
    if not name.startswith("pci-"):
        return [name]
    tokens = ["pci-"]
    for char in name[4:]:
        if char in "+-":
            tokens.append(char)
        else:
            tokens[-1] += char
    return tokens


# --- tiers ---------------------------------------------------------------

DIMENSIONS: dict[str, tuple[object, ...]] = {
    "transport": TRANSPORTS,
    "deflate_on_oom": (False, True),
    "free_page_hint": (False, True),
    "free_page_reporting": (False, True),
    "page_poison": (True, False),
    "packed": (False, True),
    "event_idx": (True, False),
    "indirect_desc": (True, False),
    "backend": BACKENDS,
    "guest_boot": GUEST_BOOTS,
}

QUICK = (
    Variant(),
    Variant(transport="transitional", deflate_on_oom=True, free_page_hint=True, free_page_reporting=True,
            guest_boot="iof"),
    Variant(transport="legacy", deflate_on_oom=True, free_page_reporting=True, page_poison=False,
            event_idx=False),
)


def standard() -> tuple[Variant, ...]:
    """A pairwise covering array over every dimension, invalid pairs excluded.

    allpairspy's filter can leave a valid pair uncovered; each such pair gets
    one more variant (defaults plus the pair), so every valid pair is covered.
    """
    names = list(DIMENSIONS)
    defaults = {name: values[0] for name, values in DIMENSIONS.items()}

    def allowed(partial_row: list[object]) -> bool:
        return combination_problem({**defaults, **dict(zip(names, partial_row, strict=False))}) is None

    rows = [dict(zip(names, row, strict=True)) for row in
            AllPairs([list(values) for values in DIMENSIONS.values()], filter_func=allowed)]
    for (a, values_a), (b, values_b) in itertools.combinations(DIMENSIONS.items(), 2):
        for value_a, value_b in itertools.product(values_a, values_b):
            pair = {**defaults, a: value_a, b: value_b}
            covered = any(row[a] == value_a and row[b] == value_b for row in rows)
            if not covered and combination_problem(pair) is None:
                rows.append(pair)
    return tuple(Variant(**row) for row in rows)  # type: ignore[arg-type]


def full() -> Iterator[Variant]:
    """Every valid combination."""
    names = list(DIMENSIONS)
    for row in itertools.product(*DIMENSIONS.values()):
        settings = dict(zip(names, row, strict=True))
        if combination_problem(settings) is None:
            yield Variant(**settings)  # type: ignore[arg-type]


TIERS = ("quick", "standard", "full")


def tier(name: str) -> tuple[Variant, ...]:
    """The variants of a matrix tier; an unknown tier is a UsageError naming --matrix."""
    if name == "quick":
        return QUICK
    if name == "standard":
        return standard()
    if name == "full":
        return tuple(full())
    raise UsageError(f"--matrix {name}: unknown tier; use one of {', '.join(TIERS)}")
