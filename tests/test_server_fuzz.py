"""Arbitrary bytes against the real server: every answer is a result or a client-error status, never INTERNAL,
and the server keeps serving. (A corrupted code that passes the 2-byte keyed checksum, about 1 in 65,536,
decodes to some image; the container's docstring states that rate, so OK stays an allowed answer here.)"""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from disco.v1 import codec_pb2 as pb
from disco.v1 import codec_pb2_grpc

from conftest import ServerThread

CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.NOT_FOUND}
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def stub(server: ServerThread):
    with grpc.insecure_channel(server.target) as ch:
        yield codec_pb2_grpc.CodecStub(ch)


@pytest.fixture(scope="module")
def codes(stub, sprites) -> list[bytes]:
    imgs, _ = sprites
    x = imgs[:4]
    one = pb.Images(tensor=pb.Tensor(data=x.tobytes(), shape=list(x.shape), dtype=pb.DTYPE_UINT8))
    single = list(stub.Compress(pb.CompressRequest(images=one), timeout=30).codes)
    batch = list(stub.Compress(pb.CompressRequest(images=one, batch=True), timeout=30).codes)
    return single + batch


def answered(call) -> grpc.StatusCode:  # noqa: ANN001
    try:
        call()
    except grpc.RpcError as exc:
        assert exc.code() in CLIENT_ERRORS, f"{exc.code()}: {exc.details()}"
        assert exc.details(), "an error must say what was wrong"
        return exc.code()
    return grpc.StatusCode.OK


@st.composite
def mangled(draw: st.DrawFn, codes: list[bytes]) -> bytes:
    """A real code (single or batch) with bytes replaced, cut off or appended; or bytes from nowhere."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=64))
    code = bytearray(draw(st.sampled_from(codes)))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "cut", "add"]))
        if op == "set" and code:
            code[draw(st.integers(0, len(code) - 1))] = draw(st.integers(0, 255))
        elif op == "cut" and code:
            del code[draw(st.integers(0, len(code) - 1)):]
        else:
            code += draw(st.binary(min_size=1, max_size=8))
    return bytes(code)


def test_mangled_codes_never_break_decompress_or_traverse(stub, codes, server: ServerThread) -> None:
    @FUZZ
    @given(st.data())
    def check(data: st.DataObject) -> None:
        batch = data.draw(st.lists(mangled(codes), min_size=1, max_size=4))
        answered(lambda: stub.Decompress(pb.DecompressRequest(codes=batch), timeout=30))
        answered(lambda: stub.Traverse(pb.TraverseRequest(code=batch[0]), timeout=30))

    check()
    ok = stub.Decompress(pb.DecompressRequest(codes=codes), timeout=30)  # still serving, still right
    assert list(ok.images.tensor.shape) == [8, 64, 64, 1]


@FUZZ
@given(shape=st.lists(st.integers(-2, 70), max_size=5), dtype=st.integers(-1, 4),
       size=st.integers(0, 64 * 64 * 4 + 8), files=st.lists(st.binary(max_size=80), max_size=3))
def test_arbitrary_tensors_and_files_never_break_compress(stub, shape: list[int], dtype: int, size: int,
                                                          files: list[bytes]) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    tensor = pb.Images(tensor=pb.Tensor(data=data, shape=shape, dtype=dtype))
    if answered(lambda: stub.Compress(pb.CompressRequest(images=tensor), timeout=30)) is grpc.StatusCode.OK:
        assert shape == [1, 64, 64, 1] or shape[1:] == [64, 64, 1]  # only a well-formed tensor can succeed
    answered(lambda: stub.Compress(pb.CompressRequest(images=pb.Images(files=pb.EncodedImages(files=files))),
                                   timeout=30))
    answered(lambda: stub.Encode(pb.EncodeRequest(images=tensor), timeout=30))


def test_a_request_that_does_not_parse_is_invalid_argument_counted_and_not_logged(server: ServerThread, stub,
                                                                                 sprites, caplog) -> None:
    """Bytes that are no valid message of the method's request type (bad UTF-8 in a string field, a truncated
    varint, wire garbage): INVALID_ARGUMENT naming the type, counted in disco_requests_total, no traceback in
    the log (gRPC's own answer would be UNKNOWN with one per call). In a stream it ends the stream there."""
    bad = [b"\x08\xff", b"\xff\xff\xff\xff", b"\x0a\x05ab"]  # cut varints, a field longer than the message
    counted = server.running.metrics.registry.get_sample_value
    before = counted("disco_requests_total", {"method": "Decompress", "code": "INVALID_ARGUMENT"}) or 0
    with grpc.insecure_channel(server.target) as ch:
        for method, kind in (("Compress", "CompressRequest"), ("Decompress", "DecompressRequest"),
                             ("Traverse", "TraverseRequest"), ("NoOp", "NoOpRequest")):
            call = ch.unary_unary(f"/disco.v1.Codec/{method}")
            for data in bad:
                with pytest.raises(grpc.RpcError) as err:
                    call(data, timeout=10)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, data, err.value.details())
                assert f"the request is not a valid disco.v1.{kind} message" in err.value.details()
        utf8 = b"\x0a\x04\x0a\x02\xff\xfe"  # CompressRequest.model.name of bad UTF-8
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary("/disco.v1.Codec/Compress")(utf8, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in err.value.details()
        x = sprites[0][:1]
        good = pb.CompressRequest(images=pb.Images(tensor=pb.Tensor(data=x.tobytes(), shape=list(x.shape),
                                                                      dtype=pb.DTYPE_UINT8))).SerializeToString()
        stream = ch.stream_stream("/disco.v1.Codec/CompressStream")(iter([good, utf8, good]), timeout=10)
        answers = []
        with pytest.raises(grpc.RpcError) as err:
            for r in stream:
                answers.append(pb.CompressResponse.FromString(r))
        assert len(answers) == 1 and len(answers[0].codes) == 1  # the good one before it was answered
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "CompressRequest" in err.value.details()
    assert counted("disco_requests_total", {"method": "Decompress", "code": "INVALID_ARGUMENT"}) == before + len(bad)
    assert not [r for r in caplog.records if r.name.startswith("grpc")], [r.getMessage() for r in caplog.records]
    assert len(stub.Compress(pb.CompressRequest.FromString(good), timeout=10).codes) == 1  # still serving
