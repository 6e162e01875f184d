"""lrd_dist: distributed training of LLM-based relation-aware sequential recommenders (LRD)."""

__version__ = "0.1.0"
