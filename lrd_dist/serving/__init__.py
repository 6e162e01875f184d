"""Serving a trained run: top-k recommendations, retrieve-then-rerank, item and user vectors."""
