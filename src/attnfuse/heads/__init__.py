"""Task heads over fused token sets."""

from attnfuse.heads.pooling import AttentionPool, Pool, first_token_pool, mean_pool
from attnfuse.heads.prediction import ClassificationHead, DirichletHead, EmbeddingHead, RegressionHead

__all__ = [
    "AttentionPool", "ClassificationHead", "DirichletHead", "EmbeddingHead", "Pool", "RegressionHead", "first_token_pool",
    "mean_pool",
]
