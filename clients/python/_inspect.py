"""Read a code's header offline: no server, no model."""
from __future__ import annotations

from typing import Any

from disco.client._convert import code_bytes
from disco.client.errors import InvalidArgument
from disco.client.types import CodeInfo
from disco.service import container  # pure Python and numpy: no onnxruntime behind it
from disco.service.errors import InvalidCode


def inspect(code: Any) -> CodeInfo:
    """What a code's header says: format, quality id, model id (first fingerprint byte), sizes, count.

    The header carries one byte of the model fingerprint; the checksum binds the full fingerprint,
    so only a server with the model can tell that the code is intact.
    """
    data = code_bytes(code)
    try:
        if container.is_batch(data):
            b = container.parse_batch(data)
            return CodeInfo(container.FORMAT_BATCH, b.quality, b.model_id, len(data), len(b.stream), b.count)
        h = container.parse(data)
    except InvalidCode as exc:
        raise InvalidArgument(str(exc)) from exc
    return CodeInfo(h.version, h.quality, h.model_id, len(data), len(h.payload), 1)
