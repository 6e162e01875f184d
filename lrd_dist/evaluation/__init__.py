"""Ranking metrics under the sampled and the full-ranking protocols."""
