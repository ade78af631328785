"""Parse memory budgets and sizes such as `6GiB`, `512MB`, `25%` or a plain byte count (one syntax for every command).

Not for: deciding what fits (the loader does, from the parsed numbers).
"""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[0-9]+)?)\s*([a-z%]*)\s*$", re.IGNORECASE)


def parse_budget(text: str | int, total: int, what: str = "budget") -> int:
    """Bytes meant by `text`; a percentage is of `total`."""
    if isinstance(text, int):
        value, unit = float(text), ""
    else:
        m = _PATTERN.match(str(text))
        if not m:
            raise ValueError(f"{what} {text!r} is not a size; use e.g. 6GiB, 512MB, 25% or a byte count")
        value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "%":
        if value > 100:
            raise ValueError(f"{what} {text!r} is over 100%")
        return int(total * value / 100)
    if unit not in _UNITS:
        raise ValueError(f"{what} {text!r} has an unknown unit {unit!r}; use B, KB, MB, GB, KiB, MiB, GiB or %")
    return int(value * _UNITS[unit])


def percent_at_least(needed: int, total: int) -> str:
    """A percentage such as `3.13%` that `parse_budget` turns into at least `needed` of `total` bytes.

    Rounded up, never to nearest: a suggestion that gave one byte too little would be refused again.
    """
    if not 0 < needed <= total:
        raise ValueError(f"cannot express {needed} of {total} bytes as a percentage")
    # three significant digits, and never fewer than two decimals
    decimals = max(2, 2 - math.floor(math.log10(100 * needed / total)))
    scale = 10**decimals
    units = -(-needed * 100 * scale // total)  # ceil in integers: exact for any size

    def text(units: int) -> str:
        return f"{units / scale:.{decimals}f}".rstrip("0").rstrip(".") + "%"

    # parse_budget works in floats; step up until its rounding down lands on enough
    while parse_budget(text(units), total) < needed:
        units += 1
    return text(units)
