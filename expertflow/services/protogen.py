"""Generate expertflow/v1/*_pb2.py, *_pb2_grpc.py and *.pyi from proto/expertflow/v1/*.proto (grpcio-tools).

    python -m expertflow.services.protogen            # rewrite the generated files in place
    python -m expertflow.services.protogen --check    # exit 1 if they differ from what the protos generate

The generated code is committed (the embedded package and the device machines import it without a build step);
grpcio-tools is pinned in the test extras so that the check regenerates byte for byte.

Not for: anything at run time (only the generated modules are imported).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "proto"
OUT = ROOT / "expertflow" / "v1"
SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def generate(out_root: Path) -> list[Path]:
    """Run protoc over every proto into `out_root` (as the package path expertflow/v1/...); the files made."""
    from grpc_tools import protoc

    sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "expertflow" / "v1").glob("*.proto"))
    args = ["protoc", f"-I{PROTOS}", f"--python_out={out_root}", f"--grpc_python_out={out_root}", f"--pyi_out={out_root}"]
    code = protoc.main(args + sources)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    return sorted((out_root / "expertflow" / "v1").iterdir())


def drift(committed_dir: Path = OUT) -> list[str]:
    """Generated files that differ from, are missing from, or are extra in `committed_dir` (expertflow/v1/)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_bytes() for p in generate(Path(tmp)) if p.name.endswith(SUFFIXES)}
    committed = {p.name: p.read_bytes() for p in committed_dir.iterdir() if p.name.endswith(SUFFIXES)}
    names = sorted(set(fresh) | set(committed))
    return [n for n in names if fresh.get(n) != committed.get(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m expertflow.services.protogen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report generated files that drifted")
    args = parser.parse_args(argv)
    if args.check:
        stale = drift()
        for name in stale:
            print(f"expertflow/v1/{name} differs from what proto/expertflow/v1/ generates", file=sys.stderr)
        return 1 if stale else 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            if path.name.endswith(SUFFIXES):
                (OUT / path.name).write_bytes(path.read_bytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
