"""Transport security: TLS / mTLS server credentials and bearer-token auth as a server interceptor.

Both follow their files, so that renewed certificates (cert-manager rewrites a mounted secret) and rotated tokens
take effect without a restart: the certificate files are checked before each new TLS handshake (connections
already open keep theirs), the token file at most once a second.
"""
from __future__ import annotations

import contextlib
import hmac
import logging
import os
import re
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import grpc

from disco.service.config import ServeConfig
from disco.v1 import codec_pb2

log = logging.getLogger(__name__)
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)  # probes must work without a token
_COUNTED = "/" + codec_pb2.DESCRIPTOR.services_by_name["Codec"].full_name + "/"  # refusals counted: the Codec's calls
SETTLE_S = 1.0  # a changed file is read once it has not changed for this long (a renewal written file by file)


def unsendable(token: str) -> str:
    """Why no client could send this bearer token (gRPC metadata values are printable ASCII, and a bearer token
    holds no space, RFC 6750), or "". The token itself is never shown: it is a secret."""
    bad = next((i for i, ch in enumerate(token) if not 0x21 <= ord(ch) <= 0x7E), None)
    return "" if bad is None else (f"its character {bad + 1} of {len(token)} is a space, a control character or not "
                                   "ASCII; tokens are printable ASCII without spaces")


