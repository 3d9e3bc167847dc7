"""Site side of federated Harmony over Flower messages (``query.harmony``).

Flower may route each message of a run to a different worker (simulation) or start a
new process per message (deployment), so the site's Harmony state (its
:class:`~fedspatial.shared.algorithms.harmony.HarmonySite`: uncorrected and corrected
embeddings, batch codes, soft assignments, the current pass) is saved to the node's
``context.state`` after every message and restored from it before the next one, under
the keys ``fedspatial-harmony-arrays`` (ArrayRecord) and ``fedspatial-harmony-config``
(ConfigRecord).

Message kinds (``config["harmony-kind"]``), in the order the server sends them
(:func:`fedspatial.server.harmony_rounds.federated_harmony_rounds`):

============  ==============================================  ==============================
kind          the server sends                                the site replies
============  ==============================================  ==============================
load          batch mode (``section``/``site``), global       ``n_cells`` (it keeps its
              batch names                                     embedding and batch codes)
init-propose  K, seed                                         local k-means of its
                                                              cosine-normalized cells
init-stats    centroids (and previous ones)                   cluster sums and counts
counts ...    the Harmony protocol (:mod:`shared.harmony`)    cluster-level sums
correct       last correction (``reassign`` false)            nothing
store         number of domains, seed                         k-means proposal of the
                                                              corrected embedding
============  ==============================================  ==============================

``store`` replaces the site's embedding (``context.state["fedspatial-embedding"]["z"]``,
which clustering and ``finalize`` read) by the corrected one and keeps the uncorrected
one next to it (``"z-uncorrected"``, for ``obsm["X_fedspatial_uncorrected"]``); a new
``query.embed`` writes a fresh record without it. The Harmony state is then dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from flwr.app import ConfigRecord, Context

from fedspatial.client.payload import arrays_record, config_number, record_arrays
from fedspatial.client.site_runtime import EMBEDDING_KEY
from fedspatial.shared.algorithms import kmeans as clustering
from fedspatial.shared.algorithms.harmony import COUNTS, HarmonySite, cosine_normalize

logger = logging.getLogger(__name__)

HARMONY_PREFIX = "fedspatial-harmony"
UNCORRECTED = "z-uncorrected"
"""Key of the uncorrected embedding in the embedding record, once Harmony has run."""
KIND_KEY = "harmony-kind"
SCALAR_PREFIX = "harmony-arg-"
"""Config prefix of a request's scalar arguments (``n_batches``, ``block``, ``reassign``)."""
LOAD, INIT_PROPOSE, INIT_STATS, STORE = "load", "init-propose", "init-stats", "store"
BATCH_MODES = ("section", "site")

# HarmonySite attributes saved as arrays; the rest of its state is n_batches (config).
_ARRAYS = ("Z_orig", "batches", "corrected", "_sigma", "_R", "_dist", "_pass_cells", "_pass_starts")


