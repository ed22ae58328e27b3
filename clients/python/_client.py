"""The synchronous client: numpy images in, factor codes out, and back."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar, Union

import grpc
import numpy as np
from PIL import Image

from disco.client.errors import from_rpc_error
from disco.v1 import codec_pb2 as pb
from disco.v1 import codec_pb2_grpc

T = TypeVar("T")
DEFAULT_TARGET = "localhost:50051"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # matches the server's default limit

ImagesLike = Union[np.ndarray, "Image.Image", str, Path, bytes, Sequence[Any]]


@dataclass(frozen=True)
class Code:
    """One factor code and the model that made it."""

    data: bytes
    model: str = ""
    version: str = ""

    def __bytes__(self) -> bytes:
        return self.data

    def __len__(self) -> int:
        return len(self.data)


def as_batch(images: ImagesLike) -> pb.Images:
    """numpy (N, H, W, C) / (H, W, C) / (H, W), PIL images, paths or encoded bytes -> an Images message."""
    if isinstance(images, np.ndarray):
        return _tensor(images)
    if isinstance(images, (str, Path, bytes, Image.Image)):
        images = [images]
    items = list(images)
    if items and all(isinstance(i, np.ndarray) for i in items):
        return _tensor(np.stack([_hwc(i) for i in items]))
    files = []
    for item in items:
        if isinstance(item, (str, Path)):
            files.append(Path(item).read_bytes())
        elif isinstance(item, bytes):
            files.append(item)
        elif isinstance(item, Image.Image):
            buf = io.BytesIO()
            item.save(buf, format="PNG")
            files.append(buf.getvalue())
        else:
            raise TypeError(f"cannot send an image of type {type(item).__name__}; "
                            "expected a numpy array, PIL image, path or encoded bytes")
    return pb.Images(files=pb.EncodedImages(files=files))


def _hwc(a: np.ndarray) -> np.ndarray:
    return a[..., None] if a.ndim == 2 else a


def _tensor(a: np.ndarray) -> pb.Images:
    if a.ndim in (2, 3):
        a = _hwc(a)[None]
    if a.ndim != 4:
        raise ValueError(f"image array has shape {a.shape}; expected (N, H, W, C), (H, W, C) or (H, W)")
    if a.dtype == np.uint8:
        dtype = pb.DTYPE_UINT8
    elif a.dtype in (np.float32, np.float64):
        a, dtype = a.astype("<f4"), pb.DTYPE_FLOAT32
    else:
        raise ValueError(f"image dtype {a.dtype} is not supported; expected uint8 (0..255) or float32 (0..1)")
    a = np.ascontiguousarray(a)
    return pb.Images(tensor=pb.Tensor(data=a.tobytes(), shape=list(a.shape), dtype=dtype))


def code_bytes(code: Any) -> bytes:
    if isinstance(code, (bytes, bytearray, memoryview)):
        return bytes(code)
    if hasattr(code, "data"):
        return bytes(code.data)
    raise TypeError(f"a code must be bytes or have .data bytes, got {type(code).__name__}")


def images_from(msg: pb.Images) -> np.ndarray:
    """An Images message -> uint8 (N, H, W, C)."""
    if msg.WhichOneof("kind") == "tensor":
        t = msg.tensor
        return np.frombuffer(t.data, dtype=np.uint8).reshape(tuple(t.shape)).copy()
    arrays = [np.asarray(Image.open(io.BytesIO(f))) for f in msg.files.files]
    return np.stack([_hwc(a) for a in arrays])


class Client:
    """A DisCo server connection.

    >>> with Client("localhost:50051") as c:
    ...     codes = c.compress(images)       # uint8 (N, H, W, C) -> list[Code]
    ...     pixels = c.decompress(codes)     # -> uint8 (N, H, W, C)
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float = 30.0, model: str = "",
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.target = target
        self.timeout = timeout
        self.model_name = model
        opts = [("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes)]
        self._channel = grpc.insecure_channel(target, options=opts)
        self._stub = codec_pb2_grpc.CodecStub(self._channel)

    def _call(self, fn: Callable[..., T], request: Any, timeout: float | None) -> T:
        try:
            return fn(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def compress(self, images: ImagesLike, *, model: str = "", version: str = "", quality: str = "",
                 batch: bool = False, timeout: float | None = None) -> list[Code]:
        """Images -> one Code per image; with batch=True, one Code holding them all under one header."""
        req = pb.CompressRequest(model=pb.ModelRef(name=model or self.model_name, version=version),
                                 images=as_batch(images), quality=quality, batch=batch)
        resp = self._call(self._stub.Compress, req, timeout)
        return [Code(c, resp.model.name, resp.model.version) for c in resp.codes]

    def decompress(self, codes: Iterable[Any], *, timeout: float | None = None) -> np.ndarray:
        """Codes (bytes or Code) -> uint8 images (N, H, W, C)."""
        req = pb.DecompressRequest(codes=[code_bytes(c) for c in codes], format=pb.IMAGE_FORMAT_RAW)
        return images_from(self._call(self._stub.Decompress, req, timeout).images)

    def encode(self, images: ImagesLike, *, model: str = "", version: str = "",
               timeout: float | None = None) -> list[dict[str, tuple[float, float]]]:
        """Images -> per image, {factor name: (posterior mean, posterior std)}."""
        req = pb.EncodeRequest(model=pb.ModelRef(name=model or self.model_name, version=version),
                               images=as_batch(images))
        resp = self._call(self._stub.Encode, req, timeout)
        return [{f.name: (f.mean, f.std) for f in item.factors} for item in resp.items]

    def models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        return list(self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout).models)

    def model(self, name: str = "", version: str = "", *, timeout: float | None = None) -> pb.ModelInfo:
        req = pb.GetModelRequest(model=pb.ModelRef(name=name or self.model_name, version=version))
        return self._call(self._stub.GetModel, req, timeout)

    def health(self, *, timeout: float | None = None) -> bool:
        """True when the server reports SERVING for disco.v1.Codec."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        req = health_pb2.HealthCheckRequest(service="disco.v1.Codec")
        resp = self._call(stub.Check, req, timeout)
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
