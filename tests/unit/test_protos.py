"""The generated stubs are committed and current (regenerated with grpcio-tools and compared)."""

from __future__ import annotations

from pathlib import Path

from slonn.protos import slonn_pb2 as pb
from slonn.scripts.gen_protos import PROTO_DIR, stale_files


def test_committed_stubs_are_current():
    assert stale_files() == [], "run `python -m slonn.scripts.gen_protos` and commit the result"


def test_every_proto_has_committed_stubs():
    for proto in PROTO_DIR.glob("*.proto"):
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert (PROTO_DIR / f"{proto.stem}{suffix}").exists(), f"{proto.stem}{suffix} missing"


def test_stubs_import_as_a_package():
    # The grpc module must import "from slonn.protos import slonn_pb2", not a top-level "slonn_pb2".
    text = (Path(PROTO_DIR) / "slonn_pb2_grpc.py").read_text()
    assert "from slonn.protos import slonn_pb2" in text
    assert pb.DESCRIPTOR.services_by_name["Inference"].full_name == "slonn.v1.Inference"
