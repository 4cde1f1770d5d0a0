"""Evaluation metrics: re-ID ranking (CMC, mAP, mINP), k-reciprocal re-ranking, ID classification (P/R/F1).

Plain NumPy/PyTorch: no Ray, MLflow or storage here.
"""

from reid_core.metrics.classification import ClassificationResult, classification_metrics
from reid_core.metrics.rank import (
    DISTANCE_METRICS,
    RankResult,
    evaluate_distance_chunks,
    evaluate_distmat,
    evaluate_rank,
    evaluate_rank_reference,
    pairwise_distance,
)
from reid_core.metrics.reranking import evaluate_rank_reranked, k_reciprocal_distance_chunks, k_reciprocal_distmat

__all__ = [
    "DISTANCE_METRICS",
    "ClassificationResult",
    "RankResult",
    "classification_metrics",
    "evaluate_distance_chunks",
    "evaluate_distmat",
    "evaluate_rank",
    "evaluate_rank_reference",
    "evaluate_rank_reranked",
    "k_reciprocal_distance_chunks",
    "k_reciprocal_distmat",
    "pairwise_distance",
]
