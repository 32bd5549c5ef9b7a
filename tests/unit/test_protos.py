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


def test_reflection_v1_is_the_v1alpha_protocol_under_its_own_package():
    """Served by delegating to grpcio-reflection's v1alpha servicer, v1 must match it message for message and
    field for field (names, numbers, types, labels, oneofs) and method for method: then the two convert
    losslessly through the wire format."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2 as alpha

    from slonn.protos import grpc_reflection_v1_pb2 as v1

    def shape(module, package: str) -> tuple:
        fd = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(fd)
        assert fd.package == package
        local = lambda name: name.replace(f".{package}.", ".")  # noqa: E731
        messages = {m.name: ([(f.name, f.number, f.type, f.label, local(f.type_name),
                               m.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None)
                              for f in m.field], len(m.nested_type), len(m.enum_type)) for m in fd.message_type}
        services = {s.name: [(me.name, local(me.input_type), local(me.output_type), me.client_streaming,
                              me.server_streaming) for me in s.method] for s in fd.service}
        return messages, services, len(fd.enum_type), len(fd.extension)

    assert shape(v1, "grpc.reflection.v1") == shape(alpha, "grpc.reflection.v1alpha")
