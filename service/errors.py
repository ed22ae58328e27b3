"""The errors of the serving core; the servicer maps each family to one gRPC status code.

    DiscoError
     +-- InvalidInput (ValueError)      -> INVALID_ARGUMENT   bad images, shapes, dtypes, qualities
     |    +-- InvalidCode               -> INVALID_ARGUMENT   malformed code: too short, unknown version
     |         +-- CorruptCode          -> DATA_LOSS          checksum mismatch: corrupted or wrong model
     +-- NotFound (LookupError)         -> NOT_FOUND          no such model or version
     +-- QueueFull                      -> RESOURCE_EXHAUSTED the batcher's bounded queue is full
     +-- DeadlineExceeded               -> DEADLINE_EXCEEDED  the deadline passed while queued, before compute
     +-- VersionUnavailable             -> UNAVAILABLE        a version the snapshot lists could not be loaded now
     +-- OutOfMemory (MemoryError)      -> RESOURCE_EXHAUSTED no memory to load a version a request asked for
"""
from __future__ import annotations


class DiscoError(Exception):
    """Base of every error the serving core raises on purpose."""


class InvalidInput(DiscoError, ValueError):
    """A request value is not what the model expects; the message names both."""


class InvalidCode(InvalidInput):
    """A code is malformed or belongs to no model this server has."""


class CorruptCode(InvalidCode):
    """A code's checksum does not match its contents under the model it names."""


class UnservedCode(InvalidCode):
    """A code whose model id no version served here has: corrupted, or made by a version this server has not
    loaded yet (another replica or process polled the repository first)."""


class UnservedChecksum(CorruptCode):
    """A code whose checksum matches none of the versions served here under its model id: corrupted, or made by
    one this server has not loaded yet."""


class NotFound(DiscoError, LookupError):
    """No model or version of that name."""


class QueueFull(DiscoError):
    """The batcher's queue holds as many images as it may; the message gives the numbers."""


class OutOfMemory(DiscoError, MemoryError):
    """The machine had no memory to load a version for a request: the machine's state, not the version's fault (it
    is not remembered against it), and a later try may succeed."""


class DeadlineExceeded(DiscoError):
    """A request's deadline passed while it waited in a queue; it was dropped before compute."""


class VersionUnavailable(DiscoError):
    """A version the served snapshot lists, not loaded yet, could not be loaded for a request: its files were
    removed or changed since they were verified (a reload will follow the repository), or its runtime failed."""


def shown(value: str, limit: int = 80) -> str:
    """A caller's string as an error message quotes it: repr, cut to `limit` characters (a name of megabytes would
    otherwise make the status details outgrow gRPC's metadata limit, and the caller would get another error)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


# How every refusal of a response too large for one message begins its reason: the client SDK reads it to learn
# the server's limits again (a hot reload may have brought larger images), and no other INVALID_ARGUMENT does.
OVER_MESSAGE_LIMIT = "over this server's message limit"


def response_too_large(size: int, limit: int, images: int = 0, fewer: str = "images per request") -> str:
    """Why a response built in full was not sent (PNG files, whose sizes are known only once encoded); with the
    number of images it held, about how many would fit."""
    why = f"the response came to {size} bytes, {OVER_MESSAGE_LIMIT} of {limit} bytes (--max-message-bytes)"
    if not images:
        return why
    fit = limit * images // size
    advice = f"ask for at most about {fit} {fewer}" if fit else "one image alone is over the limit"
    return f"{why}: {images} images of {size / images:.0f} bytes on average; {advice}"
