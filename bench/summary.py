"""Print live benchmark results (bench.live_policies JSON files) as one compact table.

    python -m bench.summary bench/results/FILE.json ...

Not for: running anything (live_policies.py does) or plotting.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    for path in paths:
        result = json.loads(Path(path).read_text())
        print(f"{Path(path).name}: {result['device']}, {result['model']}, identical={result['outputs_identical_across_policies']}")
        print(f"{'budget':>6} {'policy':<18} {'hit':>6} {'late':>5} {'pf':>5} {'acc':>5} {'stall s':>8} {'GB':>7} "
              f"{'tok/s':>7} {'step ms':>8} {'plan ms':>8}")
        for r in result["runs"]:
            print(
                f"{r['budget']:>6} {r['policy']:<18} {r['hit_rate']:6.3f} {r.get('late', 0):5d} {r['prefetches']:5d} "
                f"{r['prefetch_accuracy']:5.2f} {r['stall_s']:8.3f} {r['bytes_moved'] / 1e9:7.2f} "
                f"{r['tokens_per_s']:7.1f} {r.get('step_ms_median', 0):8.2f} {r.get('plan_ms_per_step', 0):8.3f}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
