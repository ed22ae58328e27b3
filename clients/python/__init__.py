"""DisCo client SDK: compress images into disentangled factor codes on a DisCo server, and back.

    from disco.client import Client
    with Client("localhost:50051") as c:
        codes = c.compress(images)
        pixels = c.decompress(codes)

The names below are imported on first use (PEP 562): the `disco` command imports this package before anything
else, and `disco serve`, which needs none of the SDK, sets its SIGTERM handler 0.2 s sooner for it (README:
Deployment; a SIGTERM before that handler is lost when the server is a container's PID 1).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

    from disco.client import errors, types  # noqa: F401 (the public submodules, attributes of the package as before)

_MODULE = {  # each public name -> the module that defines it
    "Client": "_client", "AsyncClient": "_async_client", "inspect": "_inspect", "TLS": "_transport",
    "RetryPolicy": "_transport",
    **dict.fromkeys(["Code", "CodeInfo", "Factors", "FactorValue", "Images"], "types"),
    **dict.fromkeys(["DiscoError", "InvalidArgument", "DataLoss", "NotFound", "Unauthenticated", "ResourceExhausted",
                     "Unavailable", "DeadlineExceeded", "ServerError", "ClientClosed", "InsecureTokenWarning"], "errors"),
}
__all__ = [
    "Client", "AsyncClient", "inspect", "TLS", "RetryPolicy",
    "Code", "CodeInfo", "Factors", "FactorValue", "Images",
    "DiscoError", "InvalidArgument", "DataLoss", "NotFound", "Unauthenticated", "ResourceExhausted",
    "Unavailable", "DeadlineExceeded", "ServerError", "ClientClosed", "InsecureTokenWarning",
]


_SUBMODULES = {"errors", "types"}  # public: `import disco.client` made them attributes, and still does on first use


if not TYPE_CHECKING:  # else a type checker would take any name (a misspelt one too) as this function's Any
    def __getattr__(name: str) -> Any:
        if name in _SUBMODULES:
            return importlib.import_module(f"{__name__}.{name}")
        if name not in _MODULE:  # another submodule (from disco.client import cli) is then imported by the import
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")  # system
        value = getattr(importlib.import_module(f"{__name__}.{_MODULE[name]}"), name)
        globals()[name] = value  # looked up once
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})
