"""Harmony's per-cell arithmetic (pooled reference kernels): cosine normalization,
soft assignment, the objective's terms, the penalized R update, and the sums and
the correction of the ridge step. A site applies them to its own cells."""

from __future__ import annotations

import numpy as np


def cosine_normalize(Z: np.ndarray) -> np.ndarray:
    """Scale each row to unit L2 norm (rows of zeros stay zero).

    Parameters
    ----------
    Z : np.ndarray
        Embeddings (cells x d).

    Returns
    -------
    np.ndarray
        float64 copy with unit rows.
    """
    Z = np.asarray(Z, dtype=np.float64)
    norms = np.linalg.norm(Z, axis=1, keepdims=True)
    return np.divide(Z, norms, out=np.zeros_like(Z), where=norms > 0)


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def soft_assign(
    Z_corr: np.ndarray, centroids: np.ndarray, sigma: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Soft cluster assignments without diversity penalty (start of an iteration).

    Parameters
    ----------
    Z_corr : np.ndarray
        Current (corrected) embeddings (n x d); cosine-normalized here.
    centroids : np.ndarray
        Unit centroids ``Y`` (K x d).
    sigma : np.ndarray
        Per-cluster bandwidths (K,).

    Returns
    -------
    R : np.ndarray
        Assignments (n x K), rows summing to 1.
    dist : np.ndarray
        Distances ``2 (1 - cos)`` (n x K), kept by the site for the pass updates.
    """
    dist = 2.0 * (1.0 - cosine_normalize(Z_corr) @ np.asarray(centroids, dtype=np.float64).T)
    return _softmax_rows(-dist / sigma), dist


def batch_sums(R: np.ndarray, batches: np.ndarray, n_batches: int) -> np.ndarray:
    """``O[k, b] = sum over cells i of batch b of R[i, k]``.

    Parameters
    ----------
    R : np.ndarray
        Assignments (n x K).
    batches : np.ndarray
        Batch code per cell (n,).
    n_batches : int
        B.

    Returns
    -------
    np.ndarray
        float64 (K, B).
    """
    K = R.shape[1]
    # One bincount over (batch, cluster) pairs: no n x B indicator matrix.
    pairs = (batches[:, None] * K + np.arange(K)).ravel()
    sums = np.bincount(
        pairs, weights=np.asarray(R, dtype=np.float64).ravel(), minlength=n_batches * K
    )
    return sums.reshape(n_batches, K).T


def objective_terms(R: np.ndarray, dist: np.ndarray, sigma: np.ndarray) -> tuple[float, float]:
    """A site's share of Harmony's objective: k-means error and entropy terms.

    Parameters
    ----------
    R : np.ndarray
        Assignments (n x K).
    dist : np.ndarray
        Distances (n x K).
    sigma : np.ndarray
        Per-cluster bandwidths (K,).

    Returns
    -------
    error : float
        ``sum R * dist``.
    entropy : float
        ``sum sigma_k R log R`` (0 log 0 = 0).
    """
    safe = np.where(R > 0, R, 1.0)
    return float((R * dist).sum()), float((sigma * (R * np.log(safe))).sum())


def reassign_cells(
    dist: np.ndarray, batches: np.ndarray, log_diversity: np.ndarray, sigma: np.ndarray
) -> np.ndarray:
    """New assignments of a block's cells with the diversity penalty (O, E frozen).

    Parameters
    ----------
    dist : np.ndarray
        The cells' distances (m x K).
    batches : np.ndarray
        Their batch codes (m,).
    log_diversity : np.ndarray
        ``theta_b (log(2E + 1) - log(O + E + 1))`` (K x B), from the server.
    sigma : np.ndarray
        Per-cluster bandwidths (K,).

    Returns
    -------
    np.ndarray
        Assignments (m x K).
    """
    return _softmax_rows(-dist / sigma + log_diversity[:, batches].T)


def ridge_sums(
    Z_orig: np.ndarray, R: np.ndarray, batches: np.ndarray, n_batches: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per batch and cluster, the R-weighted sums of the original embeddings.

    Parameters
    ----------
    Z_orig : np.ndarray
        Uncorrected embeddings (n x d).
    R, batches, n_batches
        As in :func:`batch_sums`: assignments (n x K), batch codes (n,), B.

    Returns
    -------
    weighted : np.ndarray
        ``sum_{i in b} R_ik z_i``, float64 (B, K, d).
    mass : np.ndarray
        ``sum_{i in b} R_ik``, float64 (B, K).
    """
    K, d = R.shape[1], Z_orig.shape[1]
    weighted = np.zeros((n_batches, K, d))
    mass = np.zeros((n_batches, K))
    for b in np.unique(batches):
        cells = batches == b
        weighted[b] = R[cells].T @ Z_orig[cells]
        mass[b] = R[cells].sum(axis=0)
    return weighted, mass


def apply_correction(
    Z_orig: np.ndarray, R: np.ndarray, batches: np.ndarray, directions: np.ndarray
) -> np.ndarray:
    """``z_i - sum_k R_ik M[b_i, k]`` for every cell (the ridge correction).

    Parameters
    ----------
    Z_orig, R, batches
        As in :func:`ridge_sums`.
    directions : np.ndarray
        Per batch and cluster correction direction (B, K, d); zero where a
        cluster does not correct a batch.

    Returns
    -------
    np.ndarray
        Corrected embeddings (n x d).
    """
    corrected = np.array(Z_orig, dtype=np.float64, copy=True)
    for b in np.unique(batches):
        cells = batches == b
        corrected[cells] -= R[cells] @ directions[b]
    return corrected
