"""DeepSeek-V2-Lite's routes.npz (see /work/shared/data/README.md) as ExpertFlow traces: the import every other
model's routes now share (routes_npz.py), kept under its old names.

`python -m predictor.deepseek NPZ OUT_DIR` writes OUT_DIR/deepseek_{train,validation,test}.safetensors, as
`expertflow import-routes --npz NPZ --out OUT_DIR` does.

Not for: the import itself (routes_npz.py) or recording routing (expertflow/trace.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from predictor.routes_npz import DEEPSEEK_V2_LITE, SPLIT_NAMES, import_routes, split_of

FAMILY = DEEPSEEK_V2_LITE.family
MOE_LAYERS = DEEPSEEK_V2_LITE.moe_layers
N_EXPERTS = DEEPSEEK_V2_LITE.n_experts
DOMAIN = DEEPSEEK_V2_LITE.domain
SPLITS = SPLIT_NAMES[3]
__all__ = ["import_deepseek", "split_of", "FAMILY", "MOE_LAYERS", "N_EXPERTS", "DOMAIN", "SPLITS"]


def import_deepseek(npz_path: str | Path, out_dir: str | Path) -> dict:
    """Write deepseek_{train,validation,test}.safetensors under out_dir; returns sequences and tokens per split."""
    return import_routes(npz_path, out_dir)["outputs"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="import DeepSeek-V2-Lite routes.npz as routing traces")
    parser.add_argument("npz", type=Path, help="DeepSeek-V2-Lite's routes.npz")
    parser.add_argument("out_dir", type=Path, help="directory for deepseek_{train,validation,test}.safetensors")
    args = parser.parse_args(argv)
    print(json.dumps(import_deepseek(args.npz, args.out_dir)))


if __name__ == "__main__":
    main()
