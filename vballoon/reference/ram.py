"""Guest RAM of the reference device, and what each page may hold.

RAM is sparse (a dict of 4 KiB pages), so large guests cost nothing until
touched.  Where the spec lets the device change a page (MAY modify), the
reference does not guess: it leaves the bytes alone and records the set of
outcomes a conforming device may produce for that page.  Any write to a
page (by the driver, or a ring update) makes its content defined again and
clears that latitude.
"""

from __future__ import annotations

import struct
from enum import Enum
from typing import Iterable

from vballoon.spec import PAGE_SIZE, PFN_SHIFT, Endian, struct_prefix
from vballoon.virtqueue import Buffer, MemoryAccessError


class PageOutcome(Enum):
    """What a device may have done to a page's bytes."""

    UNCHANGED = "unchanged"
    ZERO = "zero"
    POISON = "poison"
    """Filled with poison_val."""
    ANY = "any"
    """Any content: a hinted page the device may drop (BAL-DEV-FPH-4)."""


ONLY_UNCHANGED = frozenset({PageOutcome.UNCHANGED})


def poison_page(poison_val: int, endian: Endian = "little") -> bytes:
    """A page filled with the 32-bit `poison_val` pattern."""
    return struct.pack(struct_prefix(endian) + "I", poison_val) * (PAGE_SIZE // 4)


class GuestRam:
    """Flat guest RAM at [0, size): a `vballoon.virtqueue.Memory`."""

    def __init__(self, size: int) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise MemoryAccessError(f"RAM size {size} must be a positive multiple of {PAGE_SIZE}")
        self.size = size
        self._pages: dict[int, bytearray] = {}
        self._latitude: dict[int, frozenset[PageOutcome]] = {}
        self._poison: dict[int, frozenset[bytes]] = {}
        """The poison patterns a page with POISON latitude may hold: poison_val as it was when the page was
        reported (a later negotiation may change poison_val; the device filled the page before that)."""

    @property
    def num_pages(self) -> int:
        return self.size >> PFN_SHIFT

    def _check(self, addr: int, n: int) -> None:
        if n < 0 or addr < 0 or addr + n > self.size:
            raise MemoryAccessError(f"access of {n} bytes at {addr:#x} outside guest RAM of {self.size:#x} bytes")

    def read(self, addr: int, n: int) -> bytes:
        offset = addr & (PAGE_SIZE - 1)
        if offset + n <= PAGE_SIZE and 0 <= addr and 0 <= n and addr + n <= self.size:  # ring fields, most buffers
            page = self._pages.get(addr >> PFN_SHIFT)
            return bytes(page[offset:offset + n]) if page is not None else bytes(n)
        self._check(addr, n)
        out = bytearray()
        while n:
            pfn, offset = divmod(addr, PAGE_SIZE)
            chunk = min(n, PAGE_SIZE - offset)
            page = self._pages.get(pfn)
            out += page[offset : offset + chunk] if page is not None else bytes(chunk)
            addr, n = addr + chunk, n - chunk
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        n = len(data)
        offset = addr & (PAGE_SIZE - 1)
        if offset + n <= PAGE_SIZE and 0 <= addr and addr + n <= self.size:  # within one page
            self._written_page(addr >> PFN_SHIFT)[offset:offset + n] = data
            return
        self._check(addr, n)
        view = memoryview(bytes(data))
        while view:
            pfn, offset = divmod(addr, PAGE_SIZE)
            chunk = min(len(view), PAGE_SIZE - offset)
            self._written_page(pfn)[offset : offset + chunk] = view[:chunk]
            addr, view = addr + chunk, view[chunk:]

    def _written_page(self, pfn: int) -> bytearray:
        """Page `pfn` about to be written: created if untouched, its content defined again (no latitude)."""
        if self._latitude:
            self._latitude.pop(pfn, None)
            self._poison.pop(pfn, None)
        page = self._pages.get(pfn)
        if page is None:
            page = self._pages[pfn] = bytearray(PAGE_SIZE)
        return page

    def page(self, pfn: int) -> bytes:
        """The bytes of page `pfn` as the reference holds them (never modified by the device)."""
        return self.read(pfn << PFN_SHIFT, PAGE_SIZE)

    def whole_pages(self, buffer: Buffer) -> range:
        """PFNs of the pages that lie entirely inside `buffer` and inside RAM."""
        first = -(-buffer.addr // PAGE_SIZE)
        end = min((buffer.addr + buffer.length) // PAGE_SIZE, self.num_pages)
        return range(first, max(first, end))

    def allow(self, pfns: Iterable[int], outcomes: frozenset[PageOutcome], poison: bytes | None = None) -> None:
        """Record that the device may leave pages `pfns` in any of `outcomes` (added to what they already may);
        with POISON, `poison` is the page pattern of poison_val now (see `poison_page`)."""
        poisoned = PageOutcome.POISON in outcomes
        if poisoned and poison is None:
            raise ValueError("a POISON outcome needs the poison pattern in effect")
        latitude = self._latitude
        for pfn in pfns:
            latitude[pfn] = latitude.get(pfn, ONLY_UNCHANGED) | outcomes
            if poisoned:
                self._poison[pfn] = self._poison.get(pfn, frozenset()) | {poison}

    def allowed(self, pfn: int) -> frozenset[PageOutcome]:
        """The outcomes a conforming device may have produced for page `pfn`."""
        return self._latitude.get(pfn, ONLY_UNCHANGED)

    def pages_with_latitude(self) -> dict[int, frozenset[PageOutcome]]:
        """Every page whose content the device may have changed, with its outcomes."""
        return dict(self._latitude)

    def content_allowed(self, pfn: int, observed: bytes) -> bool:
        """Whether `observed` is a content a conforming device may leave in page `pfn`."""
        allowed = self.allowed(pfn)
        if PageOutcome.ANY in allowed:
            return True
        candidates = {PageOutcome.UNCHANGED: {self.page(pfn)}, PageOutcome.ZERO: {bytes(PAGE_SIZE)},
                      PageOutcome.POISON: self._poison.get(pfn, frozenset())}
        return any(observed in candidates[outcome] for outcome in allowed)
