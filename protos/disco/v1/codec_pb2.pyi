from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_RAW: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
DTYPE_UNSPECIFIED: DType
DTYPE_UINT8: DType
DTYPE_FLOAT32: DType
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_RAW: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class EncodedImages(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, files: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Images(_message.Message):
    __slots__ = ("tensor", "files")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    files: EncodedImages
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., files: _Optional[_Union[EncodedImages, _Mapping]] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class CompressRequest(_message.Message):
    __slots__ = ("model", "images", "quality", "batch")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    images: Images
    quality: str
    batch: bool
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., images: _Optional[_Union[Images, _Mapping]] = ..., quality: _Optional[str] = ..., batch: _Optional[bool] = ...) -> None: ...

class CompressResponse(_message.Message):
    __slots__ = ("codes", "model", "quality")
    CODES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    codes: _containers.RepeatedScalarFieldContainer[bytes]
    model: ModelRef
    quality: str
    def __init__(self, codes: _Optional[_Iterable[bytes]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., quality: _Optional[str] = ...) -> None: ...

class NoOpRequest(_message.Message):
    __slots__ = ("payload", "response_bytes")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    response_bytes: int
    def __init__(self, payload: _Optional[bytes] = ..., response_bytes: _Optional[int] = ...) -> None: ...

class NoOpResponse(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class DecompressRequest(_message.Message):
    __slots__ = ("codes", "format")
    CODES_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    codes: _containers.RepeatedScalarFieldContainer[bytes]
    format: ImageFormat
    def __init__(self, codes: _Optional[_Iterable[bytes]] = ..., format: _Optional[_Union[ImageFormat, str]] = ...) -> None: ...

class DecompressResponse(_message.Message):
    __slots__ = ("images", "models")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    images: Images
    models: _containers.RepeatedCompositeFieldContainer[ModelRef]
    def __init__(self, images: _Optional[_Union[Images, _Mapping]] = ..., models: _Optional[_Iterable[_Union[ModelRef, _Mapping]]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("model", "images")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    images: Images
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., images: _Optional[_Union[Images, _Mapping]] = ...) -> None: ...

class FactorValue(_message.Message):
    __slots__ = ("name", "dim", "mean", "std")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    mean: float
    std: float
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., mean: _Optional[float] = ..., std: _Optional[float] = ...) -> None: ...

class FactorValues(_message.Message):
    __slots__ = ("factors",)
    FACTORS_FIELD_NUMBER: _ClassVar[int]
    factors: _containers.RepeatedCompositeFieldContainer[FactorValue]
    def __init__(self, factors: _Optional[_Iterable[_Union[FactorValue, _Mapping]]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("items", "model")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[FactorValues]
    model: ModelRef
    def __init__(self, items: _Optional[_Iterable[_Union[FactorValues, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class FactorEdit(_message.Message):
    __slots__ = ("factor", "set", "shift")
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    SET_FIELD_NUMBER: _ClassVar[int]
    SHIFT_FIELD_NUMBER: _ClassVar[int]
    factor: str
    set: float
    shift: float
    def __init__(self, factor: _Optional[str] = ..., set: _Optional[float] = ..., shift: _Optional[float] = ...) -> None: ...

class FactorSweep(_message.Message):
    __slots__ = ("factor", "start", "stop", "steps")
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    factor: str
    start: float
    stop: float
    steps: int
    def __init__(self, factor: _Optional[str] = ..., start: _Optional[float] = ..., stop: _Optional[float] = ..., steps: _Optional[int] = ...) -> None: ...

class TraverseRequest(_message.Message):
    __slots__ = ("model", "images", "code", "edits", "sweep", "format")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    EDITS_FIELD_NUMBER: _ClassVar[int]
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    images: Images
    code: bytes
    edits: _containers.RepeatedCompositeFieldContainer[FactorEdit]
    sweep: FactorSweep
    format: ImageFormat
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., images: _Optional[_Union[Images, _Mapping]] = ..., code: _Optional[bytes] = ..., edits: _Optional[_Iterable[_Union[FactorEdit, _Mapping]]] = ..., sweep: _Optional[_Union[FactorSweep, _Mapping]] = ..., format: _Optional[_Union[ImageFormat, str]] = ...) -> None: ...

class TraverseResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: Images
    def __init__(self, images: _Optional[_Union[Images, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "server_instance", "server_processes", "max_message_bytes", "max_images_per_request")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SERVER_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    SERVER_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    server_instance: str
    server_processes: int
    max_message_bytes: int
    max_images_per_request: int
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., server_instance: _Optional[str] = ..., server_processes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_images_per_request: _Optional[int] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class Factor(_message.Message):
    __slots__ = ("name", "dim", "kl_nats", "min", "max")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    KL_NATS_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    kl_nats: float
    min: float
    max: float
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., kl_nats: _Optional[float] = ..., min: _Optional[float] = ..., max: _Optional[float] = ...) -> None: ...

class QualityLevel(_message.Message):
    __slots__ = ("name", "id", "payload_bits", "is_default")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BITS_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    id: int
    payload_bits: int
    is_default: bool
    def __init__(self, name: _Optional[str] = ..., id: _Optional[int] = ..., payload_bits: _Optional[int] = ..., is_default: _Optional[bool] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "fingerprint", "input_shape", "latent_dim", "factors", "qualities", "code_formats", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LATENT_DIM_FIELD_NUMBER: _ClassVar[int]
    FACTORS_FIELD_NUMBER: _ClassVar[int]
    QUALITIES_FIELD_NUMBER: _ClassVar[int]
    CODE_FORMATS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    fingerprint: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    latent_dim: int
    factors: _containers.RepeatedCompositeFieldContainer[Factor]
    qualities: _containers.RepeatedCompositeFieldContainer[QualityLevel]
    code_formats: _containers.RepeatedScalarFieldContainer[int]
    description: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., fingerprint: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., latent_dim: _Optional[int] = ..., factors: _Optional[_Iterable[_Union[Factor, _Mapping]]] = ..., qualities: _Optional[_Iterable[_Union[QualityLevel, _Mapping]]] = ..., code_formats: _Optional[_Iterable[int]] = ..., description: _Optional[str] = ...) -> None: ...