def read_tokens(path: str) -> list[str]:
    """A token file holds one token per line (while clients move to a new one, both are accepted); blank lines
    and lines starting with # are skipped. Raises OSError, also for a file that is not UTF-8 text."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OSError(f"token file {path} is not UTF-8 text: {exc}") from exc
    except OSError as exc:  # which setting named it, not a bare "[Errno 21] Is a directory: 'adir'"
        raise OSError(f"--auth-token-file {path} cannot be read: {exc.strerror or exc}") from exc
    return [t for t in (line.strip() for line in text.splitlines()) if t and not t.startswith("#")]


class FileWatch:
    """Some files, and whether they changed: a new stamp (mtime, ctime, size, inode: a rewrite or a mounted
    secret's swapped link) counts once it has settled, either dated SETTLE_S in the past or seen unchanged by this
    process for SETTLE_S (a file dated in the future, or clocks that disagree, cannot hold a change back)."""

    def __init__(self, paths: list[Path], flags: list[str]) -> None:
        self.paths, self.flags = paths, flags  # each path, and the setting that named it
        try:
            self._stamp = self._now()
        except OSError as exc:
            raise self.named(exc) from exc
        self._pending: object = None
        self._seen = 0.0
        self._warned = ""

    def named(self, exc: OSError) -> OSError:
        """The error, saying which setting named the file (not a bare "[Errno 2] No such file or directory")."""
        flag = next((f for f, p in zip(self.flags, self.paths) if str(p) == exc.filename), "a file")
        return OSError(f"{flag} {exc.filename} cannot be read: {exc.strerror or exc}")

    def _now(self) -> tuple[tuple[int, int, int, int], ...]:
        return tuple((st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino) for st in map(os.stat, self.paths))

    def changed(self) -> bool:
        """True once the files changed and settled; the caller then reads them. Unreadable: False, warned once."""
        try:
            stamp = self._now()
        except OSError as exc:
            self.warn(f"{exc}")
            return False
        if stamp == self._stamp:
            return False
        now = time.monotonic()
        if stamp != self._pending:
            self._pending, self._seen = stamp, now
        if time.time() - max(st[0] for st in stamp) / 1e9 < SETTLE_S and now - self._seen < SETTLE_S:
            return False  # still being written, perhaps: asked again later
        self._stamp, self._pending, self._warned = stamp, None, ""
        return True

    def warn(self, message: str) -> None:
        """Log a problem with the files once, not at every check while it lasts."""
        if message != self._warned:
            log.warning("%s: %s; keeping what was read before", ", ".join(map(str, self.paths)), message)
            self._warned = message


@contextlib.contextmanager
def _in_memory(data: bytes) -> Iterator[str]:
    """A path that reads as `data` (OpenSSL loads a chain from a path only), kept off the disk where the system can:
    a private key is not to be copied into /tmp."""
    fd = os.memfd_create("disco-tls") if hasattr(os, "memfd_create") else None
    if fd is None:  # not Linux
        with tempfile.NamedTemporaryFile() as f:
            f.write(data)
            f.flush()
            yield f.name
        return
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def check_pair(key: bytes, cert: bytes, ca: bytes | None = None, names: tuple[Path, ...] = ()) -> None:
    """Raises OSError when OpenSSL cannot use these bytes (as read from `names`: key, certificate, client CA): a key
    that does not match its certificate, an encrypted key, a PEM body that does not parse, a certificate out of its
    validity. gRPC would only fail to bind (or, at a renewal, keep the old pair while the log said otherwise). The
    bytes checked are the bytes handed to gRPC: files read again could be another renewal's."""
    key_name, cert_name, *ca_name = [str(n) for n in names] or ["the key", "the certificate", "the client CA"]
    if b"ENCRYPTED" in key:
        raise OSError(f"{key_name} is an encrypted private key; the server needs it unencrypted (e.g. a mounted secret)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # Whether the files go together, not how strong they are: gRPC's own TLS serves RSA-1024 keys and SHA-1
    # signatures, which OpenSSL 3's default security level would refuse here.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with _in_memory(cert) as cert_path, _in_memory(key) as key_path:
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            raise OSError(f"the TLS key {key_name} and certificate {cert_name} cannot be used together: "
                          f"{exc.reason or exc} (does the key belong to the certificate? do both parse?)") from None
    _check_chain(_PEM_CERTIFICATE.findall(cert), cert_name)
    if ca is not None:
        try:
            ctx.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
        except ssl.SSLError as exc:
            raise OSError(f"the client CA file {ca_name[0] if ca_name else 'the client CA'} does not parse as PEM "
                          f"certificates: {exc.reason or exc}") from None
        blocks = _PEM_CERTIFICATE.findall(ca)
        stale = _out_of_validity_all(blocks)
        if blocks and len(stale) == len(blocks):  # no client certificate could verify (one of several: a warning)
            raise OSError(f"the client CA {ca_name[0] if ca_name else 'file'} {stale[0][2]}: no client certificate it "
                          "signed would verify")
        for i, n, why in stale:
            log.warning("certificate %d of %d in the client CA %s %s", i + 1, n, ca_name[0] if ca_name else "file", why)


_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\s*", re.S)
_expiring: set[bytes] = set()  # certificates warned of, once each


def _check_chain(blocks: list[bytes], name: str) -> None:
    """The leaf within its validity (refused otherwise: every client refuses it). Any other certificate of the file out
    of its validity is a warning naming it: whether a client needs it depends on the roots that client trusts, which
    the server cannot see (OpenSSL looks in its trust store first, so an expired cross-signed copy of a root it
    trusts, as in Sectigo's chains of 2020, is never used; an expired intermediate that leads to the leaf is, and
    fails every handshake; issuers matched by name cannot tell a renewed intermediate from the one that signed)."""
    for i, n, why in _out_of_validity_all(blocks):
        if i == 0:
            raise OSError(f"the certificate {name} {why}: clients would refuse it")
        log.warning("certificate %d of %d in %s (%s) %s: clients that need it to reach a root they trust will refuse "
                    "every handshake; renew it, or leave it out of the chain if it is an old copy of a root", i + 1, n,
                    name, _subject(_decoded(blocks[i])), why)


def _subject(fields: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}={v}" for rdn in (fields or {}).get("subject", ()) for k, v in rdn) or "no subject"


def _decoded(block: bytes) -> dict[str, Any] | None:
    """One PEM certificate's fields as the stdlib's parser reads them, or None where it cannot."""
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]  # the stdlib's parser
    if decode is None:
        return None
    with _in_memory(block) as path:
        try:
            return dict(decode(path))
        except ssl.SSLError:
            return None  # OpenSSL loaded the file; what this parser cannot read, gRPC's TLS judges


def _out_of_validity_all(blocks: list[bytes]) -> list[tuple[int, int, str]]:
    return [p for i, b in enumerate(blocks) if (p := _out_of_validity(b, i, len(blocks))) is not None]


def _out_of_validity(block: bytes, i: int = 0, n: int = 1) -> tuple[int, int, str] | None:
    """Why one PEM certificate is out of its validity ("expired on ...", "is valid only from ..."), or None. Warns
    once of one that expires within a week."""
    fields = _decoded(block)
    if fields is None:
        return None
    try:
        start, end = ssl.cert_time_to_seconds(fields["notBefore"]), ssl.cert_time_to_seconds(fields["notAfter"])
    except (KeyError, ValueError):
        return None
    now = time.time()
    if now > end:
        return i, n, f"expired on {fields['notAfter']}"
    if now < start:
        return i, n, f"is valid only from {fields['notBefore']}"
    if end - now < 7 * 86400 and block not in _expiring:
        _expiring.add(block)
        log.warning("the certificate %s expires on %s: renew it", _subject(fields), fields["notAfter"])
    return None


class CertificateFiles:
    """The server's key, certificate and (for mTLS) client CA, read again after they change."""

    def __init__(self, cfg: ServeConfig) -> None:
        paths = [Path(cfg.tls_key), Path(cfg.tls_cert)] + ([Path(cfg.tls_client_ca)] if cfg.tls_client_ca else [])
        self.mutual = bool(cfg.tls_client_ca)
        # stamped before the first read: a change in between is seen later
        self.watch = FileWatch(paths, ["--tls-key", "--tls-cert", "--tls-client-ca"][:len(paths)])

    def configuration(self) -> Any:
        """Raises OSError naming a file that is not PEM of the kind expected (gRPC would only fail to bind)."""
        try:
            key, cert, *ca = (p.read_bytes() for p in self.watch.paths)
        except OSError as exc:
            raise self.watch.named(exc) from exc
        for path, data, kind in zip(self.watch.paths, (key, cert, *ca), (b"PRIVATE KEY-----", b"CERTIFICATE-----",
                                                                         b"CERTIFICATE-----")):
            if b"-----BEGIN " not in data or kind not in data:
                raise OSError(f"{path} is not a PEM {kind[:-5].decode().lower()} file (no '-----BEGIN ...{kind.decode()}' block)")
        check_pair(key, cert, ca[0] if ca else None, names=tuple(self.watch.paths))
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca[0] if ca else None)

    def fetch(self) -> Any:
        """gRPC asks before each new handshake: a new configuration, or None to keep the current one. (A key that
        does not match its certificate is refused by gRPC, which keeps the old pair.)"""
        if not self.watch.changed():
            return None
        try:
            config = self.configuration()
        except OSError as exc:
            self.watch.warn(f"{exc}")
            return None
        log.info("TLS files changed: new connections get the new certificate")
        return config


