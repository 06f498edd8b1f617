"""Losses and metrics of the fusion papers, one file per family.

- :mod:`~attnfuse.losses.survival`: weighted Cox partial likelihood (Breslow / Efron), Harrell's C (BioFusionNet).
- :mod:`~attnfuse.losses.evidential`: expected CE under a Dirichlet, annealed KL, Dice (MEFN / TMC).
- :mod:`~attnfuse.losses.metric`: adaptive-margin triplet, VICReg variance / covariance (M2FNet).
- :mod:`~attnfuse.losses.contrastive`: InfoNCE, multi-target InfoNCE (ST-Align).
- :mod:`~attnfuse.losses.gmm`: GMM hard-assignment NLL and trajectory aggregation (Wayformer).
- :mod:`~attnfuse.losses.balance`: MoH load-balance loss.
- :mod:`~attnfuse.losses.classification`: focal loss (imbalanced classes).

Every loss validates its inputs, documents its shapes, names its paper, and is defined (never NaN)
on degenerate batches. Annealing coefficients are plain numbers passed in by the caller; no loss
reads a global step. The Dempster–Shafer algebra itself is in :mod:`attnfuse.ops.evidential`.
See ``docs/losses.md``.
"""

from attnfuse.losses.balance import moh_load_balance_loss, moh_load_balance_total, router_z_loss
from attnfuse.losses.classification import focal_loss
from attnfuse.losses.contrastive import ContrastiveTarget, info_nce, info_nce_logits, multi_target_info_nce, st_align_weights
from attnfuse.losses.evidential import (
    dirichlet_kl_uniform,
    evidential_ce,
    evidential_dice_loss,
    evidential_loss,
    kl_annealing_coefficient,
)
from attnfuse.losses.gmm import aggregate_trajectories, closest_mode, gmm_hard_assignment_nll, trajectory_distance
from attnfuse.losses.metric import (
    ADAPTIVE_MARGIN_BOUNDS,
    adaptive_margin,
    adaptive_margin_triplet_loss,
    cosine_similarity01,
    vicreg_covariance,
    vicreg_variance,
)
from attnfuse.losses.survival import class_balance_weights, concordance_index, cox_partial_likelihood

__all__ = [
    "ADAPTIVE_MARGIN_BOUNDS",
    "ContrastiveTarget",
    "adaptive_margin",
    "adaptive_margin_triplet_loss",
    "aggregate_trajectories",
    "class_balance_weights",
    "closest_mode",
    "concordance_index",
    "cosine_similarity01",
    "cox_partial_likelihood",
    "dirichlet_kl_uniform",
    "evidential_ce",
    "evidential_dice_loss",
    "evidential_loss",
    "focal_loss",
    "gmm_hard_assignment_nll",
    "info_nce",
    "info_nce_logits",
    "kl_annealing_coefficient",
    "moh_load_balance_loss",
    "moh_load_balance_total",
    "multi_target_info_nce",
    "router_z_loss",
    "st_align_weights",
    "trajectory_distance",
    "vicreg_covariance",
    "vicreg_variance",
]
