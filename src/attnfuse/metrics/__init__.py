"""Task metrics that torchmetrics does not have, as torchmetrics ``Metric`` s (epoch accumulation, DDP sync).

- :class:`ConcordanceIndex`: Harrell's C of predicted risks (survival), via
  :func:`attnfuse.losses.concordance_index` (equal to lifelines' ``concordance_index``).
- :class:`RecallAtK`: retrieval recall@k of embeddings, leave-one-out over the evaluated set.

Classification, regression and multilabel metrics come from torchmetrics directly.

Dense-vision metrics (``docs/metrics.md``): each a functional (per-image values) and a ``Metric`` (mean over
images, accumulated over batches):

- :mod:`attnfuse.metrics.image_fusion`: EN, SD, SF, AG, MI, SSIM, Qabf, VIF (+ fusion PSNR, SCD);
- :mod:`attnfuse.metrics.restoration`: PSNR, SSIM (RGB or Y, border crop);
- :mod:`attnfuse.metrics.segmentation`: Dice and HD95 per case and region, BraTS regions;
- :mod:`attnfuse.metrics.saliency`: MAE, F-measure (adaptive / max / mean), S-measure, E-measure.
"""

from attnfuse.metrics.image_fusion import (
    AverageGradient,
    Entropy,
    FusionMI,
    FusionSSIM,
    FusionVIF,
    Qabf,
    SpatialFrequency,
    StandardDeviation,
)
from attnfuse.metrics.restoration import PSNR, SSIM
from attnfuse.metrics.retrieval import RecallAtK, recall_at_k
from attnfuse.metrics.saliency import EMeasure, FMeasure, SaliencyMAE, SMeasure
from attnfuse.metrics.segmentation import HD95, Dice
from attnfuse.metrics.survival import ConcordanceIndex

__all__ = ["ConcordanceIndex", "RecallAtK", "recall_at_k"]
__all__ += [  # dense vision
    "HD95", "PSNR", "SSIM", "AverageGradient", "Dice", "EMeasure", "Entropy", "FMeasure", "FusionMI", "FusionSSIM",
    "FusionVIF", "Qabf", "SMeasure", "SaliencyMAE", "SpatialFrequency", "StandardDeviation",
]
