"""Byte counts as people write them ("8GiB", "512MB", 1e9), for options and environment
variables. Imports nothing heavy: the start-up hook reads VMMALLOC_KV_BUDGET with it."""
from __future__ import annotations

import math
import re

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | float | str) -> int:
    """A byte count from ``8 << 30``, ``"8GiB"``, ``"8 GB"``, ``"512MiB"`` or ``"1e9"``.

    Raises:
        ValueError: for anything else, or a count that is negative or not finite.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(value).lower())
        if match is None or match.group(2) not in _UNITS:
            raise ValueError(f"cannot read {value!r} as a number of bytes; write e.g. 8589934592, '8GiB', "
                             "'8GB' or '512MiB'")
        number = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"a byte count must be finite and not negative, got {value!r}")
    return int(number)
