"""The k best items of every row over a catalog scored in chunks, in bounded memory.

Scores arrive one chunk of item ids at a time ([B, chunk]); only the running top k of each row is
kept, so memory is [B, k + chunk] whatever the catalog size. Excluded (row, item) pairs (what the
user already has) never enter. Order: score descending, and among equal scores the smaller item id
first, so the output is the same however the catalog is chunked or the users are split over ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NO_ITEM = torch.iinfo(torch.long).max  # fills a row that has fewer than k candidates


def order_by_score(items: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k of each row by (score descending, item ascending): [B, C] -> [B, k]."""
    by_item = torch.argsort(items, dim=1, stable=True)
    items, scores = items.gather(1, by_item), scores.gather(1, by_item)
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return items.gather(1, by_score), scores.gather(1, by_score)


def first_k_in_id_order(
    items: torch.Tensor, scores: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Of a chunk whose item ids ascend along each row, the k best by (score descending, item
    ascending), in O(chunk): everything above the k-th best score, then the smallest ids tied
    with it. Returned in id order (``order_by_score`` sorts them)."""
    kth = scores.topk(k, dim=1).values[:, -1:]
    above = scores > kth
    tied = scores == kth
    needed = k - above.sum(1, keepdim=True)
    keep = above | (tied & (torch.cumsum(tied, dim=1) <= needed))
    rows, columns = keep.nonzero(as_tuple=True)  # k per row, in row-major (id) order
    return items[rows, columns].view(-1, k), scores[rows, columns].view(-1, k)


def top_k(
    score_items: Callable[[torch.Tensor], torch.Tensor],
    rows: int,
    num_items: int,
    k: int,
    excluded: tuple[torch.Tensor, torch.Tensor] | None = None,
    item_chunk: int = 4096,
    candidates: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k items 1..num_items (or of each row's ``candidates`` [B, C]) by ``score_items``.

    ``score_items(items)`` scores [B, c] item ids for the B rows. ``excluded``: (row, item) pairs
    left out. Returns (items [B, k], scores [B, k]); slots beyond a row's candidates hold
    ``NO_ITEM`` with score -inf.
    """
    best_items = torch.full((rows, k), NO_ITEM, dtype=torch.long)
    best_scores = torch.full((rows, k), float("-inf"))
    if excluded is not None:
        order = torch.argsort(excluded[1], stable=True)
        excluded_rows, excluded_items = excluded[0][order], excluded[1][order]
    width = num_items if candidates is None else candidates.shape[1]
    for start in range(0, width, item_chunk):
        stop = min(start + item_chunk, width)
        if candidates is None:
            items = torch.arange(start + 1, stop + 1).expand(rows, -1)
        else:
            items = candidates[:, start:stop]
        scores = score_items(items).float().cpu()
        if excluded is not None:
            scores = _exclude(scores, items, excluded_rows, excluded_items, candidates is None, start)
        scores = scores.masked_fill(items == 0, float("-inf"))  # padding of short candidate lists
        if candidates is None and items.shape[1] > k:
            items, scores = first_k_in_id_order(items, scores, k)
        merged_items = torch.cat([best_items, items.to(torch.long)], dim=1)
        merged_scores = torch.cat([best_scores, scores], dim=1)
        best_items, best_scores = order_by_score(merged_items, merged_scores, k)
    best_items = best_items.masked_fill(best_scores == float("-inf"), NO_ITEM)
    return best_items, best_scores


def _exclude(scores, items, excluded_rows, excluded_items, contiguous: bool, start: int) -> torch.Tensor:
    scores = scores.clone()
    if contiguous:  # the chunk is items start+1 .. start+c: index by offset
        lo, hi = torch.searchsorted(
            excluded_items, torch.tensor([start + 1, start + items.shape[1] + 1])
        ).tolist()
        scores[excluded_rows[lo:hi], excluded_items[lo:hi] - start - 1] = float("-inf")
        return scores
    # arbitrary candidate ids: membership of (row, item) keys
    largest = [int(t.max()) for t in (items, excluded_items) if t.numel()]
    span = max(largest, default=0) + 1
    keys = torch.sort(excluded_rows * span + excluded_items).values
    wanted = torch.arange(len(items))[:, None] * span + items
    found = torch.searchsorted(keys, wanted).clamp(max=max(len(keys) - 1, 0))
    hit = keys[found] == wanted if len(keys) else torch.zeros_like(wanted, dtype=torch.bool)
    return scores.masked_fill(hit, float("-inf"))
