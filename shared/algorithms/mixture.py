"""Federated Gaussian mixture (EM) over embeddings that stay at their sites.

Spatial-domain methods on Visium data (STAGATE, GraphST, SEDR) cluster their embeddings
with mclust's EEE model: a Gaussian mixture whose components share one full covariance.
On the DLPFC layers this matters more than the encoder: on the same embeddings a
tied-covariance mixture scores far higher than k-means, because cortical layers are
elongated, correlated clouds rather than spheres.

EM needs only sums. In each iteration every site runs the E-step on its own cells with
the global parameters and returns, per component, the responsibility sum and the
responsibility-weighted feature sum, plus its log-likelihood; the covariance needs the
sites' feature second moments (per component for ``"full"``, pooled for ``"tied"``). The
server's M-step on the merged sums is scikit-learn's ``GaussianMixture`` M-step term for
term, so from the same initial parameters the federated fit follows pooled
``GaussianMixture.fit`` iteration by iteration (tests check parameters and labels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import linalg
from scipy.special import logsumexp

from fedspatial.shared.algorithms.arrays import float64_arrays, scalar

CovarianceType = Literal["tied", "full"]
COVARIANCE_TYPES: tuple[str, ...] = ("tied", "full")
_EPS10 = 10 * np.finfo(np.float64).eps  # scikit-learn's guard against empty components


def _check_type(covariance_type: str) -> None:
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}")


@dataclass
class MixtureParams:
    """Global mixture parameters the server broadcasts.

    Attributes
    ----------
    weights
        ``(K,)`` mixing proportions, summing to 1.
    means
        ``(K, D)`` component means.
    covariances
        ``(D, D)`` for ``"tied"``, ``(K, D, D)`` for ``"full"``.
    covariance_type
        ``"tied"`` (mclust EEE) or ``"full"`` (mclust VVV).
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    covariance_type: str = "tied"

    def __post_init__(self) -> None:
        _check_type(self.covariance_type)
        self.weights = np.asarray(self.weights, dtype=np.float64)
        self.means = np.asarray(self.means, dtype=np.float64)
        self.covariances = np.asarray(self.covariances, dtype=np.float64)
        k, d = self.means.shape
        want = (d, d) if self.covariance_type == "tied" else (k, d, d)
        if self.weights.shape != (k,) or self.covariances.shape != want:
            raise ValueError(
                f"inconsistent mixture shapes: weights {self.weights.shape}, means "
                f"{self.means.shape}, covariances {self.covariances.shape} (want {want})"
            )

    @property
    def n_components(self) -> int:
        return int(self.means.shape[0])

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights, "means": self.means, "covariances": self.covariances}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], covariance_type: str) -> MixtureParams:
        return cls(arrays["weights"], arrays["means"], arrays["covariances"], covariance_type)

    def _precision_cholesky(self) -> np.ndarray:
        covs = self.covariances[None] if self.covariance_type == "tied" else self.covariances
        out = np.empty_like(covs)
        for k, cov in enumerate(covs):
            try:
                chol = linalg.cholesky(cov, lower=True)
            except linalg.LinAlgError:
                raise FloatingPointError(
                    "a mixture covariance is not positive definite: raise "
                    "clustering.reg-covar or lower the number of domains"
                ) from None
            out[k] = linalg.solve_triangular(chol, np.eye(len(cov)), lower=True).T
        return out

    def weighted_log_prob(self, X: np.ndarray) -> np.ndarray:
        """``log(weight_k) + log N(x | mean_k, cov_k)`` for every row, ``(N, K)``."""
        X = np.asarray(X, dtype=np.float64)
        prec = self._precision_cholesky()
        n, d = X.shape
        out = np.empty((n, self.n_components))
        for k, mu in enumerate(self.means):
            p = prec[0] if self.covariance_type == "tied" else prec[k]
            y = X @ p - mu @ p
            out[:, k] = -0.5 * (d * math.log(2 * math.pi) + np.sum(y * y, axis=1)) + np.sum(np.log(np.diag(p)))
        return out + np.log(self.weights)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Posterior probability of each component, ``(N, K)``."""
        wlp = self.weighted_log_prob(X)
        return np.exp(wlp - logsumexp(wlp, axis=1, keepdims=True))


@dataclass
class MixtureStats:
    """One site's sufficient statistics for an M-step (no cell-level values).

    Attributes
    ----------
    resp_sum
        ``(K,)`` sum of responsibilities per component.
    weighted_sum
        ``(K, D)`` responsibility-weighted feature sums.
    second_moment
        ``(D, D)`` sum of ``x x^T`` over cells (tied) or ``(K, D, D)``
        responsibility-weighted per component (full).
    log_likelihood
        Sum over cells of ``log p(x)`` under the parameters used for the E-step
        (0 for the initial hard assignment).
    n_cells
        Number of cells.
    """

    resp_sum: np.ndarray
    weighted_sum: np.ndarray
    second_moment: np.ndarray
    log_likelihood: float
    n_cells: float

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "resp_sum": self.resp_sum,
            "weighted_sum": self.weighted_sum,
            "second_moment": self.second_moment,
            "log_likelihood": np.array([self.log_likelihood]),
            "n_cells": np.array([self.n_cells]),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> MixtureStats:
        resp_sum, weighted_sum, second_moment = float64_arrays(
            arrays, ("resp_sum", "weighted_sum", "second_moment")
        )
        return cls(
            resp_sum,
            weighted_sum,
            second_moment,
            scalar(arrays, "log_likelihood"),
            scalar(arrays, "n_cells"),
        )


def _stats(X: np.ndarray, resp: np.ndarray, log_likelihood: float, covariance_type: str) -> MixtureStats:
    if covariance_type == "tied":
        second = X.T @ X
    else:
        second = np.einsum("nk,nd,ne->kde", resp, X, X, optimize=True)
    return MixtureStats(resp.sum(axis=0), resp.T @ X, second, log_likelihood, float(len(X)))


def site_mixture_stats(
    X: np.ndarray,
    params: MixtureParams | None = None,
    *,
    labels: np.ndarray | None = None,
    n_components: int | None = None,
    covariance_type: str = "tied",
) -> MixtureStats:
    """Site: E-step statistics of its cells.

    Pass ``params`` for an EM iteration, or ``labels`` (hard assignments, e.g. from
    federated k-means) with ``n_components`` for the initial M-step, as scikit-learn
    initializes from k-means labels.
    """
    _check_type(covariance_type)
    X = np.asarray(X, dtype=np.float64)
    if params is not None:
        wlp = params.weighted_log_prob(X)
        norm = logsumexp(wlp, axis=1)
        resp = np.exp(wlp - norm[:, None])
        return _stats(X, resp, float(norm.sum()), params.covariance_type)
    if labels is None or n_components is None:
        raise ValueError("pass params, or labels and n_components")
    resp = np.zeros((len(X), n_components))
    resp[np.arange(len(X)), np.asarray(labels, dtype=np.int64)] = 1.0
    return _stats(X, resp, 0.0, covariance_type)


def merge_mixture_stats(stats: Sequence[MixtureStats]) -> MixtureStats:
    """Server: sum the sites' statistics."""
    if not stats:
        raise ValueError("no site statistics to merge")
    return MixtureStats(
        sum((s.resp_sum for s in stats[1:]), stats[0].resp_sum.copy()),
        sum((s.weighted_sum for s in stats[1:]), stats[0].weighted_sum.copy()),
        sum((s.second_moment for s in stats[1:]), stats[0].second_moment.copy()),
        float(sum(s.log_likelihood for s in stats)),
        float(sum(s.n_cells for s in stats)),
    )


