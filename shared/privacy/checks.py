"""The ``privacy:`` section's checks, against each other and the settings they constrain
(the schema is in shared/config.py).

Under ``local-dp`` every statistic that leaves a site, or shapes the inputs of its DP-SGD,
must go through a mechanism charged to the site's ledger; settings whose releases have
no private version are refused here, before anything runs, with the key to change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedspatial.shared.graph.degree_bound import dp_degree_bound

if TYPE_CHECKING:
    from fedspatial.shared.config import ExperimentConfig

__all__ = ["privacy_checks"]


def privacy_checks(cfg: ExperimentConfig) -> list[tuple[bool, str]]:
    """``(ok, message)`` for the ``privacy:`` keys."""
    p, local = cfg.privacy, cfg.privacy.local_dp
    not_private = "releases statistics of the cells that no mechanism in the privacy ledger covers"
    return [
        (
            not (local and cfg.features.n_pcs),
            f"features.n-pcs: federated PCA {not_private}; set it to 0 when privacy.local-dp is on",
        ),
        (
            not local or cfg.training.proximal_mu == 0,
            "privacy.local-dp: needs training.proximal-mu 0 (Opacus privatizes per-sample gradients only)",
        ),
        (
            not local or cfg.clustering.mixture == "none",
            f"clustering.mixture: the federated mixture {not_private}; set it to 'none' when "
            "privacy.local-dp is on (the domains come from DP k-means)",
        ),
        (
            not local or cfg.clustering.harmony == "none",
            f"clustering.harmony: federated Harmony {not_private}; set it to 'none' when privacy.local-dp is on",
        ),
        (
            not local or cfg.clustering.n_init == 1,
            "clustering.n-init: every k-means start would be another noised release; set it to 1 when "
            "privacy.local-dp is on",
        ),
        (p.target_epsilon > 0, "privacy.target-epsilon: must be > 0"),
        (p.noise_multiplier >= 0, "privacy.noise-multiplier: must be >= 0 (0 = calibrate from target-epsilon)"),
        (0 < p.delta < 1, "privacy.delta: must be in (0, 1), typically below 1 / number of cells"),
        (p.max_grad_norm > 0, "privacy.max-grad-norm: must be > 0"),
        (p.budget_epsilon >= 0, "privacy.budget-epsilon: must be >= 0 (0 = target-epsilon)"),
        (p.max_degree >= 0, "privacy.max-degree: must be >= 0 (0 = the proven bound 6 x n-neighbors)"),
        (p.feature_stats_noise >= 0, "privacy.feature-stats-noise: must be >= 0 (0 = exact aggregates)"),
        (p.feature_clip > 0, "privacy.feature-clip: must be > 0"),
        (p.kmeans_iterations >= 1, "privacy.kmeans-iterations: must be >= 1"),
        (p.central_noise_multiplier > 0, "privacy.central-noise-multiplier: must be > 0"),
        (p.central_clipping_norm > 0, "privacy.central-clipping-norm: must be > 0"),
        (
            p.central_dp == "none" or cfg.model.batch == "none",
            "privacy.central-dp: needs model.batch 'none' (per-site decoder weights are summed, not averaged)",
        ),
        (
            not p.secagg or p.central_dp in ("none", "client-fixed"),
            "privacy.secagg: combine only with central-dp 'client-fixed' (the server never sees a "
            "single site's update, so it cannot clip it)",
        ),
        (
            not p.secagg or cfg.model.batch == "none",
            "privacy.secagg: needs model.batch 'none' (per-site decoder weights cannot be summed under masking)",
        ),
        *_degree_checks(cfg),
    ]


def _degree_checks(cfg: ExperimentConfig) -> list[tuple[bool, str]]:
    """Under local-dp with the graph encoder: the graph has a proven D, and max-degree is not below it."""
    p, g = cfg.privacy, cfg.neighbors
    if not (p.local_dp and cfg.model.encoder == "gat"):  # "auto" is the per-cell encoder under local-dp
        return []
    try:
        honest = dp_degree_bound(g.n_neighbors, g.graph)
    except ValueError as exc:
        return [(False, f"neighbors.n-neighbors / neighbors.graph: {exc}")]
    return [(
        p.max_degree == 0 or p.max_degree >= honest,
        f"privacy.max-degree: {p.max_degree} is below {honest}, the proven bound on how many other cells' "
        f"training samples one cell changes (6 x neighbors.n-neighbors = 6 x {g.n_neighbors}, plain "
        f"{g.graph} graph); set it to 0 (uses the bound) or a value >= {honest}, or lower "
        "neighbors.n-neighbors, or use model.encoder: cell (D = 0)",
    )]
