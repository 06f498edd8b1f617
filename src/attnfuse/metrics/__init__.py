"""Task metrics that torchmetrics does not have, as torchmetrics ``Metric`` s (epoch accumulation, DDP sync).

- :class:`ConcordanceIndex`: Harrell's C of predicted risks (survival), via
  :func:`attnfuse.losses.concordance_index` (equal to lifelines' ``concordance_index``).
- :class:`RecallAtK`: retrieval recall@k of embeddings, leave-one-out over the evaluated set.

Classification, regression and multilabel metrics come from torchmetrics directly.
"""

from attnfuse.metrics.retrieval import RecallAtK, recall_at_k
from attnfuse.metrics.survival import ConcordanceIndex

__all__ = ["ConcordanceIndex", "RecallAtK", "recall_at_k"]
