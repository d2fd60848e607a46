"""Balanced partition of weighted items into k parts: the Karmarkar-Karp largest differencing method.

Used to give data-parallel ranks rows of equal computed work. Each item starts as a k-tuple of part sums (itself in
one part, nothing in the others); the two tuples with the largest spread (largest minus smallest part) are merged
by joining the largest part of one with the smallest of the other, the next largest with the next smallest, and so
on, until one tuple is left. Differencing puts large items against each other first and leaves the small ones to
even out the rest, better than greedy assignment ("each item to the lightest part", LPT): on [8, 7, 6, 5, 4] into 2
parts LPT gives 17 / 13, differencing 16 / 14 (the best is 15 / 15: neither is exact, the problem is NP-hard).

Guarantees: every item in exactly one part; deterministic (ties broken by the items' order, never by hash or
time), so the same weights give the same parts on every rank and on every resume. Cost: O(n k log n) for n items.
"""

from __future__ import annotations

import heapq


def balanced_partition(weights: list[float], parts: int) -> list[list[int]]:
    """Indices of `weights` split into `parts` lists of near-equal weight sums (Karmarkar-Karp); each list in
    increasing index order, the lists ordered by decreasing sum. Fewer items than parts leaves some lists empty."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if any(not w >= 0 for w in weights):  # (NaN too)
        raise ValueError(f"weights must be finite numbers >= 0, got {[w for w in weights if not w >= 0][:5]}")
    if not weights:
        return [[] for _ in range(parts)]
    # a state: (-spread, tie, [(sum, items), ...] sorted by sum, largest first)
    heap = []
    for index, weight in enumerate(weights):
        subsets = [(float(weight), [index])] + [(0.0, []) for _ in range(parts - 1)]
        heapq.heappush(heap, (-float(weight), index, subsets))
    tie = len(weights)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b))]
        merged.sort(key=lambda part: (-part[0], min(part[1], default=len(weights))))
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tie, merged))
        tie += 1
    return [sorted(items) for _, items in heap[0][2]]
