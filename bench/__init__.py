"""Benchmarks: GPU and live runs that print JSON results (bench/results/). Run as `python -m bench.NAME`.

Not for: correctness (tests/ are the oracle) or code the engine imports.
"""

from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, out: Path | None) -> None:
    """Print a benchmark's result as JSON, and write the same text to `out` if given."""
    text = json.dumps(result, indent=2)
    if out:
        out.write_text(text)
    print(text)
