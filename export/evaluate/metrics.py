"""Disentanglement metrics with the protocols of disentanglement_lib (Locatello et al. 2019).

Every metric takes a representation function (images -> codes, numpy) and a ground-truth dataset
(`sample_factors`, `images`) and draws its own points from `rng`, as disentanglement_lib does, so the
numbers are comparable with the literature that uses that library. The codes are posterior means.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import mutual_info_score, roc_auc_score
from sklearn.preprocessing import MultiLabelBinarizer
from sklearn.svm import LinearSVC

Encode = Callable[[np.ndarray], np.ndarray]  # images (N, C, H, W) -> codes (N, D)


def sample(data: Any, encode: Encode, n: int, rng: np.random.Generator, batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """n points: codes (n, D) and factor classes (n, K)."""
    codes, factors = [], []
    for i in range(0, n, batch):
        f = data.sample_factors(min(batch, n - i), rng)
        codes.append(encode(data.images(f, rng)))
        factors.append(f)
    return np.concatenate(codes), np.concatenate(factors)


def discretize(codes: np.ndarray, bins: int = 20) -> np.ndarray:
    """Each code dim into `bins` equal-width bins over its range (np.histogram edges, np.digitize)."""
    out = np.zeros_like(codes, dtype=np.int64)
    for j in range(codes.shape[1]):
        edges = np.histogram(codes[:, j], bins)[1]
        out[:, j] = np.digitize(codes[:, j], edges[:-1])
    return out


def mutual_info_matrix(disc_codes: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """(D, K) discrete mutual information in nats (sklearn.metrics.mutual_info_score)."""
    return np.array([[mutual_info_score(factors[:, k], disc_codes[:, j]) for k in range(factors.shape[1])]
                     for j in range(disc_codes.shape[1])])


def mig(codes: np.ndarray, factors: np.ndarray, bins: int = 20) -> dict[str, Any]:
    """Mutual Information Gap (Chen et al. 2018). Protocol: 10,000 points, codes in 20 histogram bins,
    MIG = mean over factors k of (I(z_a; v_k) - I(z_b; v_k)) / H(v_k), a and b the two most informative dims."""
    m = mutual_info_matrix(discretize(codes, bins), factors)
    h = np.array([mutual_info_score(factors[:, k], factors[:, k]) for k in range(factors.shape[1])])
    top = np.sort(m, axis=0)[::-1]
    per_factor = (top[0] - top[1]) / h
    return {"mig": float(per_factor.mean()), "per_factor": per_factor.tolist(), "mi_matrix": m.tolist()}


def _entropy_rows(p: np.ndarray, base: int) -> np.ndarray:
    p = np.clip(p, 1e-11, 1.0)
    return -(p * np.log(p)).sum(axis=1) / np.log(base)


def dci(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], seed: int = 0) -> dict[str, Any]:
    """DCI (Eastwood & Williams 2018). Protocol: 10,000 train / 5,000 test points, one default
    GradientBoostingClassifier per factor; importance R = |feature_importances_|; disentanglement and
    completeness are 1 - entropy of R's rows (base K) and columns (base D), weighted by importance;
    informativeness is the mean test accuracy."""
    (x_tr, y_tr), (x_te, y_te) = train, test
    d, k = x_tr.shape[1], y_tr.shape[1]
    r = np.zeros((d, k))
    acc = []
    for j in range(k):
        clf = GradientBoostingClassifier(random_state=seed).fit(x_tr, y_tr[:, j])
        r[:, j] = np.abs(clf.feature_importances_)
        acc.append(float(np.mean(clf.predict(x_te) == y_te[:, j])))
    if not r.any():  # no feature helps any factor: disentanglement_lib scores a uniform matrix
        r = np.ones_like(r)
    total = r.sum()
    code_weight = r.sum(1) / total
    dis = float(((1 - _entropy_rows(r / np.maximum(r.sum(1, keepdims=True), 1e-11), k)) * code_weight).sum())
    comp = float(((1 - _entropy_rows((r / np.maximum(r.sum(0, keepdims=True), 1e-11)).T, d)) * (r.sum(0) / total)).sum())
    return {"disentanglement": dis, "completeness": comp, "informativeness": float(np.mean(acc)),
            "importance": r.tolist()}


def sap(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """SAP (Kumar et al. 2018). Protocol: 10,000 train / 5,000 test; for each code dim and factor a
    LinearSVC(C=0.01, class_weight="balanced") on that one dim; score = mean over factors of the gap between
    the two best dims' accuracy. A constant dim scores the majority-class accuracy, what any classifier of it does."""
    (x_tr, y_tr), (x_te, y_te) = train, test
    d, k = x_tr.shape[1], y_tr.shape[1]
    s = np.zeros((d, k))
    for i in range(d):
        for j in range(k):
            if np.var(x_tr[:, i]) > 0:
                clf = LinearSVC(C=0.01, class_weight="balanced").fit(x_tr[:, i : i + 1], y_tr[:, j])
                s[i, j] = np.mean(clf.predict(x_te[:, i : i + 1]) == y_te[:, j])
            else:
                s[i, j] = np.mean(y_te[:, j] == np.bincount(y_tr[:, j]).argmax())
    top = np.sort(s, axis=0)[::-1]
    return {"sap": float(np.mean(top[0] - top[1])), "score_matrix": s.tolist()}


