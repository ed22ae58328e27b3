"""The client's exceptions, each mapped once from a gRPC status code.

    DiscoError
     +-- InvalidArgument     INVALID_ARGUMENT: the request named a bad value (the message says which)
     +-- DataLoss            DATA_LOSS: a code failed its checksum (corrupted, or from another model)
     +-- NotFound            NOT_FOUND: no such model or version
     +-- Unavailable         UNAVAILABLE: no server answered
     +-- DeadlineExceeded    DEADLINE_EXCEEDED
     +-- ServerError         anything else the server answered
"""
from __future__ import annotations

import grpc


class DiscoError(Exception):
    """Base of every error the client raises; `code` is the gRPC status code name, when there is one."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class InvalidArgument(DiscoError):
    pass


class DataLoss(DiscoError):
    pass


class NotFound(DiscoError):
    pass


class Unavailable(DiscoError):
    pass


class DeadlineExceeded(DiscoError):
    pass


class ServerError(DiscoError):
    pass


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def from_rpc_error(exc: grpc.RpcError) -> DiscoError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return _BY_CODE.get(code, ServerError)(f"{code.name}: {details}", code.name)
