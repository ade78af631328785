"""Parse memory budgets and sizes such as `6GiB`, `512MB`, `25%` or a plain byte count (one syntax for every command).

`parse_budget` gives bytes (what `generate` and the loader take); `parse_share` gives a share of all routed
experts (what the simulator takes), from the same syntax plus, where a command documents it, a bare share 0..1.
Both raise the same messages for the same mistakes.

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


def parse_share(text: str, total: int | None, what: str = "budget") -> float:
    """The share (0 < share <= 1) of `total` bytes meant by `text`: `25%`; a size such as `6GiB`, taken of
    `total` and capped at all of it; or a bare number 0..1, read as the share itself. `total` None: sizes are
    refused (the caller cannot say what they are a share of)."""
    m = _PATTERN.match(str(text))
    unit = m.group(2).lower() if m else None
    if unit == "":
        share = float(m.group(1))
        if share > 1:
            raise ValueError(
                f"{what} {text!r} is over 100%: a bare number is a share 0..1; write e.g. 25% or a size such as 6GiB"
            )
    elif unit == "%":
        parse_budget(text, 1, what)  # the same checks, and messages, as every other budget
        share = float(m.group(1)) / 100
    else:
        size = parse_budget(text, 0, what)  # raises for what is not a size at all
        if total is None:
            raise ValueError(f"{what} {text!r}: a size needs the size of one expert to compare with; use e.g. 25%")
        share = min(1.0, size / total) if total > 0 else 0.0
    if share <= 0:
        raise ValueError(f"{what} {text!r} holds no expert; give more than 0")
    return share


def parse_size(text: str, what: str = "size") -> int:
    """Bytes of a size given alone: `336MiB`, a product such as `3*256*320*2`, or `55GB/s` (a rate's bytes);
    more than 0, and never a percentage (it would have nothing to be a share of)."""
    body = str(text).strip().removesuffix("/s")
    if "%" in body:
        raise ValueError(f"{what} {text!r} is a share; give a size such as 336MiB or 3*256*320*2")
    value = 1
    for part in body.split("*"):
        value *= parse_budget(part, 0, what)
    if value <= 0:
        raise ValueError(f"{what} {text!r} is not more than 0 bytes")
    return value


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
