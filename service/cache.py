"""Decoded images by code, least recently used out first (`disco serve --decode-cache-mb`; off by default).

Triton caches responses keyed by a hash of the whole input tensor; a DisCo code is its own key, a few bytes.
The bytes of a single code determine its image: the keyed checksum binds them to one model version of the
snapshot, and decoding is deterministic. So a hit returns exactly what a decode would, and a corrupted code is
never a hit (its bytes differ, and it fails verification on the normal path). Batch containers are not cached.

Each pipeline (one repository snapshot) has its own cache: a hot reload starts empty, and while the old
snapshot drains both exist. Used from the event loop only, so no lock.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

import numpy as np

from disco.service.metrics import Metrics

E = TypeVar("E")
_OVERHEAD = 200  # bytes per entry beyond the arrays and the key: dict slot, tuple, array header (an estimate)


class DecodeCache(Generic[E]):
    """code bytes -> (probabilities (1, C, H, W), read-only; what decoded it), within max_bytes."""

    def __init__(self, max_bytes: int, metrics: Metrics | None = None) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[bytes, tuple[np.ndarray, E]] = OrderedDict()
        self._metrics = metrics  # lookups are counted here; the bytes gauge reads the serving snapshot's cache

    def __len__(self) -> int:
        return len(self._items)

    def lookup(self, codes: list[bytes]) -> list[tuple[np.ndarray, E] | None]:
        """Each code's entry, or None; the found ones become the most recently used."""
        found = [self._items.get(c) for c in codes]
        for c, f in zip(codes, found):
            if f is not None:
                self._items.move_to_end(c)
        if self._metrics is not None:  # counted once per request, not per code
            hits = sum(f is not None for f in found)
            m = self._metrics
            if hits:
                m.child(m.cache_lookups, "hit").inc(hits)
            if hits < len(codes):
                m.child(m.cache_lookups, "miss").inc(len(codes) - hits)
        return found

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def put(self, code: bytes, probs: np.ndarray, what: E) -> None:
        """Keep a copy of one image's row (a view would keep its whole batch alive)."""
        if code in self._items:
            return
        row = probs.copy()
        row.flags.writeable = False  # shared by every request that hits it
        size = row.nbytes + len(code) + _OVERHEAD
        if size > self.max_bytes:
            return
        self._items[code] = (row, what)
        self.bytes += size
        while self.bytes > self.max_bytes:
            old, (old_row, _) = self._items.popitem(last=False)
            self.bytes -= old_row.nbytes + len(old) + _OVERHEAD
