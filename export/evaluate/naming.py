"""Name each active latent dim after the ground-truth factor it carries (by normalised mutual information)."""
from __future__ import annotations

from typing import Any

import numpy as np


def name_dims(mi: np.ndarray, factor_names: tuple[str, ...], factor_entropy: np.ndarray, active: list[int],
              min_share: float = 0.1) -> dict[int, str]:
    """{dim: name} for active dims: the factor with the largest I(z_d; v_k) / H(v_k); a dim that carries
    less than `min_share` of any factor keeps its z<d> name; a second dim on the same factor gets `_2`."""
    names: dict[int, str] = {}
    used: dict[str, int] = {}
    share = mi / factor_entropy[None, :]
    for d in sorted(active, key=lambda d: -share[d].max()):  # the clearest dims claim their factor first
        k = int(np.argmax(share[d]))
        if share[d, k] < min_share:
            names[d] = f"z{d}"
            continue
        used[factor_names[k]] = used.get(factor_names[k], 0) + 1
        names[d] = factor_names[k] + ("" if used[factor_names[k]] == 1 else f"_{used[factor_names[k]]}")
    return names


def apply_names(meta: dict[str, Any], names: dict[int, str]) -> dict[str, Any]:
    """model.json with factors[].name set (value ranges stay those of the training data)."""
    meta = dict(meta)
    meta["factors"] = [{**f, "name": names.get(int(f["dim"]), f["name"])} for f in meta["factors"]]
    return meta
