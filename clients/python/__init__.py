"""DisCo client SDK: compress images into disentangled factor codes on a DisCo server, and back.

    from disco.client import Client
    with Client("localhost:50051") as c:
        codes = c.compress(images)
        pixels = c.decompress(codes)
"""
from disco.client._async_client import AsyncClient
from disco.client._client import Client
from disco.client._inspect import inspect
from disco.client._transport import TLS, RetryPolicy
from disco.client.errors import (
    ClientClosed,
    DataLoss,
    DeadlineExceeded,
    DiscoError,
    InsecureTokenWarning,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from disco.client.types import Code, CodeInfo, Factors, FactorValue, Images

__all__ = [
    "Client", "AsyncClient", "inspect", "TLS", "RetryPolicy",
    "Code", "CodeInfo", "Factors", "FactorValue", "Images",
    "DiscoError", "InvalidArgument", "DataLoss", "NotFound", "Unauthenticated", "ResourceExhausted",
    "Unavailable", "DeadlineExceeded", "ServerError", "ClientClosed", "InsecureTokenWarning",
]
