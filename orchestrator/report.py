"""Simulator results as a text table and as one PNG (bytes moved and stall per token across budgets).

`python -m orchestrator.report RESULTS.json... --plot PNG` redraws a plot from saved results.

Not for: running the simulator (simulator.py) or parsing arguments (cli.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from orchestrator.simulator import SimResult

_COLUMNS = (
    # header, width, value of a result that ran
    ("hit%", 6, lambda r: f"{100 * r.hit_rate:.1f}"),
    ("late", 7, lambda r: str(r.late)),
    ("miss", 8, lambda r: str(r.misses)),
    ("MB/tok", 8, lambda r: f"{r.bytes_per_token / 1e6:.3f}"),
    ("pf.acc", 6, lambda r: "-" if r.prefetch_accuracy is None else f"{r.prefetch_accuracy:.2f}"),
    ("waste MB/tok", 12, lambda r: f"{r.wasted_bytes / max(r.tokens, 1) / 1e6:.3f}"),
    ("stall ms/tok", 12, lambda r: f"{r.stall_per_token_ms:.4f}"),
    ("ms/tok", 8, lambda r: f"{r.time_per_token_ms:.4f}"),
)


def load_results(path: str | Path) -> list[SimResult]:
    """Results written by `simulate --json` (derived fields are recomputed, not read)."""
    names = {f.name for f in fields(SimResult)}
    return [SimResult(**{k: v for k, v in row.items() if k in names}) for row in json.loads(Path(path).read_text())]


def regime(r: SimResult) -> str:
    text = f"{r.expert_bytes / 2**20:.3g} MiB/expert, {r.bandwidth / 1e9:.3g} GB/s, {r.layer_ms:g} ms/layer"
    if r.remote_share or r.nvme_share:  # results from before tiers have neither: their regime reads as it did
        text += f", {100 * r.remote_share:g}% remote, {100 * r.nvme_share:g}% NVMe"
        text += "" if r.placement_aware else ", planned with one link time"
    return text


def format_table(results: Sequence[SimResult]) -> str:
    """One block per (trace, regime); one row per (budget, policy)."""
    lines: list[str] = []
    groups: dict[tuple[str, str], list[SimResult]] = {}
    for r in results:
        groups.setdefault((r.trace, regime(r)), []).append(r)
    for (trace, reg), rows in groups.items():
        if lines:
            lines.append("")
        lines.append(f"{trace}: {reg}, {rows[0].tokens or '?'} tokens")
        head = f"{'budget':>6} {'slots':>5} {'policy':<30}" + "".join(f" {h:>{w}}" for h, w, _ in _COLUMNS)
        lines += [head, "-" * len(head)]
        for r in rows:
            name = r.policy + (f" ({r.predictor})" if r.policy == "expertflow" and r.predictor else "")
            left = f"{100 * r.budget:>5.0f}% {r.n_slots:>5} {name:<30}"
            if r.na is not None:
                lines.append(f"{left} n/a: {r.na}")
            else:
                lines.append(left + "".join(f" {fmt(r):>{w}}" for _, w, fmt in _COLUMNS))
    return "\n".join(lines)


def plot(results: Sequence[SimResult], path: str | Path) -> None:
    """Rows: (trace, regime); columns: bytes moved per token, stall per token; x: budget; a line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in results if r.na is None]
    groups: dict[tuple[str, str], list[SimResult]] = {}
    for r in ran:
        groups.setdefault((r.trace, regime(r)), []).append(r)
    if not groups:
        raise ValueError("nothing to plot: no policy ran")
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.4 * len(groups)), squeeze=False)
    for row, ((trace, reg), rows) in zip(axes, groups.items()):
        policies = list(dict.fromkeys(r.policy for r in rows))
        for name in policies:
            pts = sorted((r.budget, r) for r in rows if r.policy == name)
            x = [100 * b for b, _ in pts]
            label = name + (f" ({pts[0][1].predictor})" if name == "expertflow" and pts[0][1].predictor else "")
            style = dict(marker="o", linestyle="--" if name == "belady" else "-", label=label)
            row[0].plot(x, [r.bytes_per_token / 2**20 for _, r in pts], **style)
            row[1].plot(x, [r.stall_per_token_ms for _, r in pts], **style)
        row[0].set_ylabel(f"{trace}\nMiB moved / token")
        row[1].set_ylabel("stall ms / token")
        row[0].set_title(reg, fontsize=9, loc="left")
        for ax in row:
            ax.set_xlabel("cache budget (% of routed experts)")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][1].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(str(path), dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m orchestrator.report", description="table and plot of results")
    parser.add_argument("results", nargs="+", type=Path, help="JSON written by simulate --json")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    results = [r for p in args.results for r in load_results(p)]
    print(format_table(results))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
