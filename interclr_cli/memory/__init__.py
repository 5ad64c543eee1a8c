"""InterCLR inter-image machinery: memory bank, online pseudo-labels, positive/negative sampling."""

from .bank import MemoryBank, last_occurrence
from .labels import OnlineLabels, two_means
from .sampling import NEG_MODES, THRESHOLDS, LabelIndex, Negatives, pool_threshold, sample_negatives, sample_positives

__all__ = [
    "MemoryBank",
    "last_occurrence",
    "OnlineLabels",
    "two_means",
    "NEG_MODES",
    "THRESHOLDS",
    "LabelIndex",
    "Negatives",
    "pool_threshold",
    "sample_negatives",
    "sample_positives",
]
