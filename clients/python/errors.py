"""The client's exceptions, each mapped once (`from_rpc_error`) from a gRPC status code.

    DiscoError
     +-- InvalidArgument     INVALID_ARGUMENT: the request named a bad value (the message says which)
     +-- DataLoss            DATA_LOSS: a code failed its checksum (corrupted, or from another model)
     +-- NotFound            NOT_FOUND: no such model or version
     +-- Unauthenticated     UNAUTHENTICATED: missing or wrong bearer token
     +-- ResourceExhausted   RESOURCE_EXHAUSTED: the server's queue is full, or a message is too large
     +-- Unavailable         UNAVAILABLE: no server answered (after the retries)
     +-- DeadlineExceeded    DEADLINE_EXCEEDED: no answer within the call's deadline
     +-- ServerError         anything else the server answered (INTERNAL, UNIMPLEMENTED, ...)
     +-- ClientClosed        CANCELLED: the client was closed (close(), leaving `with`) while the call ran
"""
from __future__ import annotations

import grpc


class InsecureTokenWarning(UserWarning):
    """A bearer token is about to go to another machine without TLS: anyone on the path can read and reuse it."""


class DiscoError(Exception):
    """Base of every error the client raises; `code` is the gRPC status code name, when there is one."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class InvalidArgument(DiscoError):
    """The request carried a value the server cannot use; the message names it and what was expected."""


class DataLoss(DiscoError):
    """A code failed its checksum: it is corrupted, or was made by a model the server does not have."""


class NotFound(DiscoError):
    """No such model or version on the server."""


class Unauthenticated(DiscoError):
    """The server wants a bearer token (Client(token=...)) and got none, or a wrong one."""


class ResourceExhausted(DiscoError):
    """The server's queue is full, or a message exceeded the size limit."""


class Unavailable(DiscoError):
    """No server answered, after the retries the RetryPolicy allows."""


class DeadlineExceeded(DiscoError):
    """The call's deadline passed, retries included."""


class ServerError(DiscoError):
    """Any other status the server answered."""


class ClientClosed(DiscoError):
    """The client was closed while the call ran: closing a connection ends the calls on it, which gRPC reports as
    CANCELLED (grpc.aio as an asyncio.CancelledError, as though the caller's task had been cancelled). Not the
    server's answer: the call's result is lost, and a call made after close() raises ValueError instead."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def from_rpc_error(exc: grpc.RpcError, attempts: int = 1, note: str = "") -> DiscoError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    tried = f" (after {attempts} attempts)" if attempts > 1 else ""
    return _BY_CODE.get(code, ServerError)(f"{code.name}: {details}{tried}{note}", code.name)


def too_large(exc: DiscoError) -> bool:
    """A message too large for a limit: gRPC's own refusal (its words: "... message larger than max"), or the
    server's refusal of a response that could not fit one message (service/errors.py OVER_MESSAGE_LIMIT). Not a
    full queue, a corrupt code or any other bad value."""
    from disco.service.errors import OVER_MESSAGE_LIMIT  # pure Python

    text = str(exc)
    return "message larger than max" in text or OVER_MESSAGE_LIMIT in text
