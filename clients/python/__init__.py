"""DisCo client SDK: compress images into disentangled factor codes on a DisCo server, and back."""
from disco.client._client import Client, Code
from disco.client.errors import (
    DataLoss,
    DeadlineExceeded,
    DiscoError,
    InvalidArgument,
    NotFound,
    ServerError,
    Unavailable,
)

__all__ = ["Client", "Code", "DiscoError", "InvalidArgument", "DataLoss", "NotFound", "Unavailable",
           "DeadlineExceeded", "ServerError"]