def server_credentials(cfg: ServeConfig) -> grpc.ServerCredentials | None:
    if not cfg.tls_cert:
        return None
    files = CertificateFiles(cfg)
    return grpc.dynamic_ssl_server_credentials(files.configuration(), files.fetch,
                                               require_client_authentication=files.mutual)


def _deny(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler that answers UNAUTHENTICATED before reading anything. Whatever the method's shape, it takes the
    requests as a stream it never reads, with no deserializer: a handler of the method's own shape had gRPC read and
    parse a whole message first, so that each caller without a token could make the server hold a message of up to
    --max-message-bytes (tests/test_sdk.py: test_a_call_without_a_token_is_refused_before_its_message_is_read)."""

    async def refuse(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.stream_unary_rpc_method_handler(refuse, request_deserializer=None,
                                                response_serializer=handler and handler.response_serializer)


class TokenAuth(grpc.aio.ServerInterceptor):
    """Every call but health must carry `authorization: Bearer <token>` with one of the tokens; compared in
    constant time. A token file is read again after it changes (checked at most once a second)."""

    def __init__(self, token: str = "", token_file: str = "",
                 refused: Callable[[str, bool], None] | None = None) -> None:
        """`refused(method, streaming)` hears of each call refused (the server counts them by method)."""
        self._refused = refused
        self._watch = FileWatch([Path(token_file)], ["--auth-token-file"]) if token_file else None  # stamped before
        # the file is read
        token = token.strip()  # as a file's lines are: a secret mounted from a file often ends in a newline
        tokens = read_tokens(token_file) if token_file else [token] if token else []
        if not tokens:  # an empty file, or a blank token, never turns auth off
            raise OSError(f"--auth-token-file {token_file} holds no token; an empty file would turn auth off"
                          if token_file else "--auth-token or DISCO_AUTH_TOKEN is blank; leave it unset for no auth")
        why = self._unsendable(tokens)
        if why:  # every call would be refused
            raise OSError(f"the bearer token of {f'--auth-token-file {token_file}' if token_file else '--auth-token or DISCO_AUTH_TOKEN'} "
                          f"cannot be sent by any client: {why}")
        self._expected = [f"Bearer {t}".encode() for t in tokens]
        self._next_check = time.monotonic() + SETTLE_S

    @staticmethod
    def _unsendable(tokens: list[str]) -> str:
        return next((f"token {k + 1}: {why}" if len(tokens) > 1 else why
                     for k, why in enumerate(map(unsendable, tokens)) if why), "")

    def _follow_file(self) -> None:
        now = time.monotonic()
        if self._watch is None or now < self._next_check:
            return
        self._next_check = now + SETTLE_S
        if not self._watch.changed():
            return
        try:
            tokens = read_tokens(str(self._watch.paths[0]))
        except OSError as exc:
            self._watch.warn(f"{exc}")
            return
        if not tokens:
            self._watch.warn("the token file holds no token")
            return
        why = self._unsendable(tokens)
        if why:
            self._watch.warn(f"no client could send its bearer token: {why}")
            return
        self._expected = [f"Bearer {t}".encode() for t in tokens]
        log.info("token file changed: %d token(s) accepted from now on", len(tokens))

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if details.method.startswith(OPEN_PREFIXES):
            return handler
        self._follow_file()
        given = [v for k, v in details.invocation_metadata or () if k == "authorization"]
        if len(given) > 1:  # which one would count is a proxy's guess: refuse rather than pick
            return self._refuse(details, handler,
                              f"{len(given)} authorization headers; send exactly one 'authorization: Bearer <token>'")
        sent = given[0] if given else ""
        sent_b = sent.encode() if isinstance(sent, str) else sent
        if sent_b[:7].lower() == b"bearer ":  # the scheme is case-insensitive (RFC 7235 section 2.1), and one or
            sent_b = b"Bearer " + sent_b[7:].lstrip(b" ")  # more spaces follow it (RFC 6750 section 2.1: 1*SP)
        if sum(hmac.compare_digest(sent_b, e) for e in self._expected):  # every token compared, match or not
            return handler
        why = "missing bearer token" if not sent else "invalid bearer token"
        return self._refuse(details, handler, f"{why}: send metadata 'authorization: Bearer <token>'")

    def _refuse(self, details: grpc.HandlerCallDetails, handler: grpc.RpcMethodHandler | None,
                message: str) -> grpc.RpcMethodHandler:
        if handler is None:  # a method the server lacks: refused as any other, so that a caller without a token
            return _deny(None, message)  # learns nothing of which methods exist (and an unbounded name is not counted)
        # a method the server has (continuation found it): a bounded label; the Codec's alone, as the handlers
        # count (reflection's streams are counted nowhere else: a series of its refusals alone would mislead)
        if self._refused is not None and details.method.startswith(_COUNTED):
            self._refused(details.method.rsplit("/", 1)[-1], handler.request_streaming or handler.response_streaming)
        return _deny(handler, message)
