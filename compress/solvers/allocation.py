"""The choice of one candidate per layer under a size budget: a multiple-choice knapsack, solved exactly by
dynamic programming over sizes rounded up to a unit (so any solution of the rounded problem fits the budget)."""

from __future__ import annotations

import math

import numpy as np

MAX_CELLS = 1 << 17  # budget units of the table; the unit grows with the budget to keep it this small or smaller


def choose(costs: list[list[float]], sizes: list[list[int]], budget: int) -> tuple[list[int], int]:
    """For each layer `i` the index of one candidate such that the sizes sum to at most `budget` and the costs
    to the least possible, with each size rounded up to the unit returned (1 when the budget is small). Raises
    ValueError when even the smallest candidates exceed the budget."""
    smallest = sum(min(row) for row in sizes)
    if smallest > budget:
        raise ValueError(f"the smallest candidates take {smallest} against a budget of {budget}")
    unit = max(1, math.ceil(budget / MAX_CELLS))
    cells = budget // unit
    # best[c]: the least cost of the layers so far within c units; back[i][c]: the candidate layer i took there
    best = np.zeros(cells + 1)
    back = np.zeros((len(costs), cells + 1), dtype=np.int16)
    for i, (row_costs, row_sizes) in enumerate(zip(costs, sizes, strict=True)):
        new = np.full(cells + 1, np.inf)
        for j, (cost, size) in enumerate(zip(row_costs, row_sizes, strict=True)):
            units = -(-size // unit)
            if units > cells:
                continue
            shifted = np.full(cells + 1, np.inf)
            shifted[units:] = best[: cells + 1 - units] + cost
            better = shifted < new
            new[better] = shifted[better]
            back[i, better] = j
        best = new
    if not np.isfinite(best[cells]):
        raise ValueError(f"no choice fits {budget} once sizes are rounded up to units of {unit}")
    choice = [0] * len(costs)
    cell = cells
    for i in range(len(costs) - 1, -1, -1):
        j = int(back[i, cell])
        choice[i] = j
        cell -= -(-sizes[i][j] // unit)
    return choice, unit
