"""Transport security: TLS / mTLS server credentials and bearer-token auth as a server interceptor.

Both follow their files, so that renewed certificates (cert-manager rewrites a mounted secret) and rotated tokens
take effect without a restart: the certificate files are checked before each new TLS handshake (connections
already open keep theirs), the token file at most once a second.
"""
from __future__ import annotations

import hmac
import logging
import os
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc

from disco.service.config import ServeConfig, tokens_in

log = logging.getLogger(__name__)
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)  # probes must work without a token
SETTLE_S = 1.0  # a changed file is read once it has not changed for this long (a renewal written file by file)


def _stamp(paths: list[Path]) -> tuple[tuple[int, int, int], ...]:
    """What changes when a file is rewritten or a mounted secret's link is swapped."""
    return tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in (os.stat(p) for p in paths))


class CertificateFiles:
    """The server's key, certificate and (for mTLS) client CA, read again after they change."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.paths = [Path(cfg.tls_key), Path(cfg.tls_cert)] + ([Path(cfg.tls_client_ca)] if cfg.tls_client_ca else [])
        self.mutual = bool(cfg.tls_client_ca)
        self._stamp = _stamp(self.paths)

    def configuration(self) -> Any:
        key, cert, *ca = (p.read_bytes() for p in self.paths)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca[0] if ca else None)

    def fetch(self) -> Any:
        """gRPC asks before each new handshake: a new configuration, or None to keep the current one."""
        try:
            stamp = _stamp(self.paths)
            if stamp == self._stamp or time.time() - max(st[0] for st in stamp) / 1e9 < SETTLE_S:
                return None  # unchanged, or still being written: asked again at the next handshake
            config = self.configuration()
        except OSError as exc:  # a file missing mid-renewal: keep serving the current certificate
            log.warning("TLS files unreadable, keeping the current certificate: %s", exc)
            return None
        self._stamp = stamp  # (a key that does not match its certificate is refused by gRPC, which keeps the old pair)
        log.info("TLS files changed (%s): new connections get the new certificate", ", ".join(map(str, self.paths)))
        return config


def server_credentials(cfg: ServeConfig) -> grpc.ServerCredentials | None:
    if not cfg.tls_cert:
        return None
    files = CertificateFiles(cfg)
    return grpc.dynamic_ssl_server_credentials(files.configuration(), files.fetch,
                                               require_client_authentication=files.mutual)


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
    """Every call but health must carry `authorization: Bearer <token>` with one of the tokens; compared in
    constant time. With a token file, the file is read again after it changes (checked at most once a second)."""

    def __init__(self, tokens: list[str], token_file: str = "") -> None:
        self._expected = [f"Bearer {t}".encode() for t in tokens]
        self._file = Path(token_file) if token_file else None
        self._stamp = _stamp([self._file]) if self._file else ()
        self._next_check = time.monotonic() + SETTLE_S

    def _follow_file(self) -> None:
        now = time.monotonic()
        if self._file is None or now < self._next_check:
            return
        self._next_check = now + SETTLE_S
        try:
            stamp = _stamp([self._file])
            if stamp == self._stamp or time.time() - stamp[0][0] / 1e9 < SETTLE_S:
                return
            tokens = tokens_in(self._file.read_text())
        except OSError as exc:
            log.warning("token file unreadable, keeping the current tokens: %s", exc)
            return
        self._stamp = stamp
        if not tokens:  # an empty file never turns auth off
            log.warning("token file %s is empty, keeping the current tokens", self._file)
            return
        self._expected = [f"Bearer {t}".encode() for t in tokens]
        log.info("token file %s changed: %d token(s) accepted from now on", self._file, len(tokens))

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        self._follow_file()
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        sent_b = sent.encode() if isinstance(sent, str) else sent
        if sum(hmac.compare_digest(sent_b, e) for e in self._expected):  # every token compared, match or not
            return handler
        why = "missing bearer token" if not sent else "invalid bearer token"
        return _deny(handler, f"{why}: send metadata 'authorization: Bearer <token>'")
