"""A multiple-choice knapsack: one option per unit, least total cost within a byte budget, solved
exactly by dynamic programming over byte buckets; and the Pareto front of a group of units' joint
choices, so that a run of blocks can be one unit whose options are its own or its blocks'."""

from __future__ import annotations

import itertools
import math
from typing import Any

BUCKETS = 512
FRONT = 64  # the most joint choices a group keeps (evenly over its bytes)


def knapsack(
    items: list[list[tuple[int, float]]], capacity: int, buckets: int = BUCKETS
) -> tuple[list[int], float] | None:
    """One option per unit (bytes, cost) minimising total cost with total bytes <= capacity.
    Bytes are rounded up to capacity/buckets, so a returned choice always fits. None: nothing fits."""
    if capacity < 0:
        return None
    q = max(capacity, 1) / buckets
    inf = float("inf")
    dp = [0.0] * (buckets + 1)  # dp[j]: least cost of the units so far within j buckets
    back: list[list[int]] = []
    for opts in items:
        w = [math.ceil(b / q - 1e-9) for b, _ in opts]
        new, pick = [inf] * (buckets + 1), [-1] * (buckets + 1)
        for j in range(buckets + 1):
            for k, (wk, (_, c)) in enumerate(zip(w, opts, strict=True)):
                if wk <= j and dp[j - wk] + c < new[j]:
                    new[j], pick[j] = dp[j - wk] + c, k
        dp = new
        back.append(pick)
    if dp[buckets] == inf:
        return None
    choice, j = [], buckets
    for opts, pick in zip(reversed(items), reversed(back), strict=True):
        k = pick[j]
        choice.append(k)
        j -= math.ceil(opts[k][0] / q - 1e-9)
    return choice[::-1], dp[buckets]


def brute_force(items: list[list[tuple[int, float]]], capacity: int, buckets: int = BUCKETS) -> float | None:
    """The same problem by enumeration (tests check `knapsack` against it on small cases)."""
    q = max(capacity, 1) / buckets
    best = None
    for combo in itertools.product(*[range(len(o)) for o in items]):
        w = sum(math.ceil(items[u][k][0] / q - 1e-9) for u, k in enumerate(combo))
        c = sum(items[u][k][1] for u, k in enumerate(combo))
        if w <= buckets and (best is None or c < best):
            best = c
    return best


def pareto(groups: list[list[tuple[Any, int, float]]], keep: int = FRONT) -> list[tuple[list[Any], int, float]]:
    """Joint choices of several units, one option each ((what, bytes, cost) per option): those that
    no other choice beats on both bytes and cost, at most `keep` of them (the least and most
    bytes always among them). Returns (whats, bytes, cost) tuples by increasing bytes."""
    front: list[tuple[list[Any], int, float]] = [([], 0, 0.0)]
    for opts in groups:
        joint = sorted(((w + [what], b + ob, c + oc) for w, b, c in front for what, ob, oc in opts),
                       key=lambda e: (e[1], e[2]))  # fmt: skip
        front, best = [], math.inf
        for e in joint:
            if e[2] < best:
                front.append(e)
                best = e[2]
        if len(front) > keep:
            step = (len(front) - 1) / (keep - 1)
            front = [front[round(i * step)] for i in range(keep)]
    return front
