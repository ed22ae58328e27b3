"""Known answers that pin the metrics down: ground truth scores near 1, noise near 0, a duplicated or
mixed code loses MIG and DCI disentanglement. Small protocol sizes keep this quick."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from disco.export.evaluate import metrics as M  # noqa: E402
from disco.export.evaluate.naming import name_dims  # noqa: E402


class FactorsAsImages:
    """A ground-truth dataset whose "images" are the factor classes themselves, so that a representation
    can be any function of the true factors."""

    factor_names = ("shape", "scale", "orientation", "posX", "posY")
    factor_sizes = (3, 6, 40, 32, 32)

    def sample_factors(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.stack([rng.integers(0, k, n) for k in self.factor_sizes], axis=1)

    def images(self, factors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return factors.astype(np.float64)


DATA = FactorsAsImages()
NORM = np.array(DATA.factor_sizes, dtype=np.float64)
ROT = np.linalg.qr(np.random.default_rng(7).normal(size=(5, 5)))[0]


def truth(noise: float):  # noqa: ANN201
    noise_rng = np.random.default_rng(1)
    return lambda f: f / NORM + noise * noise_rng.normal(size=f.shape)


def pure_noise(f: np.ndarray) -> np.ndarray:
    return np.random.default_rng(int(f.sum()) % 2**31).normal(size=(len(f), 5))


def duplicated(f: np.ndarray) -> np.ndarray:
    return np.concatenate([f / NORM, f / NORM + 1e-3 * np.random.default_rng(2).normal(size=f.shape)], axis=1)


def mixed(f: np.ndarray) -> np.ndarray:
    return (f / NORM - 0.5) @ ROT


def scores(encode) -> dict[str, float]:  # noqa: ANN001
    rng = np.random.default_rng(0)
    mig_pts = M.sample(DATA, encode, 3000, rng)
    train, test = M.sample(DATA, encode, 1500, rng), M.sample(DATA, encode, 800, rng)
    d = M.dci(train, test)
    return {"mig": M.mig(*mig_pts)["mig"], "dci_d": d["disentanglement"], "dci_c": d["completeness"],
            "dci_i": d["informativeness"], "sap": M.sap(train, test)["sap"],
            "modularity": M.modularity_explicitness(train, test)["modularity"],
            "fvae": M.factor_vae_score(DATA, encode, rng, 300, 200, n_variance=2000)["factor_vae_score"],
            "bvae": M.beta_vae_score(DATA, encode, rng, 300, 200)["beta_vae_score"]}


def test_ground_truth_plus_small_noise_scores_near_one() -> None:
    s = scores(truth(1e-3))
    assert s["mig"] > 0.8  # 20 bins cannot hold all 32 or 40 values of the position and orientation factors
    assert s["dci_d"] > 0.9 and s["dci_c"] > 0.9 and s["dci_i"] > 0.8
    assert s["fvae"] > 0.95 and s["bvae"] > 0.95 and s["modularity"] > 0.9
    assert s["sap"] > 0.1  # a linear classifier on one dim cannot split 40 orientations: SAP stays well below 1


def test_random_noise_scores_near_zero() -> None:
    s = scores(pure_noise)
    assert s["mig"] < 0.05 and s["dci_d"] < 0.2 and s["sap"] < 0.05
    assert s["fvae"] < 0.45 and s["bvae"] < 0.45  # chance is 0.2


def test_duplicated_code_has_no_gap() -> None:
    s = scores(duplicated)
    assert s["mig"] < 0.1  # two dims carry each factor equally: no gap
    # (DCI completeness barely drops: boosted trees split on one of two equal features and ignore the other)


def test_mixed_code_is_not_disentangled() -> None:
    s = scores(mixed)
    assert s["mig"] < 0.3 and s["dci_d"] < 0.6
    assert s["dci_i"] > 0.3  # the information is still there, only mixed


def test_gaussian_tc_and_code_mi() -> None:
    rng = np.random.default_rng(0)
    independent = rng.normal(size=(5000, 4))
    correlated = independent @ np.array([[1, 0.9, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert M.gaussian_total_correlation(independent) < 0.01 < M.gaussian_total_correlation(correlated)
    assert M.code_mutual_information(independent) < M.code_mutual_information(correlated)


def test_names_follow_mutual_information() -> None:
    mi = np.array([[0.0, 0.0, 0.0, 3.0, 0.1], [1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.5, 0.0],
                   [0.01, 0.0, 0.0, 0.0, 0.0]])
    h = np.array([1.1, 1.8, 3.7, 3.47, 3.47])
    names = name_dims(mi, DATA.factor_names, h, active=[0, 1, 2, 3])
    assert names == {0: "posX", 1: "shape", 2: "posX_2", 3: "z3"}