class _Section(Protocol):
    @property
    def site(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def adata(self) -> Any: ...


class HarmonyDataSite(Protocol):
    """What :func:`harmony_reply` needs of a site (``SiteRuntime`` has it): its sections
    in the order of its embedding's rows."""

    @property
    def sections(self) -> Sequence[_Section]: ...


# ------------------------------------------------------------------- state round trip
def save_harmony_site(context: Context, site: HarmonySite, *, prefix: str = HARMONY_PREFIX) -> None:
    """Keep ``site`` in ``context.state`` (``<prefix>-arrays`` and ``<prefix>-config``)."""
    context.state[f"{prefix}-arrays"] = arrays_record({name.lstrip("_"): getattr(site, name) for name in _ARRAYS})
    context.state[f"{prefix}-config"] = ConfigRecord({"n-batches": int(site._n_batches)})


def has_harmony_site(context: Context, *, prefix: str = HARMONY_PREFIX) -> bool:
    return f"{prefix}-arrays" in context.state and f"{prefix}-config" in context.state


def load_harmony_site(context: Context, *, prefix: str = HARMONY_PREFIX) -> HarmonySite:
    """The :class:`HarmonySite` :func:`save_harmony_site` kept, as it was."""
    if not has_harmony_site(context, prefix=prefix):
        raise RuntimeError(
            "no federated Harmony state at this site: the server must start with the "
            f"{LOAD!r} step (the node may have restarted mid-run)"
        )
    arrays = record_arrays(context.state.array_records[f"{prefix}-arrays"])
    site = HarmonySite(arrays["Z_orig"], arrays["batches"])
    for name in _ARRAYS:
        setattr(site, name, np.array(arrays[name.lstrip("_")], copy=True))
    site._n_batches = int(context.state.config_records[f"{prefix}-config"]["n-batches"])  # type: ignore[arg-type]
    return site


def clear_harmony_site(context: Context, *, prefix: str = HARMONY_PREFIX) -> None:
    for suffix in ("arrays", "config"):
        if f"{prefix}-{suffix}" in context.state:
            del context.state[f"{prefix}-{suffix}"]


# ------------------------------------------------------------------- embeddings
def uncorrected_embedding(context: Context) -> np.ndarray | None:
    """The embedding before Harmony (None when Harmony has not replaced it)."""
    if EMBEDDING_KEY not in context.state:
        return None
    record = context.state.array_records[EMBEDDING_KEY]
    return record[UNCORRECTED].numpy() if UNCORRECTED in record else None


def _original_embedding(context: Context) -> np.ndarray:
    """The model's embedding: the uncorrected one when Harmony already ran (a repeated
    run starts over instead of correcting twice)."""
    if EMBEDDING_KEY not in context.state:
        raise RuntimeError("no embedding at this site: the server must send query.embed before Harmony")
    before = uncorrected_embedding(context)
    z = before if before is not None else context.state.array_records[EMBEDDING_KEY]["z"].numpy()
    return np.asarray(z, dtype=np.float64)


def cell_batches(sections: Iterable[_Section], mode: str, batch_names: Sequence[str]) -> np.ndarray:
    """Global batch code of every cell, sections concatenated in order.

    Parameters
    ----------
    sections : Iterable
        The site's sections (``site``, ``key`` = ``site/section``, ``adata``), in the
        order of the embedding's rows.
    mode : str
        ``section`` (a batch per section) or ``site`` (a batch per site).
    batch_names : Sequence[str]
        The federation's batch names (sorted section keys or site names), from the server.

    Returns
    -------
    np.ndarray
        int64 code per cell (index into ``batch_names``).
    """
    if mode not in BATCH_MODES:
        raise ValueError(f"Harmony batch must be one of {BATCH_MODES}, got {mode!r}")
    codes = {name: i for i, name in enumerate(batch_names)}
    parts = []
    for section in sections:
        name = section.key if mode == "section" else section.site
        if name not in codes:
            raise ValueError(f"batch {name!r} of this site is not among the federation's batches {list(batch_names)}")
        parts.append(np.full(int(section.adata.n_obs), codes[name], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# ------------------------------------------------------------------- one message
def request_from_message(
    kind: str, arrays: Mapping[str, np.ndarray], config: ConfigRecord | Mapping[str, Any]
) -> dict[str, Any]:
    """The :meth:`HarmonySite.handle` request: arrays plus the scalar arguments."""
    request: dict[str, Any] = {"kind": kind, **arrays}
    for key, value in config.items():
        if key.startswith(SCALAR_PREFIX):
            request[key[len(SCALAR_PREFIX):]] = value
    return request


def harmony_reply(
    site: HarmonyDataSite,
    context: Context,
    kind: str,
    payload_arrays: Mapping[str, np.ndarray],
    payload_config: ConfigRecord | Mapping[str, Any],
) -> dict[str, np.ndarray]:
    """Answer one ``query.harmony`` message with sums over this site's cells.

    Parameters
    ----------
    site : HarmonyDataSite
        The site's data (``SiteRuntime``): its sections, in the embedding's row order.
    context : Context
        The node's context; the embedding and the Harmony state live in its ``state``.
    kind : str
        ``load``, ``init-propose``, ``init-stats``, a Harmony request kind, or ``store``.
    payload_arrays : Mapping[str, np.ndarray]
        The message's arrays.
    payload_config : ConfigRecord or Mapping[str, Any]
        The message's config (``harmony-*`` entries are read).

    Returns
    -------
    dict[str, np.ndarray]
        The reply's arrays: cluster-level aggregates only.
    """
    if kind == LOAD:
        z = _original_embedding(context)
        mode = str(payload_config.get("harmony-batch", ""))
        names = [str(b) for b in payload_config.get("harmony-batches", [])]  # type: ignore[union-attr]
        batches = cell_batches(site.sections, mode, names)
        if batches.size != z.shape[0]:
            raise RuntimeError(f"the embedding has {z.shape[0]} rows but the sections {batches.size} cells")
        save_harmony_site(context, HarmonySite(z, batches))
        return {"n_cells": np.asarray(z.shape[0], dtype=np.int64)}
    if kind == INIT_PROPOSE:
        normalized = cosine_normalize(load_harmony_site(context).Z_orig)
        k = int(config_number(payload_config, "harmony-n-clusters"))
        seed = int(config_number(payload_config, "harmony-seed", 0))
        centroids, counts = clustering.local_kmeans(normalized, k, seed=seed)
        return {"centroids": centroids, "counts": counts}
    if kind == INIT_STATS:
        normalized = cosine_normalize(load_harmony_site(context).Z_orig)
        stats = clustering.cluster_stats(
            normalized, payload_arrays["centroids"], previous_centroids=payload_arrays.get("previous")
        )
        return stats.to_arrays()
    if kind == STORE:
        return _store(site, context, payload_config)
    harmony = load_harmony_site(context)
    if kind == COUNTS and harmony.n_cells == 0:
        raise RuntimeError("this site holds no cells for federated Harmony")
    reply = harmony.handle(request_from_message(kind, payload_arrays, payload_config))
    save_harmony_site(context, harmony)
    return reply


def _store(site: HarmonyDataSite, context: Context, config: ConfigRecord | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Make the corrected embedding the site's embedding (the uncorrected one kept
    beside it), drop the Harmony state and propose k-means centroids for the domains."""
    harmony = load_harmony_site(context)
    context.state[EMBEDDING_KEY] = arrays_record({"z": harmony.corrected, UNCORRECTED: harmony.Z_orig})
    clear_harmony_site(context)
    logger.info("federated Harmony: corrected embedding of %d cells stored", harmony.n_cells)
    n_domains = int(config_number(config, "harmony-n-domains", 0))
    if n_domains < 1:
        return {}
    # The same proposal as query.embed makes, now of the corrected embedding.
    z = harmony.corrected
    centroids, counts = clustering.local_kmeans(z, n_domains, seed=int(config_number(config, "harmony-seed", 0)))
    moments = clustering.feature_moments(z).to_arrays()
    return {"centroids": centroids, "counts": counts, **{f"moments-{k}": v for k, v in moments.items()}}
