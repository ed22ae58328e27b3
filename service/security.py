"""Transport security: TLS / mTLS server credentials and bearer-token auth as a server interceptor."""
from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc

from disco.service.config import ServeConfig

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)  # probes must work without a token


def server_credentials(cfg: ServeConfig) -> grpc.ServerCredentials | None:
    if not cfg.tls_cert:
        return None
    key, cert = Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes()
    ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(unary, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(streaming, **kw)
    return grpc.stream_stream_rpc_method_handler(streaming, **kw)


class TokenAuth(grpc.aio.ServerInterceptor):
    """Every call but health must carry `authorization: Bearer <token>`; compared in constant time."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        sent_b = sent.encode() if isinstance(sent, str) else sent
        if hmac.compare_digest(sent_b, self._expected):
            return handler
        why = "missing bearer token" if not sent else "invalid bearer token"
        return _deny(handler, f"{why}: send metadata 'authorization: Bearer <token>'")