def modularity_explicitness(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                            bins: int = 20) -> dict[str, Any]:
    """Modularity and explicitness (Ridgeway & Zemel 2018). Protocol: 10,000 train / 5,000 test;
    modularity from the 20-bin mutual information matrix (how close each dim is to one factor only);
    explicitness = mean one-vs-rest ROC AUC of a LogisticRegression per factor on the codes."""
    (x_tr, y_tr), (x_te, y_te) = train, test
    m = mutual_info_matrix(discretize(x_tr, bins), y_tr)
    k = m.shape[1]
    theta = m.max(1)
    template = np.zeros_like(m)
    template[np.arange(len(m)), m.argmax(1)] = theta
    delta = ((m - template) ** 2).sum(1) / np.maximum(theta**2 * (k - 1), 1e-12)
    per_dim = 1 - delta
    per_dim[theta == 0] = 0.0  # a dim that carries nothing is not modular (disentanglement_lib's rule)
    modularity = float(np.mean(per_dim))
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-8
    aucs = []
    for j in range(k):
        clf = LogisticRegression(max_iter=1000).fit((x_tr - mean) / std, y_tr[:, j])
        probs = clf.predict_proba((x_te - mean) / std)
        labels = MultiLabelBinarizer(classes=clf.classes_).fit_transform(y_te[:, j][:, None])
        present = labels.sum(0) > 0
        aucs.append(float(roc_auc_score(labels[:, present], probs[:, present], average="macro")))
    return {"modularity": modularity, "explicitness": float(np.mean(aucs))}


def factor_vae_score(data: Any, encode: Encode, rng: np.random.Generator, n_train: int = 10_000,
                     n_eval: int = 5_000, batch: int = 64, n_variance: int = 10_000) -> dict[str, Any]:
    """FactorVAE score (Kim & Mnih 2018). Protocol: global scale from 10,000 points; dims whose standard
    deviation is < 0.05 pruned (disentanglement_lib's prune_dims threshold is on the std, not the variance);
    each vote fixes one factor over 64 points and votes (argmin normalised variance, factor);
    majority-vote classifier from 10,000 votes, accuracy on 5,000 more."""
    codes, _ = sample(data, encode, n_variance, rng)
    scale = np.std(codes, axis=0)
    active = scale >= 0.05
    if not active.any():
        return {"factor_vae_score": 0.0, "active_dims": 0}
    k = len(data.factor_sizes)

    def votes(n: int) -> np.ndarray:
        out = np.zeros((codes.shape[1], k), dtype=np.int64)
        for _ in range(n):
            j = int(rng.integers(k))
            f = data.sample_factors(batch, rng)
            f[:, j] = f[0, j]
            z = encode(data.images(f, rng))[:, active] / scale[active]
            out[int(np.flatnonzero(active)[np.argmin(np.var(z, axis=0, ddof=1))]), j] += 1
        return out

    train = votes(n_train)
    vote_of = np.argmax(train, axis=1)
    ev = votes(n_eval)
    correct = ev[np.arange(ev.shape[0]), vote_of].sum()
    return {"factor_vae_score": float(correct / ev.sum()), "active_dims": int(active.sum())}


def beta_vae_score(data: Any, encode: Encode, rng: np.random.Generator, n_train: int = 10_000,
                   n_eval: int = 5_000, batch: int = 64) -> dict[str, Any]:
    """BetaVAE score (Higgins et al. 2017). Protocol: each point fixes one factor over 64 pairs and takes
    the mean |z1 - z2|; a LogisticRegression predicts the factor from 10,000 points; accuracy on 5,000."""
    k = len(data.factor_sizes)

    def points(n: int) -> tuple[np.ndarray, np.ndarray]:
        feats, labels = [], []
        for _ in range(n):
            j = int(rng.integers(k))
            f1, f2 = data.sample_factors(batch, rng), data.sample_factors(batch, rng)
            f2[:, j] = f1[:, j]
            z = encode(data.images(np.concatenate([f1, f2]), rng))
            feats.append(np.mean(np.abs(z[:batch] - z[batch:]), axis=0))
            labels.append(j)
        return np.array(feats), np.array(labels)

    x_tr, y_tr = points(n_train)
    x_ev, y_ev = points(n_eval)
    clf = LogisticRegression(max_iter=2000).fit(x_tr, y_tr)
    return {"beta_vae_score": float(np.mean(clf.predict(x_ev) == y_ev)), "train_accuracy": float(clf.score(x_tr, y_tr))}


def gaussian_total_correlation(codes: np.ndarray) -> float:
    """TC of a Gaussian with the codes' covariance: 0.5 (sum log diag(C) - log det C), in nats."""
    cov = np.cov(codes.T)
    return float(0.5 * (np.sum(np.log(np.diag(cov))) - np.linalg.slogdet(cov)[1]))


def code_mutual_information(codes: np.ndarray, bins: int = 20) -> float:
    """Mean pairwise mutual information (nats) between the 20-bin discretised code dims."""
    disc = discretize(codes, bins)
    d = disc.shape[1]
    mi = [mutual_info_score(disc[:, i], disc[:, j]) for i in range(d) for j in range(d) if i != j]
    return float(np.mean(mi)) if mi else 0.0
