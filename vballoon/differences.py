"""Say what differs between two observed values: each differing key of a mapping, with both sides.

A failure message or a fuzz finding that compares dictionaries (guest-stats,
config fields, queue sizes) names every key whose value differs, is missing or
is extra, so a QEMU developer reads the difference instead of two whole dumps.
"""

from __future__ import annotations

from typing import Any, Mapping

ABSENT: Any = object()
"""Stands for the side of a key that one mapping lacks."""


def mapping_differences(expected: Mapping[Any, Any], got: Mapping[Any, Any]) -> dict[Any, tuple[Any, Any]]:
    """Key -> (expected value, got value) for every key whose value differs; a missing side is ABSENT."""
    keys = list(expected) + [key for key in got if key not in expected]
    return {key: (expected.get(key, ABSENT), got.get(key, ABSENT)) for key in keys
            if key not in expected or key not in got or expected[key] != got[key]}


def _shown(value: Any) -> str:
    return "absent" if value is ABSENT else repr(value)


def describe_mapping_difference(expected: Mapping[Any, Any], got: Mapping[Any, Any]) -> str:
    """'key: expected X, got Y; ...' for each differing key, in expected's order, extra keys last."""
    return "; ".join(f"{key}: expected {_shown(want)}, got {_shown(have)}"
                     for key, (want, have) in mapping_differences(expected, got).items())
