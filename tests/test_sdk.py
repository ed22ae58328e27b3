"""The SDK's transport against real servers: TLS, mTLS, tokens, retries across a restart, deadlines,
round_robin over two servers, chunking past the message limit, asyncio, streaming and offline inspect."""
from __future__ import annotations

import asyncio
import io
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np
import pytest
from PIL import Image

from disco.client import (AsyncClient, Client, ClientClosed, Code, DataLoss, DeadlineExceeded, InvalidArgument, NotFound, RetryPolicy, TLS,
                          Unauthenticated, Unavailable, inspect)
from disco.client.bench import free_port
from disco.client.types import as_images
from disco.service.codec import Codec
from disco.v1 import codec_pb2 as pb
from disco.v1 import codec_pb2_grpc

from certs import make_certs, make_chain, make_expired, make_rsa1024
from conftest import ServerThread, serve


def served(s: ServerThread, method: str = "Compress") -> float:
    v = s.running.servicer.metrics.registry.get_sample_value("disco_requests_total", {"method": method, "code": "OK"})
    return v or 0.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"))


def test_tls(certs: Path, sprites) -> None:
    s = serve(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"))
    try:
        port = s.running.port
        with Client(f"localhost:{port}", tls=TLS(ca=certs / "ca.pem")) as c:
            assert len(c.compress(sprites[0][:4])) == 4 and c.health()
        with Client(f"127.0.0.1:{port}", retry=RetryPolicy(max_attempts=1), timeout=5) as plain:
            with pytest.raises(Unavailable):
                plain.models()
    finally:
        s.stop()
    with pytest.raises(OSError, match="server.key is not a PEM certificate file"):  # not "could not bind"
        serve(tls_cert=str(certs / "server.key"), tls_key=str(certs / "server.key"))
    # PEM blocks that OpenSSL cannot use were "could not bind 127.0.0.1:0" too
    with pytest.raises(OSError, match="client.key and certificate .*server.pem cannot be used together"):
        serve(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "client.key"))  # the key of another cert
    garbled = certs.parent / "garbled.pem"
    garbled.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    with pytest.raises(OSError, match="cannot be used together"):
        serve(tls_cert=str(garbled), tls_key=str(certs / "server.key"))
    with pytest.raises(OSError, match="the client CA file .*garbled.pem does not parse"):
        serve(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"), tls_client_ca=str(garbled))
    weak = make_rsa1024(certs.parent)  # a weak key is the deployment's choice: served as gRPC serves it
    s = serve(tls_cert=str(weak / "weak.pem"), tls_key=str(weak / "weak.key"))
    try:
        with Client(f"localhost:{s.running.port}", tls=TLS(ca=weak / "weak.pem")) as c:
            assert c.health()
    finally:
        s.stop()
    encrypted = certs.parent / "encrypted.key"
    encrypted.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n")
    with pytest.raises(OSError, match="encrypted.key is an encrypted private key"):
        serve(tls_cert=str(certs / "server.pem"), tls_key=str(encrypted))
    # The client names files TLS cannot use at construction: gRPC failed every call with "Failed to create security
    # handshaker", retried until the deadline
    with pytest.raises(ValueError, match=r"TLS\(ca='.*server.key'\) holds no PEM certificate to trust"):
        Client("localhost:1", tls=TLS(ca=certs / "server.key"))
    with pytest.raises(ValueError, match=r"TLS\(cert='.*client.pem', key='.*server.key'\) cannot be used together"):
        Client("localhost:1", tls=TLS(ca=certs / "ca.pem", cert=certs / "client.pem", key=certs / "server.key"))


def test_mutual_tls(certs: Path, sprites) -> None:
    s = serve(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"), tls_client_ca=str(certs / "ca.pem"))
    try:
        target = f"localhost:{s.running.port}"
        mtls = TLS(ca=certs / "ca.pem", cert=certs / "client.pem", key=certs / "client.key")
        with Client(target, tls=mtls) as c:
            assert len(c.compress(sprites[0][:2])) == 2
        # gRPC says only "Socket closed" (the server logs why): the SDK says what it most likely means. (By IP:
        # gRPC names only the last address it tried, and localhost's ::1 is refused, the server being on IPv4.)
        target = f"127.0.0.1:{s.running.port}"
        with Client(target, tls=TLS(ca=certs / "ca.pem"), retry=RetryPolicy(max_attempts=1), timeout=5) as anon:
            with pytest.raises(Unavailable, match="Socket closed; .* client certificate .* TLS.cert=..., key=...."):
                anon.models()
            with pytest.raises(Unavailable, match="client certificate"):
                list(anon.compress_stream([sprites[0][:1]]))
        with Client(target, retry=RetryPolicy(max_attempts=1), timeout=5) as plain:
            with pytest.raises(Unavailable, match="Socket closed; .* if it serves TLS, pass tls=TLS.ca=...."):
                plain.models()
        with Client(f"localhost:{free_port()}", tls=TLS(ca=certs / "ca.pem"), retry=RetryPolicy(max_attempts=1),
                    timeout=5) as nobody, pytest.raises(Unavailable) as info:
            nobody.models()
        assert "closed the connection" not in str(info.value)  # no server there: nothing to hint at
    finally:
        s.stop()
    with pytest.raises(ValueError, match="go together"):
        TLS(ca=certs / "ca.pem", cert=certs / "client.pem")


def _replace(path: Path, data: bytes) -> None:
    """Rewrite a file as a renewal would, dated a few seconds back (past the server's settle time)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    past = time.time() - 5
    os.utime(path, (past, past))


def test_renewed_certificates_serve_new_connections_without_a_restart(certs: Path, tmp_path: Path, sprites,
                                                                      caplog) -> None:
    served_dir = tmp_path / "served"
    served_dir.mkdir()
    for f in ("server.pem", "server.key"):
        _replace(served_dir / f, (certs / f).read_bytes())
    s = serve(tls_cert=str(served_dir / "server.pem"), tls_key=str(served_dir / "server.key"))
    try:
        target = f"localhost:{s.running.port}"
        first = Client(target, tls=TLS(ca=certs / "ca.pem"))
        assert len(first.compress(sprites[0][:1])) == 1
        (tmp_path / "renewed").mkdir()
        renewed = make_certs(tmp_path / "renewed")  # another CA: nothing of the first certificate is reused
        _replace(served_dir / "server.pem", (renewed / "server.pem").read_bytes())  # a botched renewal: gRPC
        with Client(target, tls=TLS(ca=certs / "ca.pem")) as c:  # refuses a certificate without its key, serving on
            assert len(c.compress(sprites[0][:1])) == 1  # with the old pair
        make_expired(tmp_path / "renewed")  # an expired pair: every client would refuse it, so the old pair serves on
        for f in ("server.pem", "server.key"):
            _replace(served_dir / f, (tmp_path / "renewed" / f.replace("server", "expired")).read_bytes())
        with Client(target, tls=TLS(ca=certs / "ca.pem")) as c:
            assert len(c.compress(sprites[0][:1])) == 1
        for f in ("server.pem", "server.key"):
            _replace(served_dir / f, (renewed / f).read_bytes())
        with Client(target, tls=TLS(ca=renewed / "ca.pem")) as c:  # a new connection gets the renewed certificate
            assert len(c.compress(sprites[0][:1])) == 1
        with Client(target, tls=TLS(ca=certs / "ca.pem"), retry=RetryPolicy(max_attempts=1), timeout=5) as stale:
            with pytest.raises(Unavailable):  # and no longer the old one
                stale.models()
        assert len(first.compress(sprites[0][:1])) == 1  # a connection opened before keeps its session
        first.close()
    finally:
        s.stop()
    assert "expired on" in caplog.text and "keeping what was read before" in caplog.text
    with pytest.raises(OSError, match=r"the certificate .*expired\.pem expired on .*: clients would refuse it"):
        serve(tls_cert=str(tmp_path / "renewed" / "expired.pem"), tls_key=str(tmp_path / "renewed" / "expired.key"))


def test_every_certificate_of_the_chain_and_the_client_ca_is_checked_for_validity(tmp_path: Path, sprites,
                                                                                     caplog) -> None:
    """An expired intermediate in --tls-cert, or an expired --tls-client-ca, failed every handshake while the server
    said it served TLS without a word. Whether a client needs a certificate above the leaf depends on the roots it
    trusts, which the server cannot see: an expired one is a warning naming it (refusing it refused chains that work,
    such as one carrying an expired cross-signed copy of a root the clients trust). A client CA file none of whose
    certificates is valid is refused."""
    for folder, kw in (("good", {}), ("mid", {"intermediate_expired": True}), ("root", {"ca_expired": True}),
                       ("cross", {"stale_cross_sign": True})):
        (tmp_path / folder).mkdir()
        make_chain(tmp_path / folder, **kw)
    for folder, works in (("good", True), ("cross", True), ("mid", False)):
        caplog.clear()
        chain = tmp_path / folder
        s = serve(tls_cert=str(chain / "chain.pem"), tls_key=str(chain / "chain.key"))
        try:
            with Client(f"localhost:{s.running.port}", tls=TLS(ca=chain / "root.pem"), timeout=5,
                        retry=RetryPolicy(max_attempts=1)) as c:
                if works:
                    assert len(c.compress(sprites[0][:1])) == 1
                else:  # the expired intermediate leads to the leaf: every handshake fails, as the warning said
                    with pytest.raises(Unavailable):
                        c.compress(sprites[0][:1])
        finally:
            s.stop()
        warned = [r.getMessage() for r in caplog.records if "of 2 in" in r.getMessage() or "of 3 in" in r.getMessage()]
        assert bool(warned) == (folder != "good"), warned
        if folder == "mid":
            assert "certificate 2 of 2 in" in warned[0] and "(commonName=disco intermediate)" in warned[0]
            assert "clients that need it to reach a root they trust will refuse every handshake" in warned[0]
    certs = make_certs(tmp_path)
    with pytest.raises(OSError, match=r"the client CA .*root\.pem expired on .*: no client certificate it signed would"):
        serve(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"),
              tls_client_ca=str(tmp_path / "root" / "root.pem"))

def test_a_token_file_is_followed_and_may_hold_two_tokens_while_clients_move(tmp_path: Path, sprites) -> None:
    token_file = tmp_path / "token"
    _replace(token_file, b"one\n")
    s = serve(auth_token_file=str(token_file))

    def works(token: str) -> bool:
        with Client(s.target, token=token) as c:
            try:
                return len(c.compress(sprites[0][:1])) == 1
            except Unauthenticated:
                return False

    try:
        assert works("one") and not works("two")
        for text, accepted, refused in ((b"one\ntwo\n", ["one", "two"], []), (b"# next: two\ntwo\n", ["two"], ["one"]),
                                        (b"\n", ["two"], ["one"]),  # an empty file never turns auth off
                                        (b"\xff\xfe", ["two"], ["one"]),  # nor does one that is not text
                                        ("one\nt\u00f6k\n".encode(), ["two"], ["one"])):  # nor an unsendable token
            _replace(token_file, text)
            time.sleep(1.1)  # the file is checked at most once a second
            assert all(works(t) for t in accepted) and not any(works(t) for t in refused), text
        token_file.write_bytes(b"three\n")  # dated an hour ahead (clocks that disagree): it counts once this
        ahead = time.time() + 3600  # server has seen it unchanged for a second
        os.utime(token_file, (ahead, ahead))
        time.sleep(1.1)
        assert works("two") and not works("three")  # first seen, not yet settled
        time.sleep(1.1)
        assert works("three") and not works("two")
    finally:
        s.stop()
    for text, message in ((b"", "holds no token"), (b"\xff", "not UTF-8"),
                          (b"ok\nno way\n", "cannot be sent by any client: token 2: its character 3 of 6 is a space")):
        _replace(token_file, text)
        with pytest.raises(OSError, match=message):
            serve(auth_token_file=str(token_file))


def test_a_call_without_a_token_is_refused_before_its_message_is_read(sprites, monkeypatch) -> None:
    """The refusal had the method's own shape, so gRPC read and parsed a whole message first: callers without a
    token could make the server hold 60 MiB each. Now nothing of the message is parsed."""
    from disco.service import servicer

    parsed: list[int] = []
    tolerant = servicer._tolerant

    def spied(message: type) -> Callable[[bytes], object]:
        parse = tolerant(message)
        return lambda data: parsed.append(len(data)) or parse(data)

    monkeypatch.setattr(servicer, "_tolerant", spied)
    s = serve(auth_token="s3cret")
    try:
        with grpc.insecure_channel(s.target) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)
            x = sprites[0][:8]
            request = pb.CompressRequest(images=pb.Images(tensor=pb.Tensor(data=x.tobytes(), shape=list(x.shape),
                                                                           dtype=pb.DTYPE_UINT8)))
            for call in (lambda: stub.Compress(request, timeout=10),
                         lambda: list(stub.CompressStream(iter([request] * 3), timeout=10))):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert parsed == []
            spaced = [("authorization", "Bearer  s3cret")]  # RFC 6750: one or more spaces after the scheme
            assert len(stub.Compress(request, metadata=spaced, timeout=10).codes) == 8
            assert parsed == [request.ByteSize()]
    finally:
        s.stop()


def test_bearer_token(sprites) -> None:
    s = serve(auth_token="s3cret\n")  # a secret mounted from a file ends in a newline: stripped, as a file's lines are
    try:
        with Client(s.target) as anon:
            assert anon.health()  # probes stay open
            with pytest.raises(Unauthenticated, match="missing bearer token"):
                anon.compress(sprites[0][:1])
        with Client(s.target, token="wrong") as bad, pytest.raises(Unauthenticated, match="invalid"):
            bad.models()
        with Client(s.target, token="s3cret") as good:
            assert len(good.compress(sprites[0][:3])) == 3
            assert len(list(good.compress_stream([sprites[0][:2]]))) == 1  # streams are guarded and pass too
        with grpc.insecure_channel(s.target) as ch:  # a streaming call without a token is refused as well
            with pytest.raises(grpc.RpcError) as info:
                list(codec_pb2_grpc.CodecStub(ch).CompressStream(iter([pb.CompressRequest()]), timeout=5))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            two = [("authorization", "Bearer nope"), ("authorization", "Bearer s3cret")]  # one of them right
            with pytest.raises(grpc.RpcError) as info:
                codec_pb2_grpc.CodecStub(ch).ListModels(pb.ListModelsRequest(), metadata=two, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "2 authorization headers" in info.value.details()
            lower = [("authorization", "bearer s3cret")]  # the scheme is case-insensitive (RFC 7235)
            assert codec_pb2_grpc.CodecStub(ch).ListModels(pb.ListModelsRequest(), metadata=lower, timeout=5).models
            # a method the server lacks is refused as any other without a token: which methods exist is not told
            unknown = ch.unary_unary("/disco.v1.Codec/NoSuchMethod", request_serializer=bytes,
                                     response_deserializer=bytes)
            for metadata, code in (((), grpc.StatusCode.UNAUTHENTICATED), (lower, grpc.StatusCode.UNIMPLEMENTED)):
                with pytest.raises(grpc.RpcError) as info:
                    unknown(b"", metadata=metadata, timeout=5)
                assert info.value.code() == code
            from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

            with pytest.raises(grpc.RpcError) as info:  # reflection is guarded too
                list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # refusals are counted as the handlers count calls (they never reached one, and went uncounted), and only
        # the Codec's: reflection's streams are counted nowhere else, and a series of its refusals alone misled
        get = s.running.metrics.registry.get_sample_value
        # the SDK's compress asks ListModels first: three refused there (no token, a wrong one, two headers)
        assert get("disco_requests_total", {"method": "ListModels", "code": "UNAUTHENTICATED"}) == 3
        assert get("disco_streams_total", {"method": "CompressStream", "code": "UNAUTHENTICATED"}) == 1
        assert get("disco_streams_total", {"method": "ServerReflectionInfo", "code": "UNAUTHENTICATED"}) is None
    finally:
        s.stop()
    for token, why in (("s3 cret", "character 3 of 7 is a space"), ("t\u00f6k", "character 2 of 3")):
        with pytest.raises(ValueError, match=why):  # gRPC would answer INTERNAL "Invalid metadata"
            Client("localhost:1", token=token)
        with pytest.raises(OSError, match=f"cannot be sent by any client: its {why}"):  # every call would be refused
            serve(auth_token=token)
    with pytest.raises(OSError, match="is blank; leave it unset for no auth"):
        serve(auth_token=" \n")


def test_retry_across_a_server_restart_loses_no_request(sprites) -> None:
    port = free_port()
    first = serve(port=port)
    imgs = sprites[0][:8]
    client = Client(f"127.0.0.1:{port}", retry=RetryPolicy(max_attempts=100, base_s=0.05, cap_s=0.3), timeout=60)
    before = client.compress(imgs)
    first.stop()
    second: list[ServerThread] = []
    threading.Thread(target=lambda: (time.sleep(1.0), second.append(serve(port=port))), daemon=True).start()
    try:
        t0 = time.monotonic()
        after = client.compress(imgs)  # sent while nothing listens: retried until the new server answers
        assert after == before and time.monotonic() - t0 > 0.5
    finally:
        client.close()
        for s in second:
            s.stop()


def test_a_retry_budget_stops_retries_while_calls_fail(sprites) -> None:
    """RetryPolicy.budget_tokens (gRPC's retry throttling): failed attempts spend the client's tokens, retries stop
    at half, successful calls give tokens back."""
    port, x = free_port(), sprites[0][:1]
    policy = RetryPolicy(max_attempts=10, base_s=0.001, cap_s=0.002, budget_tokens=6, budget_ratio=0.5)
    with Client(f"127.0.0.1:{port}", retry=policy, timeout=30) as c:
        with pytest.raises(Unavailable, match=r"\(after 3 attempts\); no more retries: too many"):
            c.compress(x)  # nothing listens: 6 -> 5, 4, 3 tokens, and 3 is half
        with pytest.raises(Unavailable, match=r"^UNAVAILABLE: [^(]*; no more retries"):
            c.compress(x)  # one attempt, no retry
        assert c.retry_budget.tokens == 2
        s = serve(port=port)
        try:
            for _ in range(100):  # until the channel reconnects; each failure costs a token, down to 0
                try:
                    c.compress(x)
                    break
                except Unavailable:
                    time.sleep(0.1)
            low = c.retry_budget.tokens
            assert low <= 3.0  # the call that got through asked ListModels first (once per client): two successes
            for _ in range(3):
                c.compress(x)
            assert c.retry_budget.tokens == low + 1.5
            for _ in range(20):
                c.compress(x)
            assert c.retry_budget.tokens == 6  # capped
        finally:
            s.stop()

    async def refused() -> float:  # the AsyncClient keeps the same books
        async with AsyncClient(f"127.0.0.1:{free_port()}", retry=policy, timeout=30) as ac:
            with pytest.raises(Unavailable, match=r"\(after 3 attempts\); no more retries"):
                await ac.compress(x)
            return ac.retry_budget.tokens

    assert asyncio.run(refused()) == 3
    for bad in ({"budget_tokens": -1}, {"budget_tokens": 1001}, {"budget_ratio": 0}, {"budget_ratio": 0.0001}):
        with pytest.raises(ValueError, match="budget"):
            RetryPolicy(**bad)


class _Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "refused"


def test_the_retry_budget_keeps_grpcs_books(server: ServerThread, sprites) -> None:
    """gRFC A6, attempt by attempt: what takes a token, what gives one back, when a retry is refused and when the
    error says so."""
    from disco.client._transport import RetryBudget

    unavailable, far = _Failed(grpc.StatusCode.UNAVAILABLE), time.monotonic() + 60
    with Client(server.target, retry=RetryPolicy(max_attempts=2, budget_tokens=6, budget_ratio=0.5)) as c:
        with pytest.raises(InvalidArgument):
            c._pause_after(_Failed(grpc.StatusCode.INVALID_ARGUMENT), 0, far)
        assert c.retry_budget.tokens == 6  # not retryable: not counted
        assert c._pause_after(unavailable, 0, far) >= 0 and c.retry_budget.tokens == 5
        with pytest.raises(Unavailable) as last:
            c._pause_after(unavailable, 1, far)  # the last attempt still takes its token
        assert c.retry_budget.tokens == 4 and "no more retries" not in str(last.value)
        with pytest.raises(Unavailable, match="; no more retries: too many"):
            c._pause_after(unavailable, 0, far)  # 3 is half: throttled although an attempt is left
        for _ in range(20):
            with pytest.raises(Unavailable):
                c._pause_after(unavailable, 0, far)
        assert c.retry_budget.tokens == 0  # never below 0
        c.models()  # one RPC that succeeds (a first compress also asks ListModels: two)
        assert c.retry_budget.tokens == 0.5
    with Client(server.target, retry=RetryPolicy(max_attempts=1, budget_tokens=2)) as c:
        with pytest.raises(Unavailable) as one:
            c._pause_after(unavailable, 0, far)  # retries were never possible: no word about the budget
        assert "no more retries" not in str(one.value) and c.retry_budget.tokens == 1

    async def refilled() -> float:
        async with AsyncClient(server.target, retry=RetryPolicy(max_attempts=1, budget_tokens=4, budget_ratio=0.25)) as ac:
            for _ in range(3):
                with pytest.raises(Unavailable):
                    ac._pause_after(unavailable, 0, far)
            await ac.models()
            return ac.retry_budget.tokens

    assert asyncio.run(refilled()) == 1.25

    b = RetryBudget(RetryPolicy(budget_tokens=10, budget_ratio=0.7))
    allowed = [b.failed() if step == "f" else b.succeeded() for step in "ffsffsfsssfffssffsfssf"]
    assert b.tokens == 5 and allowed[-1] is False  # in floats this sum is 5.000000000000001, above half of 10
    shared = RetryBudget(RetryPolicy(budget_tokens=1000, budget_ratio=1))
    threads = [threading.Thread(target=lambda: [shared.failed() for _ in range(100)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert shared.tokens == 200  # every thread's takings counted
    assert all(RetryBudget(RetryPolicy()).failed() for _ in range(1000))  # off


def test_no_retry_on_invalid_argument(server: ServerThread) -> None:
    with Client(server.target, retry=RetryPolicy(max_attempts=5)) as c:
        before = served(server, "Compress")
        with pytest.raises(Exception, match="INVALID_ARGUMENT"):
            c.compress(np.zeros((8, 8), np.uint8))
    count = server.running.servicer.metrics.registry.get_sample_value(
        "disco_requests_total", {"method": "Compress", "code": "INVALID_ARGUMENT"})
    assert count is not None and served(server, "Compress") == before


def test_deadline_expires(server: ServerThread, sprites) -> None:
    with Client(server.target) as c, pytest.raises(DeadlineExceeded):
        c.compress(sprites[0], timeout=1e-4)
    with pytest.raises(ValueError, match="timeout"):
        Client(server.target, timeout=0)


def test_round_robin_across_two_servers(sprites) -> None:
    a, b = serve(), serve()
    try:
        with Client(f"127.0.0.1:{a.running.port},127.0.0.1:{b.running.port}") as c:
            for _ in range(20):
                c.compress(sprites[0][:1])
        assert served(a) >= 5 and served(b) >= 5 and served(a) + served(b) == 20
        with Client(f"127.0.0.1:{a.running.port},127.0.0.1:{b.running.port}", connections=2) as c:
            assert c.spread() == ["", ""]  # a list of addresses balances over its hosts: nothing to spread
    finally:
        a.stop()
        b.stop()


def test_chunking_past_the_message_limit(sprites, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = 256 * 1024
    s = serve(max_message_bytes=limit)
    imgs = np.concatenate([sprites[0]] * 2)  # 512 images, 2 MiB of pixels: 8x the limit each way
    try:
        with grpc.insecure_channel(s.target) as ch:  # one oversized request is refused by the server
            req = pb.CompressRequest(images=pb.Images(tensor=pb.Tensor(
                data=imgs.tobytes(), shape=list(imgs.shape), dtype=pb.DTYPE_UINT8)))
            with pytest.raises(grpc.RpcError) as info:
                codec_pb2_grpc.CodecStub(ch).Compress(req, timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with Client(s.target, max_message_bytes=limit) as c:
            codes = c.compress(imgs)
            assert len(codes) == 512 and served(s) >= 8
            out = c.decompress(codes)
            assert out.shape == imgs.shape and served(s, "Decompress") >= 8
        with grpc.insecure_channel(s.target) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)
            listed = stub.ListModels(pb.ListModelsRequest(), timeout=10)
            assert (listed.max_message_bytes, listed.max_images_per_request) == (limit, 4096)
            # A response that cannot fit is refused before any decode, saying how many fit (256 KiB / ~4.2 KB)
            decoded = s.running.metrics.registry.get_sample_value(
                "disco_images_total", {"method": "Decompress", "model": "dsprites", "version": "4"})
            wanted = [code.data for code in codes[:100]]
            decoded_codes: list[int] = []  # the entropy decoding of single codes, counted
            decode = Codec.decode
            monkeypatch.setattr(Codec, "decode", lambda self, blobs, *a, **k: decoded_codes.append(len(blobs))
                                or decode(self, blobs, *a, **k))
            with pytest.raises(grpc.RpcError) as info:
                stub.Decompress(pb.DecompressRequest(codes=wanted), timeout=10)
            assert not decoded_codes  # refused before the codes were entropy-decoded, too
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert ("the response would carry 100 images of 64x64x1" in info.value.details()
                    and "over this server's message limit of 262144 bytes (--max-message-bytes): ask for at most 63 "
                    "images per request" in info.value.details()), info.value.details()
            assert s.running.metrics.registry.get_sample_value(
                "disco_images_total", {"method": "Decompress", "model": "dsprites", "version": "4"}) == decoded
            png = stub.Decompress(pb.DecompressRequest(codes=wanted, format=pb.IMAGE_FORMAT_PNG), timeout=10)
            assert len(png.images.files.files) == 100  # PNG answers are far smaller: not refused by the raw bound
            sweep = pb.FactorSweep(factor="posX", start=-1, stop=1, steps=64)
            decoded_codes.clear()  # the PNG answer's
            with pytest.raises(grpc.RpcError) as info:
                stub.Traverse(pb.TraverseRequest(code=wanted[0], sweep=sweep), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "64 images" in info.value.details()
            assert not decoded_codes  # Traverse from a code too: bounded before its entropy decoding
        # A client that assumes the default 64 MiB learns the server's limit from ListModels and cuts to it
        with Client(s.target) as c:
            before = served(s, "Decompress")
            np.testing.assert_array_equal(c.decompress(codes[:300]), out[:300])
            assert served(s, "Decompress") - before >= 5  # 300 images in runs of 57 (0.9 x 256 KiB / 4 KiB)

        async def learned() -> tuple[int, ...]:
            async with AsyncClient(s.target) as ac:
                return (await ac.decompress(codes[:300])).shape

        assert asyncio.run(learned()) == (300, 64, 64, 1)
    finally:
        s.stop()


def counted(s: ServerThread, method: str, code: str) -> float:
    v = s.running.servicer.metrics.registry.get_sample_value("disco_requests_total", {"method": method, "code": code})
    return v or 0.0


def test_png_responses_and_streams_keep_to_the_message_limit(server: ServerThread, sprites) -> None:
    """A PNG response, whose size is known only once encoded, is refused when it cannot fit (gRPC failed its send
    after the work, counted OK, with a traceback in the log). A stream cuts each batch into requests under the
    server's limits, as the unary calls cut, and answers it as one. Only a response too large makes the client ask
    ListModels again: not a bad code."""
    s = serve(max_message_bytes=16 * 1024)  # 3 raw images a response; ~130-byte PNGs: about 120
    try:
        with Client(server.target) as c:
            codes = [code.data for code in c.compress(sprites[0])]  # 256
            want = c.decompress(codes)
        with grpc.insecure_channel(s.target) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)
            png = stub.Decompress(pb.DecompressRequest(codes=codes[:40], format=pb.IMAGE_FORMAT_PNG), timeout=10)
            assert len(png.images.files.files) == 40
            images = lambda: s.running.metrics.registry.get_sample_value(  # noqa: E731
                "disco_images_total", {"method": "Decompress", "model": "dsprites", "version": "4"})
            before = images()
            with pytest.raises(grpc.RpcError) as info:
                stub.Decompress(pb.DecompressRequest(codes=codes, format=pb.IMAGE_FORMAT_PNG), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            details = info.value.details()
            assert ("the response came to" in details and "over this server's message limit of 16384 bytes" in details
                    and "256 images of" in details and "images per request" in details), details
            most = int(details.split("ask for at most about ")[1].split()[0])
            fit = most * 3 // 4  # "about": PNG sizes vary from image to image
            assert 16 < most < 256 and len(stub.Decompress(pb.DecompressRequest(  # the advice is good
                codes=codes[:fit], format=pb.IMAGE_FORMAT_PNG), timeout=10).images.files.files) == fit
            assert counted(s, "Decompress", "INVALID_ARGUMENT") == 1 and images() == before + fit  # not 256 more
            for steps in (64, 16):  # Traverse too: its grey-level sweeps come to ~370 bytes an image
                sweep = pb.FactorSweep(factor="posX", start=-1, stop=1, steps=steps)
                request = pb.TraverseRequest(code=codes[0], sweep=sweep, format=pb.IMAGE_FORMAT_PNG)
                if steps == 16:
                    assert len(stub.Traverse(request, timeout=10).images.files.files) == 16
                    continue
                with pytest.raises(grpc.RpcError) as info:
                    stub.Traverse(request, timeout=10)
                assert ("over this server's message limit" in info.value.details()
                        and "images (sources x sweep steps) per request" in info.value.details()), info.value.details()

        with Client(s.target) as c:  # assumes 64 MiB: learns 16 KiB from ListModels
            before = served(s), served(s, "Decompress")
            streamed = list(c.compress_stream([sprites[0][:40], sprites[0][40:45]]))
            assert [len(b) for b in streamed] == [40, 5] and served(s) - before[0] >= 5  # 160 KiB of pixels
            assert [bytes(x) for x in streamed[0] + streamed[1]] == codes[:45]
            back = list(c.decompress_stream([streamed[0], streamed[1][:1]]))
            assert [len(b) for b in back] == [40, 1] and served(s, "Decompress") - before[1] >= 14
            np.testing.assert_array_equal(np.concatenate(back), want[:41])
            bad = [code for code in codes[:40]]
            bad[20] = bad[20][:-1] + bytes([bad[20][-1] ^ 1])
            got = []
            # one code a request: the client cuts for the server's largest images, color_dsprites' 64x64x3
            with pytest.raises(DataLoss, match="code 0: checksum mismatch") as info:
                for b in c.decompress_stream([codes[:5], bad]):
                    got.append(b)
            assert [len(b) for b in got] == [5]
            assert ("(batch 1 of the stream, in the request that began at its code 20 (the server numbers codes "
                    "from there))" in info.value.__notes__), info.value.__notes__
            listed = served(s, "ListModels")
            with pytest.raises(InvalidArgument, match="code 0"):
                c.decompress([bytes([0xF0]) + codes[0][1:]])  # an unknown format version
            assert served(s, "ListModels") == listed  # not asked again: the code was bad, not the size

        async def streams() -> tuple[list[int], list[int]]:
            async with AsyncClient(s.target) as ac:
                got = [b async for b in ac.compress_stream([sprites[0][:20], sprites[0][20:21]])]
                out = [b async for b in ac.decompress_stream(got)]
                np.testing.assert_array_equal(np.concatenate(out), want[:21])
                return [len(b) for b in got], [len(b) for b in out]

        assert asyncio.run(streams()) == ([20, 1], [20, 1])

        # A caller that stops early ends the stream: gRPC reading its batches on, till the deadline, kept the
        # server encoding them (async: thousands of batches after aclose())
        pulled = [0]

        def endless():
            while True:
                pulled[0] += 1
                yield sprites[0][:1]

        async def stop_early() -> tuple[int, int]:
            async with AsyncClient(s.target, timeout=30) as ac:
                stream = ac.compress_stream(endless())
                await stream.__anext__()
                await stream.aclose()  # type: ignore[attr-defined]
                at_close = pulled[0]
                await asyncio.sleep(1.0)
                return at_close, pulled[0]

        at_close, later = asyncio.run(stop_early())
        assert later - at_close <= 2, (at_close, later)
        with Client(s.target, timeout=30) as c:
            stream = c.compress_stream(endless())
            next(stream)
            stream.close()
            at_close = pulled[0]
            time.sleep(1.0)
            assert pulled[0] - at_close <= 2, (at_close, pulled[0])
    finally:
        s.stop()


def test_a_streams_listmodels_and_the_stream_share_one_deadline(server: ServerThread, sprites,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The ListModels a stream asks first spends the stream's own deadline: the stream is sent with what is left,
    not with a whole timeout again."""
    sent: list[float] = []

    class Recording:
        def __init__(self, stub: codec_pb2_grpc.CodecStub) -> None:
            self._stub = stub

        def __getattr__(self, method: str):  # noqa: ANN204
            def call(*args, timeout: float, **kw):  # noqa: ANN002, ANN003, ANN202
                if method.endswith("Stream"):
                    sent.append(timeout)
                return getattr(self._stub, method)(*args, timeout=timeout, **kw)
            return call

    stub = Client._stub
    monkeypatch.setattr(Client, "_stub", property(lambda self: Recording(stub.fget(self))))
    with Client(server.target, timeout=10) as c:
        asked = c._largest_image_bytes

        def slow(deadline: float, fresh: bool = False) -> int:
            time.sleep(0.5)  # a slow ListModels
            return asked(deadline, fresh)

        monkeypatch.setattr(c, "_largest_image_bytes", slow)
        codes = next(c.compress_stream([sprites[0][:2]]))
        assert len(next(c.decompress_stream([codes]))) == 2
    assert len(sent) == 2 and all(t <= 9.5 for t in sent), sent


def test_the_client_follows_the_servers_image_limit_and_cache_hits_are_bounded_too(sprites) -> None:
    """A server taking 100 images per request: the client learns it (ListModels) and cuts to it. A request answered
    wholly from the decode cache is bounded by the message limit as a decoded one is (gRPC failed its send)."""
    s = serve(max_images_per_request=100, decode_cache_mb=64, max_message_bytes=100_000)  # 24 images a response
    try:
        with Client(s.target) as c:
            codes = c.compress(sprites[0][:150])
            assert len(codes) == 150 and c.decompress(codes).shape == (150, 64, 64, 1)  # every code now cached
        with grpc.insecure_channel(s.target) as ch:
            stub = codec_pb2_grpc.CodecStub(ch)
            with pytest.raises(grpc.RpcError) as info:
                stub.Decompress(pb.DecompressRequest(codes=[code.data for code in codes[:30]]), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert "ask for at most 24 images per request" in info.value.details()
        hits = s.running.metrics.registry.get_sample_value("disco_decode_cache_lookups_total", {"result": "hit"})
        assert hits and hits >= 30  # the refused request was all hits
        # Traverse is cut too: 30 sources (120 KB, over the message limit) x 3 steps (90 images, 24 a response)
        with Client(s.target) as c:
            f = c.model().factors[0]
            sweep = (f.name, f.min, f.max, 3)
            alone = np.concatenate([c.traverse(img, sweep=sweep) for img in sprites[0][:30]])
            np.testing.assert_array_equal(c.traverse(sprites[0][:30], sweep=sweep), alone)  # image-major, in order

        async def traversed() -> np.ndarray:
            async with AsyncClient(s.target) as c:
                return await c.traverse(sprites[0][:30], sweep=sweep)

        np.testing.assert_array_equal(asyncio.run(traversed()), alone)
    finally:
        s.stop()


def test_chunks_count_arrays_at_the_size_they_are_sent_in_and_batch_codes_stay_decodable(sprites) -> None:
    limit = 200 * 1024
    s = serve(max_message_bytes=limit)
    try:
        with Client(s.target, max_message_bytes=limit) as c:
            # 99 uint8 images and a float one go as float32: 4 bytes a pixel, not 1 (the uint8 ones are converted)
            mixed = [sprites[0][0].astype(np.float32) / 255] + list(sprites[0][1:100])
            assert len(c.compress(mixed)) == 100
            pngs = []
            for img in sprites[0]:
                buf = io.BytesIO()
                Image.fromarray(img[..., 0]).save(buf, format="PNG")
                pngs.append(buf.getvalue())  # ~150 bytes each: hundreds would fit one request
            containers = c.compress(pngs, batch=True)
            assert len(containers) > 1  # each holds only what one Decompress response can carry
            assert len(c.decompress(containers)) == len(sprites[0])
    finally:
        s.stop()


@pytest.mark.parametrize("server_limit", [200 * 1024, 1024 * 1024])
def test_decompress_learns_larger_images_after_a_reload(tmp_path: Path, server_limit: int) -> None:
    """A client learns the largest image size once; after a reload brings a model with larger images, a response cut
    for the old size is too large: the client learns the size again and cuts the rest finer. The server refuses it
    (the same limit), or gRPC refuses to receive it (the client's limit is below the server's)."""
    import shutil

    from disco.service.repository import EMBEDDED

    repo, limit = tmp_path / "repo", 200 * 1024
    shutil.copytree(EMBEDDED / "dsprites" / "1", repo / "dsprites" / "1")
    s = serve(repo, reload_interval_s=0.1, max_message_bytes=server_limit)
    try:
        with Client(s.target, max_message_bytes=limit) as c, Client(s.target, max_message_bytes=limit) as other:
            c.decompress(c.compress(np.zeros((1, 64, 64, 1), np.uint8)))  # learns 64x64x1: 45 images a response
            shutil.copytree(EMBEDDED / "color_dsprites" / "1", repo / "color_dsprites" / "1")  # 64x64x3
            deadline = time.monotonic() + 20
            while [m.name for m in other.models()] != ["color_dsprites", "dsprites"]:
                assert time.monotonic() < deadline, "the new model was never served"
                time.sleep(0.1)
            color = other.compress(np.random.default_rng(0).integers(0, 255, (100, 64, 64, 3), np.uint8),
                                   model="color_dsprites")

            async def async_too() -> int:
                async with AsyncClient(s.target, max_message_bytes=limit) as ac:
                    await ac.decompress(c.compress(np.zeros((1, 64, 64, 1), np.uint8)))
                    ac._image_bytes = 64 * 64  # as learned before the reload
                    return len(await ac.decompress(color))

            assert c.decompress(color).shape == (100, 64, 64, 3)
            assert asyncio.run(async_too()) == 100
    finally:
        s.stop()


def test_sdk_inputs_fail_clearly_and_lose_nothing(server: ServerThread, sprites, tmp_path: Path) -> None:
    with Client(server.target) as c:
        with pytest.raises(ValueError, match="no codes given: the batch is empty"):
            c.decompress([])
        for empty in (np.zeros((0, 64, 64, 1), np.uint8), []):  # were [] with no error (no request to cut)
            for call in (c.compress, c.encode):
                with pytest.raises(ValueError, match="no images given: the batch is empty"):
                    call(empty)
        for bad_target in ("localhost:116467", "10.0.0.1:50051,10.0.0.2:99999"):  # gRPC: the port modulo 65536
            with pytest.raises(ValueError, match=r"port \d+ is not a port, expected 1 to 65535"):
                Client(bad_target)

        async def empty_async() -> None:
            async with AsyncClient(server.target) as ac:
                for call in (ac.compress, ac.encode):
                    with pytest.raises(ValueError, match="no images given: the batch is empty"):
                        await call([])
                with pytest.raises(ValueError, match="no codes given: the batch is empty"):
                    await ac.decompress([])

        asyncio.run(empty_async())
        with pytest.raises(ValueError, match="at most 1e\\+08"):  # 1e10 failed every call at once
            Client(server.target, timeout=1e10)
        for bad_limit in (0, -1, 1.5, "64", 1024):
            with pytest.raises(ValueError, match=f"max_message_bytes must be a whole number from 65536 to 2147483647, got {bad_limit!r}"):
                Client(server.target, max_message_bytes=bad_limit)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="image 1 has dtype bool"):
            c.compress([sprites[0][0], sprites[0][1] > 0])
        with pytest.raises(ValueError, match="mode 'F' cannot be sent"):
            c.compress(Image.fromarray(sprites[0][0][..., 0].astype(np.float32)))
        code = c.compress(sprites[0][:1])[0]
        for call in (c.compress, c.encode, c.traverse):
            for bad, named in ((code, "Code (a Code is a compressed image: decompress() it)"), (123, "int"),
                               (None, "NoneType")):
                if call == c.traverse and bad is code:
                    continue  # a code is traverse's other source
                with pytest.raises(TypeError, match=re.escape(f"cannot send images given as {named}; expected a numpy")):
                    call(bad)  # type: ignore[operator]
        for bad_value in (float("nan"), float("inf"), -np.inf):
            with pytest.raises(ValueError, match=f"value {bad_value!r} of factor 'scale': expected a finite number"):
                c.traverse(code, set={"scale": bad_value})
        with pytest.raises(ValueError, match="sweep stop nan of factor 'scale': expected a finite number"):
            c.traverse(code, sweep=("scale", 0.0, float("nan"), 3))
        stack = sprites[0][:5, ..., 0]  # (5, 64, 64): five grey images, as dSprites keeps them, not one 5x64x64 image
        assert [k.data for k in c.compress(stack)] == [k.data for k in c.compress(sprites[0][:5])]
        assert len(c.encode(stack[:3])) == 3
        assert [k.data for k in c.compress(list(stack))] == [k.data for k in c.compress(stack)]
        deep = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 16-bit grey: every bit
        assert c.compress(Image.fromarray(deep))[0].data == c.compress((deep / np.float32(65535.0))[..., None])[0].data
        with pytest.raises(ValueError, match="these are an image file"):
            buf = io.BytesIO()
            Image.fromarray(sprites[0][0][..., 0]).save(buf, format="PNG")
            c.traverse(buf.getvalue(), shift={"scale": 1.0})
        code = c.compress(sprites[0][:1])[0]
        assert c.traverse(bytearray(code.data)).shape == (1, 64, 64, 1)  # any bytes-like code
        for bad in (None, float("nan"), float("inf"), -1, 0, True):
            with pytest.raises(ValueError, match="timeout must be"):
                Client(server.target, timeout=bad)
        Client(server.target, timeout=np.float32(5)).close()  # any real number
        for empty in (np.zeros((0, 64, 64, 1), np.uint8), []):  # not "0 files" from the server
            with pytest.raises(ValueError, match="no images given: the batch is empty"):
                c.traverse(empty, set={"scale": 0.0})
        with pytest.raises(ValueError, match="no images given: the batch is empty"):
            list(c.compress_stream([sprites[0][:1], sprites[0][:0]]))
        for bad in (None, True, "1"):  # None sent an edit without a value, True sent 1.0
            with pytest.raises(ValueError, match=f"value {bad!r} of factor 'scale': expected a number"):
                c.traverse(code, set={"scale": bad})  # type: ignore[dict-item]
        assert c.traverse(code, set={"scale": np.float32(0.5)}).shape == (1, 64, 64, 1)
        with pytest.raises(ValueError, match="sweep start 1e\\+300 of factor 'scale' is too large"):
            c.traverse(code, sweep=("scale", 1e300, 0.0, 3))  # it would reach the server as inf
        for bad in ("", "  ", None):
            with pytest.raises(ValueError, match="expected an address such as"):
                Client(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout must be"):
            c.compress(sprites[0][:1], timeout=-1)
        one = c.decompress(code)[0]  # (H, W, C): saved as one image, not one file per row
        assert [p.name for p in as_images(one).save(tmp_path / "one.png")] == ["one.png"]
        with Image.open(tmp_path / "one.png") as im:
            assert im.size == (64, 64)
        assert len(as_images(sprites[0][:2, ..., 0]).save(tmp_path / "two")) == 2  # (N, H, W): N images
        with pytest.raises(ValueError, match="2 images cannot be saved to one file"):  # was a folder named so
            as_images(sprites[0][:2]).save(tmp_path / "both.png")
        assert not (tmp_path / "both.png").exists()
        # A folder is a folder whatever the number of images (one image went to a file 'run.v2', which Pillow
        # refused for its extension), and a file's missing folders are made, as a folder's are
        assert as_images(one).save(str(tmp_path / "run.v2") + "/") == [tmp_path / "run.v2" / "image-00000.png"]
        assert as_images(one).save(tmp_path / "run.v3") == [tmp_path / "run.v3" / "image-00000.png"]
        assert as_images(one).save(tmp_path / "a" / "b" / "one.png") == [tmp_path / "a" / "b" / "one.png"]
        assert as_images(one).save(tmp_path / "a") == [tmp_path / "a" / "image-00000.png"]  # an existing folder

        # A batch the stream cannot send ends it with that batch's own error, after the batches before it
        good, bad = sprites[0][:2], sprites[0][:2].astype(np.int64)
        got = []
        with pytest.raises(ValueError, match="dtype int64") as info:
            for codes in c.compress_stream([good, good, bad, good]):
                got.append(codes)
        assert len(got) == 2 and "batch 2 of the stream" in str(info.value.__notes__)
        with pytest.raises(ValueError, match="no codes given"):
            list(c.decompress_stream([got[0], []]))
        with pytest.raises(DataLoss):  # the server's answer to batch 0 comes before batch 1's own error
            list(c.decompress_stream([[code.data[:-1] + bytes([code.data[-1] ^ 1])], []]))

    async def stream() -> tuple[int, BaseException]:
        async with AsyncClient(server.target) as ac:
            n = 0
            try:
                async for _ in ac.compress_stream([good, bad]):
                    n += 1
            except ValueError as exc:
                return n, exc
        raise AssertionError("the bad batch passed")

    n, exc = asyncio.run(stream())
    assert n == 1 and "dtype int64" in str(exc)  # not a CancelledError


def test_health_is_serving_only_while_the_server_says_so_on_every_connection() -> None:
    s = serve()
    try:
        with Client(s.target, connections=3) as c:
            assert c.health() and c.health("color_dsprites")
            s.run(s.running.set_health(False))  # as while warming or draining
            assert not c.health() and not c.health("color_dsprites")

            async def asked(model: str = "") -> bool:
                async with AsyncClient(s.target, connections=3) as ac:
                    return await ac.health(model)

            assert not asyncio.run(asked()) and not asyncio.run(asked("dsprites"))
            s.run(s.running.set_health(True))
            assert c.health() and asyncio.run(asked()) and asyncio.run(asked("dsprites"))
            with pytest.raises(NotFound, match="serves no model 'nope'"):  # a model the server never served
                c.health("nope")
            with pytest.raises(NotFound, match="serves no model 'nope'"):
                asyncio.run(asked("nope"))
    finally:
        s.stop()


def test_async_client_matches_the_sync_client(server: ServerThread, sprites) -> None:
    imgs = sprites[0][:16]
    with Client(server.target) as c:
        want_codes, want_pixels = c.compress(imgs), c.decompress(c.compress(imgs))

    async def run() -> None:
        async with AsyncClient(server.target, connections=3) as ac:  # requests take turns over 3 connections
            assert await ac.health()
            codes = await ac.compress(imgs)
            assert codes == want_codes
            np.testing.assert_array_equal(await ac.decompress(codes), want_pixels)
            assert len(await ac.encode(imgs[:2])) == 2
            assert "dsprites" in {m.name for m in await ac.models()}
            streamed = [batch async for batch in ac.compress_stream([imgs[:8], imgs[8:]])]
            assert streamed[0] + streamed[1] == want_codes
            back = [b async for b in ac.decompress_stream(streamed)]
            np.testing.assert_array_equal(np.concatenate(back), want_pixels)
            swept = await ac.traverse(codes[0], sweep=((await ac.model()).factors[0].name, -1.0, 1.0, 3))
            assert swept.shape == (3, 64, 64, 1)

    asyncio.run(run())
    for bad in (0, 2.5, True, "2"):
        with pytest.raises(ValueError, match="connections must be a whole number >= 1, got"):
            Client(server.target, connections=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_batch must be a whole number >= 1, got 2.5"):
        Client(server.target, max_batch=2.5)  # type: ignore[arg-type]
    assert RetryPolicy(max_attempts=np.int64(3)).max_attempts == 3  # any whole number, as Client takes
    for policy in ({"base_s": float("nan")}, {"cap_s": float("inf")}, {"max_attempts": 2.5}, {"max_attempts": 0}):
        with pytest.raises(ValueError, match="invalid RetryPolicy"):
            RetryPolicy(**policy)  # type: ignore[arg-type]
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match=r"respread_s must be >= 0 seconds \(0: spread only at the start\), got"):
            Client(server.target, connections=2, respread_s=bad)
    with Client(server.target, connections=3) as c:  # one process: nothing to spread, every connection reaches it
        assert len(set(c.spread())) == 1
    with Client(f"localhost:{free_port()}", connections=2, timeout=2) as down:  # nobody there: it starts regardless
        assert down.spread() == ["", ""]


def test_a_closed_client_refuses_every_call_by_name(server: ServerThread, sprites) -> None:
    """A call on a closed client raises ValueError naming it, before any stub touches the closed channel (a
    health stub on a closed channel crashed the process in grpcio 1.85)."""
    c = Client(server.target)
    c.close()
    for call in (c.health, c.models, c.spread, lambda: c.compress(sprites[0][:1]),
                 lambda: list(c.compress_stream([sprites[0][:1]]))):
        with pytest.raises(ValueError, match="is closed; make a new one"):
            call()

    async def closed() -> int:
        ac = AsyncClient(server.target)
        await ac.close()
        refused = 0
        for call in (ac.health, ac.models, ac.spread, ac.__aenter__, lambda: ac.compress(sprites[0][:1])):
            with pytest.raises(ValueError, match="is closed; make a new one"):
                await call()
            refused += 1
        return refused

    assert asyncio.run(closed()) == 5


def test_calls_that_close_cuts_short_raise_client_closed_in_both_clients(server: ServerThread, sprites) -> None:
    """close() while calls run (on a server that holds every request 10 s for a fuller batch) ends each of them with
    ClientClosed, in both clients. grpc.aio reported them as CancelledError: the caller's task ended cancelled though
    nobody cancelled it, `except Exception` missed it, and a TaskGroup dropped the call's outcome without a word; the
    sync client said ServerError CANCELLED, or retried it (RetryPolicy(on_resource_exhausted=True)) and then raised
    ValueError. A task that is itself cancelled still ends cancelled."""
    image = sprites[0][:1]
    with Client(server.target) as c:
        code = c.compress(image)[0]
    slow = serve(max_delay_ms=10_000)
    try:
        async def started(c: AsyncClient, *calls: Any) -> list[asyncio.Task]:
            await c.models()  # the server's limits learned: each call below goes straight to its RPC
            tasks = [asyncio.create_task(call) for call in calls]
            await asyncio.sleep(0.5)
            assert not any(t.done() for t in tasks)
            return tasks

        async def cut() -> list[str]:
            c = AsyncClient(slow.target, timeout=30)

            async def streamed(stream: Any) -> list[Any]:
                return [out async for out in stream]

            tasks = await started(c, c.compress(image), c.decompress([code]), c.encode(image), c.traverse(code),
                                  streamed(c.compress_stream([image])), streamed(c.decompress_stream([[code]])))
            await c.close()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            assert not any(t.cancelled() for t in tasks)
            first = outcomes[0]
            assert isinstance(first, ClientClosed) and first.code == "CANCELLED" and "closed while the call ran" in str(first)
            return [type(o).__name__ for o in outcomes]

        assert asyncio.run(cut()) == ["ClientClosed"] * 6

        if sys.version_info >= (3, 11):
            async def grouped() -> list[str]:
                c = AsyncClient(slow.target, timeout=30)
                await c.models()

                async def closer() -> None:
                    await asyncio.sleep(0.5)
                    await c.close()

                try:
                    async with asyncio.TaskGroup() as group:
                        group.create_task(c.compress(image))
                        group.create_task(closer())
                except Exception as exc:  # an ExceptionGroup
                    return [type(e).__name__ for e in exc.exceptions]  # type: ignore[attr-defined]
                return []  # the group ended as though nothing had failed

            assert asyncio.run(grouped()) == ["ClientClosed"]

        async def cancelled() -> tuple[bool, bool]:
            c = AsyncClient(slow.target, timeout=30)
            (alone,) = await started(c, c.compress(image))
            alone.cancel()
            await asyncio.gather(alone, return_exceptions=True)
            (racing,) = await started(c, c.compress(image))
            racing.cancel()  # and the client closed before the task runs again
            await c.close()
            await asyncio.gather(racing, return_exceptions=True)
            return alone.cancelled(), racing.cancelled()

        # Python 3.10 cannot tell the second task's own cancellation from the close's (no Task.cancelling())
        assert asyncio.run(cancelled()) == (True, sys.version_info >= (3, 11))

        c = Client(slow.target, timeout=30, retry=RetryPolicy(on_resource_exhausted=True))  # retries CANCELLED
        c.models()
        outcomes: dict[str, str] = {}

        def run(name: str, call: Callable[[], Any]) -> None:
            try:
                call()
                outcomes[name] = "returned"
            except Exception as exc:  # noqa: BLE001 - what the call raised is the point
                outcomes[name] = type(exc).__name__

        threads = [threading.Thread(target=run, args=args) for args in (
            ("compress", lambda: c.compress(image)), ("stream", lambda: list(c.compress_stream([image]))))]
        for t in threads:
            t.start()
        time.sleep(0.5)
        assert not outcomes
        c.close()
        for t in threads:
            t.join(30)
        assert outcomes == {"compress": "ClientClosed", "stream": "ClientClosed"}
    finally:
        slow.stop()


def test_close_during_a_retry_backoff_raises_client_closed() -> None:
    """close() while a call waits to retry (nobody listens: UNAVAILABLE, retried) ends it with ClientClosed, as it
    ends a call in flight. It raised ValueError ("closed; make a new one", as for a call made after close()), and
    health's next attempt went to its closed channel (which can crash grpcio)."""
    target, retry = f"127.0.0.1:{free_port()}", RetryPolicy(max_attempts=1000, base_s=0.2, cap_s=0.2)
    c = Client(target, timeout=30, retry=retry)
    outcomes: dict[str, str] = {}

    def run(name: str, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as exc:  # noqa: BLE001
            outcomes[name] = type(exc).__name__

    threads = [threading.Thread(target=run, args=args) for args in (("models", c.models), ("health", c.health))]
    for t in threads:
        t.start()
    time.sleep(0.5)
    c.close()
    for t in threads:
        t.join(30)
    assert outcomes == {"models": "ClientClosed", "health": "ClientClosed"}

    async def cut() -> list[str]:
        ac = AsyncClient(target, timeout=30, retry=retry)
        tasks = [asyncio.create_task(call) for call in (ac.models(), ac.health())]
        await asyncio.sleep(0.5)
        await ac.close()
        return [type(o).__name__ for o in await asyncio.gather(*tasks, return_exceptions=True)]

    assert asyncio.run(cut()) == ["ClientClosed", "ClientClosed"]


def test_arrays_mixed_with_encoded_images_are_refused_before_any_request(server: ServerThread, sprites) -> None:
    """The whole input is judged before any request (ListModels included). Only a request that held both kinds was
    refused: cut between the two ([arr, arr] + [png] with max_batch=2), both were sent and answered; cut after
    ([arr, arr] + [arr, png]), the first request was answered before the TypeError. A stream reads its batches
    lazily and judges each as it reads it: each must be one kind, though the batches may differ."""
    arr = sprites[0][0]
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0]).save(buf, format="PNG")
    png = buf.getvalue()
    mixes = ([arr, arr, png], [arr, arr, arr, png], [png, png, arr])
    from disco.client import _convert

    with pytest.raises(TypeError, match="cannot send an image of type int"):  # not taken for the "encoded image" of a mix
        _convert.image_items([arr, 5])
    said = r"image \d is a numpy array and image \d an encoded image .*: one call takes either .*, not both"
    methods = ("ListModels", "Compress", "Encode", "Traverse")
    before = [served(server, m) for m in methods]
    with Client(server.target, max_batch=2) as c:
        for call in (c.compress, c.encode, c.traverse):
            for mixed in mixes:
                with pytest.raises(TypeError, match=said):
                    call(mixed)

    async def refused(streams: bool) -> int:
        n = 0
        async with AsyncClient(server.target, max_batch=2) as ac:
            async def streamed(x: Any) -> list[Any]:
                return [codes async for codes in ac.compress_stream([x])]

            for call in (streamed,) if streams else (ac.compress, ac.encode, ac.traverse):
                for mixed in mixes:
                    with pytest.raises(TypeError, match=said):
                        await call(mixed)
                    n += 1
        return n

    assert asyncio.run(refused(streams=False)) == 9
    assert [served(server, m) for m in methods] == before  # not one request
    with Client(server.target, max_batch=2) as c:
        for mixed in mixes:
            with pytest.raises(TypeError, match=said) as info:
                list(c.compress_stream([mixed]))
            assert "batch 0 of the stream" in str(info.value.__notes__)
        assert [len(codes) for codes in c.compress_stream([[arr, arr, arr], [png, png]])] == [3, 2]
    assert asyncio.run(refused(streams=True)) == 3


def test_codes_of_different_image_shapes_are_refused_however_they_are_split(server: ServerThread, sprites) -> None:
    """Gray and colour codes in one call: one request is refused by the server; split over requests (max_batch),
    each is answered, and the client refuses the same way rather than failing to join them."""
    with Client(server.target) as c:
        gray = c.compress(sprites[0][:1])[0]
        color = c.compress(np.zeros((1, 64, 64, 3), np.uint8), model="color_dsprites")[0]
        with pytest.raises(InvalidArgument, match="different image shapes"):
            c.decompress([gray, color])
    with Client(server.target, max_batch=1) as c:
        with pytest.raises(InvalidArgument, match=r"different image shapes \[\(64, 64, 1\), \(64, 64, 3\)\]"):
            c.decompress([gray, color])

    async def split() -> None:
        async with AsyncClient(server.target, max_batch=1) as ac:
            await ac.decompress([gray, color])

    with pytest.raises(InvalidArgument, match="different image shapes"):
        asyncio.run(split())


def test_stream_and_traverse_and_images_save(server: ServerThread, sprites, tmp_path: Path) -> None:
    imgs = sprites[0][:12]
    with Client(server.target) as c:
        streamed = list(c.compress_stream([imgs[:5], imgs[5:]]))
        assert [len(b) for b in streamed] == [5, 7] and streamed[0] + streamed[1] == c.compress(imgs)
        back = list(c.decompress_stream(streamed))
        assert [len(b) for b in back] == [5, 7]
        np.testing.assert_array_equal(np.concatenate(back), c.decompress(streamed[0] + streamed[1]))
        factor = c.model().factors[0]
        out = c.traverse(imgs[:2], sweep=(factor.name, factor.min, factor.max, 4))
        assert out.shape == (8, 64, 64, 1)
        files = out.save(tmp_path / "sweep")
        assert len(files) == 8 and files[0].stat().st_size > 0
        c.decompress(streamed[0][:1]).save(tmp_path / "one.png")
        assert (tmp_path / "one.png").exists()


def test_traverse_arguments_fail_by_name_and_a_code_keeps_its_model(server: ServerThread, sprites) -> None:
    """A sweep or edit the request could not carry is a ValueError naming it, before any request; a code names its
    model, so the client's default model is not sent with it (the server refused the pair as a mismatch)."""
    with Client(server.target) as c:
        code = c.compress(sprites[0][:1])[0]
        factor = c.model().factors[0]
        f = factor.name
        for sweep, says in [((f, 0.0, 1.0, 3.0), "sweep steps 3.0"), ((f, 0.0, 1.0, "3"), "sweep steps '3'"),
                            ((f, 0.0, 1.0, True), "sweep steps True"), ((f, 0.0, 1.0, 2**31), "sweep steps 2147483648"),
                            ((f, 0.0, 1.0, 0), "sweep steps 0"), ((f, 0.0, 1.0), "expected (factor, start, stop, steps)"),
                            ((7, 0.0, 1.0, 3), "sweep names factor 7")]:
            with pytest.raises(ValueError, match=re.escape(says)):
                c.traverse(code, sweep=sweep)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="set names factor 7"):
            c.traverse(code, set={7: 0.5})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match="shift names factor None"):
            c.traverse(code, shift={None: 0.5})  # type: ignore[dict-item]
        np_steps = c.traverse(code, sweep=(f, factor.min, factor.max, np.int64(2)))  # a numpy integer is a whole number
        assert np_steps.shape == (2, 64, 64, 1)
        plain = c.traverse(code)
    with Client(server.target, model="color_dsprites") as other:
        np.testing.assert_array_equal(other.traverse(code), plain)
    with Client(f"127.0.0.1:{free_port()}", timeout=2) as nobody:  # judged before any call: no server needed
        with pytest.raises(ValueError, match="sweep steps 0"):
            nobody.traverse(code, sweep=(f, 0.0, 1.0, 0))


def test_an_async_stream_whose_deadline_passes_raises_deadline_exceeded(server: ServerThread, sprites) -> None:
    """grpc.aio ends a stream whose deadline passes while it writes with an INTERNAL of its own: half such streams
    raised ServerError('INTERNAL: Internal error from Core'), where the sync client says DEADLINE_EXCEEDED."""
    async def run() -> list[str]:
        seen = []
        async with AsyncClient(server.target) as c:
            codes = await c.compress(sprites[0][:8])
            for stream in (lambda: c.compress_stream((sprites[0][:8] for _ in range(10**6)), timeout=0.3),
                           lambda: c.decompress_stream((codes for _ in range(10**6)), timeout=0.3)):
                for _ in range(4):
                    try:
                        async for _ in stream():
                            pass
                        seen.append("ended")
                    except Exception as exc:  # noqa: BLE001 - which error is what this test looks at
                        seen.append(type(exc).__name__)
        return seen

    assert asyncio.run(run()) == ["DeadlineExceeded"] * 8


def test_inspect_reads_headers_offline(server: ServerThread, sprites) -> None:
    with Client(server.target) as c:
        code = c.compress(sprites[0][:1])[0]
        (blob,) = c.compress(sprites[0][:10], batch=True)
        fp = c.model().fingerprint
    info = inspect(code)
    assert info.format == 2 and info.count == 1 and info.size == len(code) and info.model_id == int(fp[:2], 16)
    assert info.quality_id in {q.id for q in Client(server.target).model().qualities}
    b = inspect(blob)
    assert b.format == 3 and b.count == 10 and b.model_id == info.model_id
    with pytest.raises(Exception, match="shorter than"):
        inspect(b"\x20\x01")


def test_a_token_bound_for_another_machine_without_tls_is_warned_of(certs: Path) -> None:
    """The token is plain metadata, which gRPC sends over plaintext too: whoever is on the path could reuse it."""
    from disco.client import TLS, AsyncClient, InsecureTokenWarning

    for target in ("10.0.0.7:50051", "disco.example:50051", "127.0.0.1:1,10.0.0.7:2", "[2001:db8::1]:5",
                   "localhost.example.com:5", "dns://127.0.0.1:53/disco.example:5", "[::ffff:10.0.0.7]:5",
                   "web.localhost:5"):
        with pytest.warns(InsecureTokenWarning, match="plaintext") as record:
            Client(target, token="t").close()
        assert record[0].filename == __file__  # points at the caller, not at the SDK

    async def construct() -> None:
        await AsyncClient("10.0.0.7:50051", token="t").close()

    with pytest.warns(InsecureTokenWarning):
        asyncio.run(construct())
    for target in ("localhost:50051", "127.0.0.1:1", "[::1]:5", "dns:///localhost:5", "127.0.0.1:1,127.0.0.2:2", "unix:/tmp/disco.sock",
                   "LOCALHOST:5", "dns:localhost:5", "0.0.0.0:5", "[::ffff:127.0.0.1]:5"):
        Client(target, token="t").close()  # this machine: no warning (filterwarnings=error would fail here)
    Client("10.0.0.7:50051", token="t", tls=TLS(ca=certs / "ca.pem")).close()
    Client("10.0.0.7:50051").close()  # no token, nothing to leak


def test_compress_stream_takes_a_version_and_batch_containers_as_compress_does(server: ServerThread, sprites) -> None:
    """compress_stream had neither: a stream could not pin a version, nor make batch containers."""
    batches = [sprites[0][:7], sprites[0][7:9]]
    with Client(server.target) as c:
        version = c.model().version
        assert [bytes(x) for b in c.compress_stream(batches, version=version) for x in b] == \
            [bytes(x) for x in c.compress(sprites[0][:9])]
        with pytest.raises(NotFound, match="99"):
            list(c.compress_stream(batches, version="99"))
        # what protobuf took before the arguments were checked still works: None for a default, numpy's bool
        assert inspect(c.compress(sprites[0][:2], model=None, quality=None, batch=np.True_)[0]).count == 2
        streamed = list(c.compress_stream(batches, batch=True))
        assert [[inspect(x).count for x in b] for b in streamed] == [[7], [2]]  # one container a batch here
        np.testing.assert_array_equal(c.decompress(streamed[0] + streamed[1]), c.decompress(c.compress(sprites[0][:9])))

    async def run() -> list[list[int]]:
        async with AsyncClient(server.target) as ac:
            return [[inspect(x).count for x in b] async for b in ac.compress_stream(batches, version=version, batch=True)]

    assert asyncio.run(run()) == [[7], [2]]


@pytest.mark.parametrize("call, message", [
    (lambda c, x: c.compress(x, model=1), "model must be a str, got 1"),
    (lambda c, x: c.compress(x, version=2), "version must be a str, got 2"),
    (lambda c, x: c.compress(x, quality=3), "quality must be a str, got 3"),
    (lambda c, x: c.compress(x, batch="no"), "batch must be a bool, got 'no'"),
    (lambda c, x: c.compress(x, batch=2), "batch must be a bool, got 2"),
    (lambda c, x: list(c.compress_stream([x], quality=b"low")), "quality must be a str, got b'low'"),
    (lambda c, x: c.encode(x, version=4), "version must be a str"),
    (lambda c, x: c.traverse(x, set=[("posX", 0.5)]), "set must map factor names to values"),
    (lambda c, x: c.traverse(x, model=5), "model must be a str"),
    (lambda c, x: c.model(6), "model must be a str"),
    (lambda c, x: Client("localhost:1", model=3), "model must be a str"),
    (lambda c, x: Client("localhost:1", token=b"t"), "token must be a str or None"),
    (lambda c, x: Client("localhost:1", retry=3), "retry must be a RetryPolicy or None"),
    (lambda c, x: Client("localhost:1", tls="ca.pem"), "tls must be a TLS or None"),
    (lambda c, x: Client("localhost:1", respread_s="x"), "respread_s must be >= 0"),
])
def test_arguments_of_the_wrong_type_are_named_before_any_call(call: Callable, message: str, sprites) -> None:
    """They raised protobuf's TypeErrors ('bad argument type for built-in operation'), or failed at the first call."""
    with Client(f"localhost:{free_port()}", retry=RetryPolicy(max_attempts=1), timeout=5) as c:  # nobody there
        with pytest.raises(ValueError, match=re.escape(message)):
            call(c, sprites[0][:1])

    async def run() -> None:
        async with AsyncClient(f"localhost:{free_port()}", retry=RetryPolicy(max_attempts=1), timeout=5) as ac:
            with pytest.raises(ValueError, match="model must be a str"):
                await ac.compress(sprites[0][:1], model=1)
            with pytest.raises(ValueError, match="batch must be a bool"):
                await ac.compress(sprites[0][:1], batch=2)

    asyncio.run(run())


def test_encode_cuts_requests_whose_answers_would_pass_the_message_limit(sprites) -> None:
    """A 1-bit dSprites PNG is ~80 bytes and its named factors ~106: encode() cut by request size alone, and the
    server refused to send an answer over its limit (INVALID_ARGUMENT 'the response came to 75090 bytes')."""
    def png(image: np.ndarray) -> bytes:
        out = io.BytesIO()
        Image.fromarray(image[..., 0]).convert("1").save(out, format="PNG", optimize=True)
        return out.getvalue()

    small = min((png(x) for x in sprites[0][:16]), key=len)
    s = serve(max_message_bytes=65536)
    try:
        with Client(s.target, timeout=60) as c:
            factors = c.encode([small] * 3000)
            assert len(factors) == 3000 and factors[0] == factors[-1]
    finally:
        s.stop()


def test_a_tls_or_token_file_that_cannot_be_read_is_named_by_its_setting(certs: Path, tmp_path: Path) -> None:
    """The start failed with a bare "[Errno 2] No such file or directory: '/nope.key'" or "[Errno 21] Is a
    directory", naming no setting."""
    for settings, message in (
            ({"auth_token_file": str(tmp_path / "nope")}, "--auth-token-file .*nope cannot be read: No such file"),
            ({"auth_token_file": str(tmp_path)}, "--auth-token-file .* cannot be read: Is a directory"),
            ({"tls_cert": str(certs / "server.pem"), "tls_key": str(tmp_path / "nope.key")},
             "--tls-key .*nope.key cannot be read: No such file"),
            ({"tls_cert": str(tmp_path), "tls_key": str(certs / "server.key")}, "--tls-cert .* cannot be read"),
            ({"tls_cert": str(certs / "server.pem"), "tls_key": str(certs / "server.key"),
              "tls_client_ca": str(tmp_path / "ca.pem")}, "--tls-client-ca .*ca.pem cannot be read")):
        with pytest.raises(OSError, match=message):
            serve(**settings)


def test_a_tls_server_answers_probes_in_plaintext_on_its_health_port(certs: Path) -> None:
    """Kubernetes' native gRPC probes cannot speak TLS: every probe of a TLS server failed and its pod never
    started. --health-port serves the same health statuses alone, in plaintext."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health_port = free_port()
    s = serve(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"), health_port=health_port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as ch:
            probe = health_pb2_grpc.HealthStub(ch)

            def status(service: str = "disco.v1.Codec") -> str:
                return health_pb2.HealthCheckResponse.ServingStatus.Name(
                    probe.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)

            assert status() == status("") == status("disco.v1.Codec/dsprites") == "SERVING"
            with pytest.raises(grpc.RpcError) as info:  # nothing but health there
                codec_pb2_grpc.CodecStub(ch).ListModels(pb.ListModelsRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            s.run(s.running.set_health(False))  # as a drain begins
            assert status() == "NOT_SERVING"
        with grpc.insecure_channel(f"127.0.0.1:{s.running.port}") as ch, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)  # the TLS port: no
    finally:
        s.stop()
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as ch, pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)  # stopped with the server


def test_a_watch_on_the_health_port_stays_open_through_the_drain() -> None:
    """The health port stops last, once the drain is over. A Watch there ended at once while the main server
    drained, so a checker that reopens at once spun until the exit; it now sends NOT_SERVING and stays open until
    the health server stops. A Watch on the main port still ends at the drain (it would hold the drain up)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health_port = free_port()
    s: ServerThread | None = serve(health_port=health_port)
    request = health_pb2.HealthCheckRequest(service="disco.v1.Codec")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{s.running.port}") as main, \
                grpc.insecure_channel(f"127.0.0.1:{health_port}") as probes:
            main_watch = health_pb2_grpc.HealthStub(main).Watch(request, timeout=30)
            assert next(main_watch).status == health_pb2.HealthCheckResponse.SERVING
            s.run(s.running.set_health(False))
            s.run(s.running.health.drain())  # as a SIGTERM begins the drain; the servers still run
            assert [r.status for r in main_watch] == [health_pb2.HealthCheckResponse.NOT_SERVING]
            assert main_watch.code() == grpc.StatusCode.OK
            watch = health_pb2_grpc.HealthStub(probes).Watch(request, timeout=1.5)  # opened during the drain
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:
                next(watch)  # open until its deadline: no end, no new status
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            still = health_pb2_grpc.HealthStub(probes).Watch(request, timeout=60)
            assert next(still).status == health_pb2.HealthCheckResponse.NOT_SERVING
            stopping, s = s, None
            stopping.stop()
            assert list(still) == [] and still.code() == grpc.StatusCode.OK  # ended as the health server stops
            # (cut by the stop instead, each open Watch was logged as an error with a traceback)
    finally:
        if s is not None:
            s.stop()


def test_a_health_port_that_cannot_be_bound_stops_the_start_and_frees_the_main_port() -> None:
    """The main port was bound, then the health port failed, and nothing stopped the server: its port stayed bound."""
    import socket

    main, held = free_port(), socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    try:
        with pytest.raises(OSError, match="could not bind --health-port"):
            serve(port=main, health_port=held.getsockname()[1])
    finally:
        held.close()
    with socket.socket() as again:
        again.bind(("127.0.0.1", main))  # free again



def test_images_a_server_answers_are_read_as_raw_pixels_only(server: ServerThread, sprites) -> None:
    """The SDK asks for raw pixels. A server (or whoever sits on a plaintext channel) that answers image files
    instead had them opened with every format Pillow knows: an EPS file goes to Ghostscript, an external program.
    Files, and a tensor its bytes do not fill, are a ServerError; nothing is opened."""
    from concurrent import futures

    from PIL import EpsImagePlugin

    from disco.client import ServerError

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n"
    answers = [pb.Images(files=pb.EncodedImages(files=[eps])),
               pb.Images(tensor=pb.Tensor(data=bytes(100), shape=[1, 64, 64, 1], dtype=pb.DTYPE_UINT8)),
               pb.Images(tensor=pb.Tensor(data=bytes(4096), shape=[64, 64, 1], dtype=pb.DTYPE_UINT8)),
               pb.Images()]
    ghostscript: list[object] = []
    real = EpsImagePlugin.Ghostscript

    def spy(*args: object, **kwargs: object) -> None:
        ghostscript.append(args)
        raise OSError("Ghostscript would run here")

    EpsImagePlugin.Ghostscript = spy  # type: ignore[assignment]
    channel = grpc.insecure_channel(server.target)
    up = codec_pb2_grpc.CodecStub(channel)

    class Rogue(codec_pb2_grpc.CodecServicer):
        def ListModels(self, request, context):  # type: ignore[no-untyped-def]
            return up.ListModels(request)

        def Decompress(self, request, context):  # type: ignore[no-untyped-def]
            return pb.DecompressResponse(images=answers[0], models=up.Decompress(request).models)

    rogue = grpc.server(futures.ThreadPoolExecutor(2))
    codec_pb2_grpc.add_CodecServicer_to_server(Rogue(), rogue)
    port = rogue.add_insecure_port("127.0.0.1:0")
    rogue.start()
    try:
        with Client(server.target) as direct:
            code = direct.compress(sprites[0][:1])
        with Client(f"127.0.0.1:{port}") as c:
            for expected in ("answered image files to a request for raw pixels", "a tensor of 100 bytes, shape [1, 64, 64, 1]",
                             "shape [64, 64, 1]", "answered no images"):
                with pytest.raises(ServerError, match=re.escape(expected)):
                    c.decompress(code)
                answers.pop(0)
        assert ghostscript == []
    finally:
        EpsImagePlugin.Ghostscript = real  # type: ignore[assignment]
        rogue.stop(0)
        channel.close()


def test_errors_name_codes_and_files_as_the_caller_counts_them_across_requests(sprites) -> None:
    """The SDK cuts a large call into requests; the server numbers each request's codes and files from 0. An error
    names the caller's position (code 180, not code 80 of the second request), sync and async."""
    s = serve(max_images_per_request=100)
    try:
        with Client(s.target) as c:
            codes = [k.data for k in c.compress(np.concatenate([sprites[0]] * 2)[:250])]
            codes[180] = codes[180][:-1] + bytes([codes[180][-1] ^ 1])  # its checksum fails
            with pytest.raises(DataLoss, match=r"^DATA_LOSS: code 180: checksum mismatch"):
                c.decompress(codes)
            buf = io.BytesIO()
            Image.fromarray(np.zeros((32, 32), np.uint8)).save(buf, format="PNG")
            files = [buf.getvalue()] * 250
            good = io.BytesIO()
            Image.fromarray(sprites[0][0][..., 0]).save(good, format="PNG")
            files = [good.getvalue()] * 150 + files[150:]
            for call in (c.compress, c.encode, c.traverse):
                with pytest.raises(InvalidArgument, match=r"image file 150 is 32x32 \(HxW\), the model expects 64x64"):
                    call(files)

        async def async_calls() -> None:
            async with AsyncClient(s.target) as ac:
                with pytest.raises(DataLoss, match=r"^DATA_LOSS: code 180: checksum mismatch"):
                    await ac.decompress(codes)
                for acall in (ac.compress, ac.traverse):
                    with pytest.raises(InvalidArgument, match=r"image file 150 is 32x32"):
                        await acall(files)

        asyncio.run(async_calls())
    finally:
        s.stop()



def test_uint8_images_of_only_0_and_1_warn_at_the_callers_line(server: ServerThread, sprites) -> None:
    """A review: dSprites' own images (uint8 in {0, 1}) sent as they are compressed into codes of black images, with
    no word said. They are still sent (a very dark image is valid), with a warning at the caller's line."""
    import warnings

    from disco.client._convert import MASK_WARNING

    masks = (sprites[0][:4] // 255).astype(np.uint8)  # what dSprites' file holds
    with Client(server.target) as c, warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        masked = c.compress(masks)
        c.compress(list(masks))
        c.traverse(list(masks[:1]), set={c.model().factors[0].name: 0.0})
        seen = c.compress(sprites[0][:4])  # 0/255: no word
        c.compress(np.zeros((2, 64, 64, 1), np.uint8))  # black: no word
        c.compress(masks.astype(np.float32))  # float 0..1 is the other right way
        for _ in c.compress_stream([masks]):  # a stream's batches are read on gRPC's thread: said where it started
            pass

        async def streamed() -> None:
            async with AsyncClient(server.target) as ac:
                async for _ in ac.compress_stream([masks]):
                    pass

        asyncio.run(streamed())
    assert [(w.message.args[0], w.filename) for w in said] == [(MASK_WARNING, __file__)] * 5
    with Client(server.target) as c, warnings.catch_warnings(record=True) as said:  # a filter by module holds (a
        warnings.simplefilter("always")  # review: warn_explicit named the module after the file's path)
        warnings.filterwarnings("ignore", message="uint8 images whose pixels", module=__name__)
        c.compress(masks)
        for _ in c.compress_stream([masks]):
            pass
    assert said == []
    import subprocess

    run = subprocess.run([sys.executable, "-c", "import numpy as np\nfrom disco.client._convert import image_items\n"
                          "image_items(np.ones((1, 4, 4, 1), np.uint8))\nprint('sent')"],
                         capture_output=True, text=True, timeout=60)  # __main__ of `python -c`, as in a REPL
    assert run.returncode == 0 and run.stdout == "sent\n", run.stderr  # an ImportError, from warn_explicit (a review)
    assert f"<string>:3: UserWarning: {MASK_WARNING}" in run.stderr
    with Client(server.target) as c, pytest.raises(ValueError, match="image dtype float16 is not supported"):
        c.compress(np.full((1, 64, 64, 1), np.nan, np.float16))  # its dtype, not its pixels: none would be taken
    assert len({code.data for code in seen}) == 4 and len({code.data for code in masked}) == 1  # what it is for:
    # four sprites sent as 0/1 compressed alike, as black images do


def test_traverse_judges_its_source_before_any_request_and_names_bad_pixels_as_the_caller_counts(sprites) -> None:
    """A review: a NaN pixel in a traverse cut into requests was named by a flat index within the second request (a
    valid pixel of another image), after the first request's work; bytes of an image file were refused only after a
    ListModels call; the list compress() returns was refused as 'an image of type Code'."""
    dead = Client(f"127.0.0.1:{free_port()}", timeout=1)  # nothing listens: any request would fail Unavailable
    x = (sprites[0][:100] / 255).astype(np.float32)
    x[70, 3, 5, 0] = np.nan
    with dead, pytest.raises(ValueError, match=r"^image 70 has pixel nan at row 3, column 5, channel 0; float pixels "
                                               r"must be finite and in \[0, 1\]"):
        dead.traverse(x, sweep=("posX", 0.0, 1.0, 64))
    y = list((sprites[0][:3] / 255).astype(np.float64))
    y[2][0, 0, 0] = 1.5
    with dead, pytest.raises(ValueError, match=r"^image 2 has pixel 1.5 at row 0, column 0"):
        dead.compress(y)
    with dead, pytest.raises(ValueError, match=r"^image 70 has pixel nan"):  # big-endian floats too (a review)
        dead.compress(x.astype(">f4"))
    png = io.BytesIO()
    Image.fromarray(sprites[0][0][..., 0]).save(png, format="PNG")
    with dead, pytest.raises(ValueError, match="traverse takes bytes as a code, and these are an image file"):
        dead.traverse(png.getvalue(), shift={"posX": 0.1})
    with dead, pytest.raises(TypeError, match=r"traverse takes one code, and was given a list of 2 Code: pass one of "
                                              r"them \(codes\[0\]\)"):
        dead.traverse([Code(b"x" * 11, "dsprites", "4")] * 2, shift={"posX": 0.1})


def test_async_streams_take_async_iterables_and_every_stream_refuses_what_is_no_iterable_first(
        server: ServerThread, sprites) -> None:
    """A review: an async generator given to AsyncClient.compress_stream opened a stream (counted OK by the server)
    and then failed with "'async_generator' object is not iterable", noted as though batches had been sent. The
    async client now reads one; what no stream can read is refused before any request, in both clients."""
    images = sprites[0][:6]

    async def agen(items: list[Any]) -> Any:
        for item in items:
            await asyncio.sleep(0)
            yield item

    async def run() -> tuple[list[list[Code]], list[list[Code]], list[Any]]:
        async with AsyncClient(server.target, timeout=30) as ac:
            from_list = [b async for b in ac.compress_stream([images[:4], images[4:]])]
            from_agen = [b async for b in ac.compress_stream(agen([images[:4], images[4:]]))]
            back = [b async for b in ac.decompress_stream(agen(from_agen))]
            return from_list, from_agen, back

    from_list, from_agen, back = asyncio.run(run())
    assert [[c.data for c in b] for b in from_agen] == [[c.data for c in b] for b in from_list]
    assert [len(b) for b in back] == [4, 2]

    async def refused(batches: Any) -> None:
        async with AsyncClient(f"127.0.0.1:{free_port()}", timeout=1) as dead:  # nothing listens there
            async for _ in dead.compress_stream(batches):
                pass

    class NotIterable:  # __iter__ = None says no, whatever __getitem__ offers (iter() refuses it)
        __iter__ = None

        def __getitem__(self, k: int) -> Any:
            return images

    for bad in (7, b"abc", NotIterable()):
        with pytest.raises(TypeError, match="batches must be an iterable of batches"):
            asyncio.run(refused(bad))
    class Indexed:  # a sequence by __getitem__ alone, as a map-style torch Dataset is: iter() reads it
        def __getitem__(self, k: int) -> Any:
            if k >= 2:
                raise IndexError(k)
            return images[3 * k : 3 * k + 3]

    class Both:  # iterable both ways: each client reads it its own way
        def __iter__(self) -> Any:
            return iter([images[:3], images[3:]])

        def __aiter__(self) -> Any:
            return agen([images[:3], images[3:]])

    class Counted:  # iter() is the stream's to call, once: a DataLoader's __iter__ starts its workers (a review)
        calls = 0

        def __iter__(self) -> Any:
            Counted.calls += 1
            return iter([images[:3], images[3:]])

    with Client(server.target) as c:
        assert [len(b) for b in c.compress_stream(Indexed())] == [len(b) for b in c.compress_stream(Both())] == [3, 3]
        assert [len(b) for b in c.compress_stream(Counted())] == [3, 3] and Counted.calls == 1

    async def others() -> list[list[int]]:
        async with AsyncClient(server.target) as ac:
            got = []
            for source in (Indexed(), Both()):
                got.append([len(b) async for b in ac.compress_stream(source)])
            return got

    assert asyncio.run(others()) == [[3, 3], [3, 3]]
    with Client(f"127.0.0.1:{free_port()}", timeout=1) as dead:
        with pytest.raises(TypeError, match="Client's streams read an iterable; AsyncClient's take both"):
            next(dead.compress_stream(agen([images])))
        with pytest.raises(TypeError, match="batches must be an iterable of batches"):
            next(dead.decompress_stream(Code(b"x" * 11, "dsprites", "4")))
