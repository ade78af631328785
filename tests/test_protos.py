"""The generated gRPC code in expertflow/v1/ is exactly what proto/expertflow/v1/ generates."""

from __future__ import annotations

import shutil

from expertflow.services import protogen


def test_generated_code_matches_the_protos(tmp_path):
    assert protogen.drift() == [], "run: python -m expertflow.services.protogen"
    # and the check does notice a stale file
    copy = tmp_path / "v1"
    shutil.copytree(protogen.OUT, copy)
    (copy / "inference_pb2.py").write_text((copy / "inference_pb2.py").read_text() + "# edited\n")
    (copy / "orchestrator_pb2_grpc.py").unlink()
    assert protogen.drift(copy) == ["inference_pb2.py", "orchestrator_pb2_grpc.py"]
