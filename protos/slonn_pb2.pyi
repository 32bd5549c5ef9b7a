from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    FLOAT32: _ClassVar[DataType]
DATA_TYPE_UNSPECIFIED: DataType
FLOAT32: DataType

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DataType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DataType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("model", "slo_class", "input", "request_id", "latency_budget_ms")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SLO_CLASS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    model: str
    slo_class: str
    input: Tensor
    request_id: str
    latency_budget_ms: float
    def __init__(self, model: _Optional[str] = ..., slo_class: _Optional[str] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ..., request_id: _Optional[str] = ..., latency_budget_ms: _Optional[float] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("output", "request_id", "level", "expected_accuracy", "queue_ms", "exec_ms", "predicted_ms", "batch_size", "late", "kernel", "server_ms", "out_of_range_features", "samples")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    EXEC_MS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    SERVER_MS_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_RANGE_FEATURES_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    request_id: str
    level: float
    expected_accuracy: float
    queue_ms: float
    exec_ms: float
    predicted_ms: float
    batch_size: int
    late: bool
    kernel: str
    server_ms: float
    out_of_range_features: int
    samples: _containers.RepeatedCompositeFieldContainer[SampleResult]
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ..., request_id: _Optional[str] = ..., level: _Optional[float] = ..., expected_accuracy: _Optional[float] = ..., queue_ms: _Optional[float] = ..., exec_ms: _Optional[float] = ..., predicted_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., late: bool = ..., kernel: _Optional[str] = ..., server_ms: _Optional[float] = ..., out_of_range_features: _Optional[int] = ..., samples: _Optional[_Iterable[_Union[SampleResult, _Mapping]]] = ...) -> None: ...

class SampleResult(_message.Message):
    __slots__ = ("level", "expected_accuracy", "queue_ms", "exec_ms", "predicted_ms", "batch_size", "late", "kernel", "out_of_range_features")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    EXEC_MS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_RANGE_FEATURES_FIELD_NUMBER: _ClassVar[int]
    level: float
    expected_accuracy: float
    queue_ms: float
    exec_ms: float
    predicted_ms: float
    batch_size: int
    late: bool
    kernel: str
    out_of_range_features: int
    def __init__(self, level: _Optional[float] = ..., expected_accuracy: _Optional[float] = ..., queue_ms: _Optional[float] = ..., exec_ms: _Optional[float] = ..., predicted_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., late: bool = ..., kernel: _Optional[str] = ..., out_of_range_features: _Optional[int] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: InferResponse
    error: RequestError
    def __init__(self, response: _Optional[_Union[InferResponse, _Mapping]] = ..., error: _Optional[_Union[RequestError, _Mapping]] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("request_id", "code", "message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    code: str
    message: str
    def __init__(self, request_id: _Optional[str] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class LevelInfo(_message.Message):
    __slots__ = ("level", "accuracy")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    level: float
    accuracy: float
    def __init__(self, level: _Optional[float] = ..., accuracy: _Optional[float] = ...) -> None: ...

class InputContract(_message.Message):
    __slots__ = ("features", "feature_names", "dtype", "min", "max", "preprocessing")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    features: int
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    dtype: DataType
    min: _containers.RepeatedScalarFieldContainer[float]
    max: _containers.RepeatedScalarFieldContainer[float]
    preprocessing: str
    def __init__(self, features: _Optional[int] = ..., feature_names: _Optional[_Iterable[str]] = ..., dtype: _Optional[_Union[DataType, str]] = ..., min: _Optional[_Iterable[float]] = ..., max: _Optional[_Iterable[float]] = ..., preprocessing: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "input_shape", "output_shape", "levels", "hidden", "input", "labels", "activation")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    output_shape: _containers.RepeatedScalarFieldContainer[int]
    levels: _containers.RepeatedCompositeFieldContainer[LevelInfo]
    hidden: _containers.RepeatedScalarFieldContainer[int]
    input: InputContract
    labels: _containers.RepeatedScalarFieldContainer[str]
    activation: str
    def __init__(self, name: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., output_shape: _Optional[_Iterable[int]] = ..., levels: _Optional[_Iterable[_Union[LevelInfo, _Mapping]]] = ..., hidden: _Optional[_Iterable[int]] = ..., input: _Optional[_Union[InputContract, _Mapping]] = ..., labels: _Optional[_Iterable[str]] = ..., activation: _Optional[str] = ...) -> None: ...

class SLOClassInfo(_message.Message):
    __slots__ = ("name", "latency_ms", "min_accuracy", "priority", "max_queue", "on_late", "mode", "max_accuracy_drop")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    ON_LATE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_ACCURACY_DROP_FIELD_NUMBER: _ClassVar[int]
    name: str
    latency_ms: float
    min_accuracy: float
    priority: int
    max_queue: int
    on_late: str
    mode: str
    max_accuracy_drop: float
    def __init__(self, name: _Optional[str] = ..., latency_ms: _Optional[float] = ..., min_accuracy: _Optional[float] = ..., priority: _Optional[int] = ..., max_queue: _Optional[int] = ..., on_late: _Optional[str] = ..., mode: _Optional[str] = ..., max_accuracy_drop: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "slo_classes")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SLO_CLASSES_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    slo_classes: _containers.RepeatedCompositeFieldContainer[SLOClassInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., slo_classes: _Optional[_Iterable[_Union[SLOClassInfo, _Mapping]]] = ...) -> None: ...