def m_step(merged: MixtureStats, *, covariance_type: str = "tied", reg_covar: float = 1e-6) -> MixtureParams:
    """Server: new parameters from merged statistics (scikit-learn's M-step)."""
    _check_type(covariance_type)
    nk = merged.resp_sum + _EPS10
    means = merged.weighted_sum / nk[:, None]
    d = means.shape[1]
    if covariance_type == "tied":
        cov = merged.second_moment - (nk * means.T) @ means
        cov /= nk.sum()
        cov.flat[:: d + 1] += reg_covar
    else:
        cov = merged.second_moment / nk[:, None, None] - np.einsum("kd,ke->kde", means, means)
        cov[:, np.arange(d), np.arange(d)] += reg_covar
    return MixtureParams(nk / nk.sum(), means, cov, covariance_type)


class FederatedGaussianMixture:
    """Server-side EM loop: :meth:`init` from hard-assignment statistics, then one
    :meth:`step` per round of site E-steps, until the mean log-likelihood changes by
    less than ``tol`` (scikit-learn's rule) or ``max_iter`` iterations.

    Parameters
    ----------
    covariance_type
        ``"tied"`` (default; mclust EEE, as STAGATE and GraphST use) or ``"full"``.
    max_iter
        EM iterations at most (default: 100).
    tol
        Convergence threshold on the change of the mean log-likelihood (default: 1e-3).
    reg_covar
        Added to covariance diagonals (default: 1e-6).
    """

    def __init__(
        self,
        *,
        covariance_type: str = "tied",
        max_iter: int = 100,
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
    ) -> None:
        _check_type(covariance_type)
        if max_iter < 1 or tol < 0 or reg_covar < 0:
            raise ValueError("need max_iter >= 1, tol >= 0 and reg_covar >= 0")
        self.covariance_type = covariance_type
        self.max_iter = max_iter
        self.tol = tol
        self.reg_covar = reg_covar
        self.params: MixtureParams | None = None
        self.lower_bound = -np.inf
        self.n_iter = 0
        self.converged = False

    def init(self, merged: MixtureStats) -> MixtureParams:
        self.params = m_step(merged, covariance_type=self.covariance_type, reg_covar=self.reg_covar)
        return self.params

    @property
    def done(self) -> bool:
        return self.converged or self.n_iter >= self.max_iter

    def step(self, merged: MixtureStats) -> MixtureParams:
        """One EM iteration from the sites' E-step statistics under :attr:`params`."""
        if self.params is None:
            raise RuntimeError("call init() before step()")
        previous = self.lower_bound
        self.lower_bound = merged.log_likelihood / merged.n_cells
        self.params = m_step(merged, covariance_type=self.covariance_type, reg_covar=self.reg_covar)
        self.n_iter += 1
        self.converged = abs(self.lower_bound - previous) < self.tol
        return self.params


def federated_gaussian_mixture(
    site_X: Sequence[np.ndarray],
    site_labels: Sequence[np.ndarray],
    n_components: int,
    *,
    covariance_type: str = "tied",
    max_iter: int = 100,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
) -> tuple[MixtureParams, FederatedGaussianMixture]:
    """In-process federated EM (what the Flower rounds do), for tests and local runs."""
    em = FederatedGaussianMixture(covariance_type=covariance_type, max_iter=max_iter, tol=tol, reg_covar=reg_covar)
    em.init(
        merge_mixture_stats(
            [
                site_mixture_stats(x, labels=lab, n_components=n_components, covariance_type=covariance_type)
                for x, lab in zip(site_X, site_labels, strict=True)
            ]
        )
    )
    while not em.done:
        assert em.params is not None
        em.step(merge_mixture_stats([site_mixture_stats(x, em.params) for x in site_X]))
    assert em.params is not None
    return em.params, em
