"""Byte counts as people write them ("8GiB", "512MB", "1e9", 8 << 30), for options and
environment variables, by the one rule VMMALLOC_CONF uses (allocator/core/config.hpp,
kByteCountRule: the core parses the text). Imports only the extension: the start-up hook
reads VMMALLOC_KV_BUDGET with it."""
from __future__ import annotations

import math
import numbers


def parse_bytes(value: int | float | str, what: str = "") -> int:
    """A byte count from a number or a text such as ``"8GiB"``, ``"8 GB"``, ``"8g"``,
    ``"512MiB"`` or ``"1e9"``; `what` names the option in the error.

    Raises:
        ValueError: for anything else, or a count that is negative or not finite.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):  # numpy's numbers too
        number = float(value)
        if not math.isfinite(number) or number < 0 or number > 1.8e19:
            prefix = f"{what}: " if what else ""
            raise ValueError(f"{prefix}a byte count must be finite, not negative and below 2**64, got {value!r}")
        return int(value) if isinstance(value, numbers.Integral) else int(number)
    if not isinstance(value, str):
        raise ValueError(f"{what + ': ' if what else ''}cannot read {value!r} as a number of bytes")
    from vmmalloc import _C

    return _C.parse_bytes(value, what)
