"""The decode cache (`--decode-cache-mb`): a repeated single code is answered from memory with exactly the image a
decode gives; least recently used out first within the budget; batch containers and corrupted codes go the normal way."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from disco.service.cache import DecodeCache
from disco.service.metrics import Metrics
from disco.v1 import codec_pb2 as pb
from disco.v1 import codec_pb2_grpc

from conftest import serve


def test_least_recently_used_out_first_within_the_budget() -> None:
    row = np.zeros((1, 1, 8, 8), np.float32)  # 256 bytes
    size = row.nbytes + 2 + 200  # the array, the 2-byte key and the per-entry estimate
    m = Metrics()
    cache: DecodeCache[str] = DecodeCache(3 * size, m)
    for key in (b"k1", b"k2", b"k3"):
        cache.put(key, row, key.decode())
    assert cache.lookup([b"k1"]) != [None]  # k1 is now the most recent: k2 goes first
    cache.put(b"k4", row, "k4")
    assert len(cache) == 3 and cache.bytes == 3 * size
    assert [f is not None for f in cache.lookup([b"k2", b"k3", b"k4"])] == [False, True, True]
    assert m.registry.get_sample_value("disco_decode_cache_lookups_total", {"result": "hit"}) == 3
    assert m.registry.get_sample_value("disco_decode_cache_lookups_total", {"result": "miss"}) == 1


def test_entries_are_private_read_only_copies() -> None:
    batch = np.arange(2 * 4, dtype=np.float32).reshape(2, 1, 2, 2)
    cache: DecodeCache[str] = DecodeCache(1 << 20)
    cache.put(b"a", batch[1:2], "v")
    batch[1] = -1  # the caller's batch changes afterwards: the cached image does not
    (found,) = cache.lookup([b"a"])
    assert found is not None
    got, what = found
    assert what == "v" and got.base is None and not got.flags.writeable
    np.testing.assert_array_equal(got, np.arange(4, 8, dtype=np.float32).reshape(1, 1, 2, 2))
    with pytest.raises(ValueError):
        got[0, 0, 0, 0] = 1
    DecodeCache(10).put(b"big", batch, "v")  # larger than the whole budget: not kept, no error


def test_repeated_codes_come_from_the_cache_with_the_same_pixels(sprites) -> None:
    x = sprites[0][:6]
    images = pb.Images(tensor=pb.Tensor(data=x.tobytes(), shape=list(x.shape), dtype=pb.DTYPE_UINT8))
    plain, cached = serve(), serve(decode_cache_mb=1)
    try:
        with grpc.insecure_channel(plain.target) as a, grpc.insecure_channel(cached.target) as b:
            codes = list(codec_pb2_grpc.CodecStub(a).Compress(pb.CompressRequest(images=images), timeout=30).codes)
            stub = codec_pb2_grpc.CodecStub(b)

            def decompress(cs: list[bytes]) -> bytes:
                return stub.Decompress(pb.DecompressRequest(codes=cs), timeout=30).images.tensor.data

            reference = codec_pb2_grpc.CodecStub(a).Decompress(pb.DecompressRequest(codes=codes), timeout=30)
            first = decompress(codes[:3])  # three misses
            mixed = decompress(codes[::-1])  # three hits among three misses, in the request's order
            again = decompress(codes)  # six hits
            assert first == reference.images.tensor.data[: 3 * 4096]
            assert again == reference.images.tensor.data
            assert mixed == b"".join(again[i * 4096 : (i + 1) * 4096] for i in reversed(range(6)))
            lookups = lambda r: cached.running.metrics.registry.get_sample_value(  # noqa: E731
                "disco_decode_cache_lookups_total", {"result": r})
            assert (lookups("hit"), lookups("miss")) == (9, 6)
            bad = bytearray(codes[0])
            bad[-1] ^= 1
            with pytest.raises(grpc.RpcError) as info:  # a corrupted code is never a hit
                decompress([bytes(bad)])
            assert info.value.code() == grpc.StatusCode.DATA_LOSS
            with pytest.raises(grpc.RpcError) as info:  # errors name the code by its place in the request
                decompress([codes[0], codes[1], codes[2], bytes(bad)])  # three hits, then a corrupted miss
            assert info.value.code() == grpc.StatusCode.DATA_LOSS and "code 3:" in info.value.details()
            with pytest.raises(grpc.RpcError) as info:
                decompress([])
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no codes given" in info.value.details()
            assert (lookups("hit"), lookups("miss")) == (12, 8)
            (blob,) = stub.Compress(pb.CompressRequest(images=images, batch=True), timeout=30).codes
            assert decompress([blob]) == reference.images.tensor.data  # a batch container decodes as before
            assert (lookups("hit"), lookups("miss")) == (12, 8)
    finally:
        plain.stop()
        cached.stop()
