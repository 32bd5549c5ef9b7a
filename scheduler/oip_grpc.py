"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), beside slonn.v1 on one port.

What tritonclient, perf_analyzer and KServe clients call: health, metadata, ModelConfig, ModelStatistics,
ModelInfer and ModelStreamInfer. Errors carry the same gRPC status codes as slonn.v1 (scheduler/grpc_status.py).
"""

from __future__ import annotations

import time
from importlib import metadata
from typing import TYPE_CHECKING, Any

from slonn.protos import grpc_service_pb2 as pb
from slonn.protos import grpc_service_pb2_grpc as pb_grpc
from slonn.protos import model_config_pb2 as mc
from slonn.scheduler import oip
from slonn.scheduler.admission import admit_samples
from slonn.scheduler.errors import InvalidArgument, RequestError
from slonn.scheduler.grpc_status import grpc_status
from slonn.scheduler.streams import answer_in_completion_order

if TYPE_CHECKING:
    from slonn.scheduler.server import SlonnServer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
             "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents"}
"""The typed-contents field of each datatype (FP16 and BF16 have none: they travel as raw bytes)."""


def _version() -> str:
    try:
        return metadata.version("slonn")
    except metadata.PackageNotFoundError:
        return "0"


def read_parameters(params) -> dict[str, Any]:
    """An InferParameter map as plain values."""
    return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in params.items()
            if v.WhichOneof("parameter_choice")}


def write_parameters(target, values: dict[str, Any]) -> None:
    for key, value in values.items():
        p = target[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        else:
            p.string_param = str(value)


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Maps the OIP messages onto the shared dispatcher; every error becomes a status in ``_abort``."""

    def __init__(self, server: "SlonnServer") -> None:
        self.server = server
        self.stats: dict[str, dict[str, int]] = {}
        """Per model: counts and nanoseconds for ModelStatistics (perf_analyzer reads them)."""

    @staticmethod
    async def _abort(context, exc: RequestError):
        await context.abort(grpc_status(exc), str(exc))

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.server.ready())

    async def ModelReady(self, request, context):
        if request.name not in self.server.failed:  # a model that failed to load is known, and not ready
            try:
                self.server.find_model(request.name, request.version)
            except RequestError as exc:
                await self._abort(context, exc)
        return pb.ModelReadyResponse(ready=self.server.model_ready(request.name))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=oip.SERVER_NAME, version=_version(), extensions=oip.EXTENSIONS)

    async def ModelMetadata(self, request, context):
        try:
            manifest = self.server.find_model(request.name, request.version)
        except RequestError as exc:
            await self._abort(context, exc)
        inp, out = oip.tensor_metadata(manifest)
        return pb.ModelMetadataResponse(
            name=manifest.name, versions=[oip.VERSION], platform=oip.PLATFORM,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**inp)],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**out)])

    async def ModelConfig(self, request, context):
        try:
            manifest = self.server.find_model(request.name, request.version)
        except RequestError as exc:
            await self._abort(context, exc)
        config = mc.ModelConfig(
            name=manifest.name, platform=oip.PLATFORM, max_batch_size=self.server.sample_limit[0],
            input=[mc.ModelInput(name=oip.INPUT, data_type=mc.TYPE_FP32, dims=[manifest.arch.in_features])],
            output=[mc.ModelOutput(name=oip.OUTPUT, data_type=mc.TYPE_FP32, dims=[manifest.arch.out_features])],
            dynamic_batching=mc.ModelDynamicBatching(),
            parameters={k: mc.ModelParameter(string_value=v) for k, v in oip.model_parameters(manifest).items()})
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request, context):
        names = [request.name] if request.name else sorted(self.server.manifests)
        try:
            for name in names:
                self.server.find_model(name, request.version)
        except RequestError as exc:
            await self._abort(context, exc)
        resp = pb.ModelStatisticsResponse()
        for name in names:
            s = self.stats.get(name, {})
            ok, fail = (s.get("ok", 0), s.get("ok_ns", 0)), (s.get("fail", 0), s.get("fail_ns", 0))
            resp.model_stats.append(pb.ModelStatistics(
                name=name, version=oip.VERSION, inference_count=s.get("samples", 0), execution_count=ok[0],
                inference_stats=pb.InferStatistics(
                    success=pb.StatisticDuration(count=ok[0], ns=ok[1]),
                    fail=pb.StatisticDuration(count=fail[0], ns=fail[1]),
                    queue=pb.StatisticDuration(count=ok[0], ns=s.get("queue_ns", 0)),
                    compute_infer=pb.StatisticDuration(count=ok[0], ns=s.get("exec_ns", 0)))))
        return resp

    async def ModelInfer(self, request, context):
        self.server.servicer.calls += 1  # shutdown's lame-duck period watches these arrive too
        try:
            return await self._infer(request, context.time_remaining())
        except RequestError as exc:
            await self._abort(context, exc)

    async def ModelStreamInfer(self, request_iterator, context):
        """Answers in completion order, each with its request's id; a failed request answers
        ``error_message`` and the stream goes on."""
        self.server.servicer.calls += 1

        async def one(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                return pb.ModelStreamInferResponse(infer_response=await self._infer(request, None))
            except RequestError as exc:
                return pb.ModelStreamInferResponse(error_message=str(exc), infer_response=pb.ModelInferResponse(
                    model_name=request.model_name, id=request.id))

        async for answer in answer_in_completion_order(request_iterator, one):
            yield answer

    async def _infer(self, request: pb.ModelInferRequest, time_remaining_s: float | None) -> pb.ModelInferResponse:
        started = time.perf_counter_ns()
        srv = self.server
        slo_class, samples = "", 0
        try:
            manifest = srv.find_model(request.model_name, request.model_version)
            slo_class, budget = oip.read_parameters(read_parameters(request.parameters), srv.default_class)
            x = self._samples(request, manifest)
            samples = len(x)
            done = await admit_samples(srv.dispatcher, manifest.name, slo_class, x, budget, time_remaining_s,
                                       "inputs[0]")
        except RequestError as exc:
            oip.count_error(srv.metrics, srv.known_models, srv.cfg.classes, request.model_name, slo_class, exc,
                            max(samples, 1))
            self._tally(request.model_name, started, None)
            raise
        out = oip.outputs(done)
        resp = pb.ModelInferResponse(
            model_name=manifest.name, model_version=oip.VERSION, id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(name=oip.OUTPUT, datatype="FP32",
                                                             shape=list(out.shape))],
            raw_output_contents=[out.tobytes()])
        server_ms = (time.perf_counter_ns() - started) * 1e-6
        write_parameters(resp.parameters, oip.summary_parameters(done, server_ms))
        self._tally(manifest.name, started, done)
        return resp

    def _samples(self, request: pb.ModelInferRequest, manifest):
        if len(request.inputs) != 1:
            raise InvalidArgument(f"inputs: got {len(request.inputs)} tensors, expected one named "
                                  f"{oip.INPUT!r} (see ModelMetadata)")
        t = request.inputs[0]
        if t.name != oip.INPUT:
            raise InvalidArgument(f"inputs[0].name: got {t.name!r}, expected {oip.INPUT!r}")
        for i, o in enumerate(request.outputs):
            if o.name != oip.OUTPUT:
                raise InvalidArgument(f"outputs[{i}].name: got {o.name!r}, expected {oip.OUTPUT!r}")
        if len(request.raw_input_contents) > 1:
            raise InvalidArgument(f"raw_input_contents: {len(request.raw_input_contents)} entries for one input")
        raw = request.raw_input_contents[0] if request.raw_input_contents else None
        values: Any = None
        if raw is None:
            kind = _CONTENTS.get(t.datatype)
            if kind is None and t.datatype in oip.accepted_datatypes():
                raise InvalidArgument(f"inputs[0].contents: {t.datatype} has no typed contents; send it in "
                                      "raw_input_contents")
            values = list(getattr(t.contents, kind)) if kind else []
        return oip.decode_samples(manifest, "inputs[0]", t.datatype, t.shape, raw, values,
                                  *self.server.sample_limit)

    def _tally(self, model: str, started_ns: int, done) -> None:
        if model not in self.server.manifests:
            return
        s = self.stats.setdefault(model, {})
        ns = time.perf_counter_ns() - started_ns
        if done is None:
            s["fail"] = s.get("fail", 0) + 1
            s["fail_ns"] = s.get("fail_ns", 0) + ns
            return
        s["ok"] = s.get("ok", 0) + 1
        s["ok_ns"] = s.get("ok_ns", 0) + ns
        s["samples"] = s.get("samples", 0) + len(done)
        s["queue_ns"] = s.get("queue_ns", 0) + int(max(c.queue_ms for c in done) * 1e6)
        s["exec_ns"] = s.get("exec_ns", 0) + int(max(c.exec_ms for c in done) * 1e6)
