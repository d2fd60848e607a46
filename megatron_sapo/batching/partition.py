"""Balanced partition of weighted items into k parts: the Karmarkar-Karp largest differencing method.

Used to give data-parallel ranks rows of equal computed work. Each item starts as a k-tuple of part sums (itself in
one part, nothing in the others); the two tuples with the largest spread (largest minus smallest part) are merged
by joining the largest part of one with the smallest of the other, the next largest with the next smallest, and so
on, until one tuple is left. Differencing puts large items against each other first and leaves the small ones to
even out the rest, better than greedy assignment ("each item to the lightest part", LPT): on [8, 7, 6, 5, 4] into 2
parts LPT gives 17 / 13, differencing 16 / 14 (the best is 15 / 15: neither is exact, the problem is NP-hard).

Guarantees: every item in exactly one part; deterministic (ties broken by the items' order, never by hash or
time), so the same weights give the same parts on every rank and on every resume. Cost: O(n k log k) for n
items; above GREEDY_ABOVE items x parts (thousands of rows over tens of ranks), where that takes up to seconds and the
many small items leave little to gain, the greedy assignment (O(n log n)) instead.
"""

from __future__ import annotations

import heapq

# items x parts above which the greedy assignment replaces differencing: on long-tailed rows costed with attention's
# term, 2048 rows over 64 ranks take differencing 0.48 s (largest part 1.3e-4 above the mean), greedy 0.002 s (8e-6);
# 8192 over 128: 2.1 s and 0.08 s, both within 2e-6. Differencing wins where each part gets few items.
GREEDY_ABOVE = 50_000


def balanced_partition(weights: list[float], parts: int) -> list[list[int]]:
    """Indices of `weights` split into `parts` lists of near-equal weight sums (Karmarkar-Karp); each list in
    increasing index order, the lists ordered by decreasing sum. Fewer items than parts leaves some lists empty."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if any(not w >= 0 for w in weights):  # (NaN too)
        raise ValueError(f"weights must be finite numbers >= 0, got {[w for w in weights if not w >= 0][:5]}")
    if not weights:
        return [[] for _ in range(parts)]
    if len(weights) * parts > GREEDY_ABOVE:
        return _greedy(weights, parts)
    # a state: (-spread, tie, [(sum, first item, items), ...] sorted by sum, largest first); `first` (the smallest
    # index, len(weights) for an empty part) breaks ties between equal sums
    none = len(weights)
    heap = []
    for index, weight in enumerate(weights):
        subsets = [(float(weight), index, [index])] + [(0.0, none, []) for _ in range(parts - 1)]
        heapq.heappush(heap, (-float(weight), index, subsets))
    tie = len(weights)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(sa + sb, min(fa, fb), _join(ia, ib)) for (sa, fa, ia), (sb, fb, ib) in zip(a, reversed(b))]
        merged.sort(key=lambda part: (-part[0], part[1]))
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tie, merged))
        tie += 1
    return [sorted(items) for _, _, items in heap[0][2]]


def _greedy(weights: list[float], parts: int) -> list[list[int]]:
    """Largest first, each to the lightest part (ties: the lowest part): for many items per part, where the last,
    smallest items even the parts out and differencing's O(n k log k) would cost seconds."""
    heap = [(0.0, part) for part in range(parts)]
    out: list[list[int]] = [[] for _ in range(parts)]
    for index in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        total, part = heapq.heappop(heap)
        out[part].append(index)
        heapq.heappush(heap, (total + weights[index], part))
    sums = [sum(weights[i] for i in items) for items in out]
    order = sorted(range(parts), key=lambda k: (-sums[k], min(out[k], default=len(weights))))
    return [sorted(out[k]) for k in order]


def _join(a: list[int], b: list[int]) -> list[int]:
    """The two item lists as one, the shorter appended to the longer in place (the states they came from are not
    used again), so that each item is copied O(log n) times over the whole partition."""
    if len(a) < len(b):
        a, b = b, a
    a.extend(b)
    return a
