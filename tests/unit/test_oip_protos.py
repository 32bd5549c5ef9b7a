"""slonn's Open Inference Protocol stubs: the protocol's definition unchanged, importable beside tritonclient's."""

from __future__ import annotations

import pytest

from slonn.protos import grpc_service_pb2, model_config_pb2
from slonn.scripts.gen_protos import PROTO_DIR


def test_descriptors_equal_the_ones_tritonclient_ships():
    # tritonclient registers the same files under the same names: equal bytes let both load in one process.
    tc = pytest.importorskip("tritonclient.grpc")
    assert grpc_service_pb2.DESCRIPTOR.serialized_pb == tc.service_pb2.DESCRIPTOR.serialized_pb
    assert model_config_pb2.DESCRIPTOR.serialized_pb == tc.model_config_pb2.DESCRIPTOR.serialized_pb


def test_service_and_imports():
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
            "ModelStreamInfer", "ModelConfig"} <= set(service.methods_by_name)
    text = (PROTO_DIR / "grpc_service_pb2.py").read_text()
    assert "from slonn.protos import model_config_pb2" in text
    assert "from slonn.protos import grpc_service_pb2" in (PROTO_DIR / "grpc_service_pb2_grpc.py").read_text()
