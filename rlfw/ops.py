"""Shared tensor math: group statistics, quantiles, turn accumulation.

Every estimator builds on these; none re-implements them. Shapes: N completions, K turns.
Groups are given by ``group_ids`` (N,) and need not be equal-sized or contiguous.
All statistics are NaN-aware: NaN entries are excluded from counts, sums and medians.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Dense group index (N,) in 0..num_groups-1 and num_groups, in first-appearance order."""
    uniq, inverse = torch.unique(group_ids, sorted=True, return_inverse=True)
    return inverse, int(uniq.numel())


def group_sum(x: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """Sum of the non-NaN entries of x per group. x (N,) -> (num_groups,)."""
    valid = ~torch.isnan(x)
    out = torch.zeros(num_groups, dtype=x.dtype, device=x.device)
    return out.index_add(0, index, torch.where(valid, x, torch.zeros_like(x)))


def group_count(x: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """Number of non-NaN entries of x per group. (num_groups,) float."""
    valid = (~torch.isnan(x)).to(x.dtype)
    return torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add(0, index, valid)


def group_mean(x: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """NaN-aware mean per group; NaN for a group with no valid entry. (num_groups,)"""
    return group_sum(x, index, num_groups) / group_count(x, index, num_groups)


def group_std(x: Tensor, index: Tensor, num_groups: int, ddof: int = 1) -> Tensor:
    """NaN-aware std per group, ddof 0 (pop) or 1 (sample); 0 for a group with <= ddof valid entries."""
    mean = group_mean(x, index, num_groups)
    count = group_count(x, index, num_groups)
    sq = (x - mean[index]) ** 2
    var = group_sum(sq, index, num_groups) / (count - ddof).clamp(min=1)
    var = torch.where(count > ddof, var, torch.zeros_like(var))
    return var.sqrt()


def group_all_equal(x: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """True for groups whose valid entries are all equal (or that have < 2 valid entries). (num_groups,) bool"""
    valid = ~torch.isnan(x)
    hi = torch.full((num_groups,), -torch.inf, dtype=x.dtype, device=x.device)
    lo = torch.full((num_groups,), torch.inf, dtype=x.dtype, device=x.device)
    hi = hi.scatter_reduce(0, index, torch.where(valid, x, torch.full_like(x, -torch.inf)), "amax")
    lo = lo.scatter_reduce(0, index, torch.where(valid, x, torch.full_like(x, torch.inf)), "amin")
    return ~(hi > lo)


def group_lower_median(x: Tensor, index: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Lower median of the valid entries per group and the first row index holding it.

    Returns (median (num_groups,), pivot (num_groups,) int64 row index into x; -1 for an all-NaN group).
    "Lower median" of n sorted values is the value at index (n-1)//2; the pivot is the first row
    (in batch order) whose value equals it, so ties resolve deterministically.
    """
    n = x.numel()
    rows = torch.arange(n, device=x.device)
    valid = ~torch.isnan(x)
    # Sort by (group, value) with NaNs last inside a group; a stable two-pass sort keeps it deterministic.
    key = torch.where(valid, x, torch.full_like(x, torch.inf))
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(index[order], stable=True)]
    count = group_count(x, index, num_groups).long()
    start = torch.zeros(num_groups, dtype=torch.long, device=x.device)
    sizes = torch.zeros(num_groups, dtype=torch.long, device=x.device).index_add(0, index, torch.ones_like(index))
    start[1:] = torch.cumsum(sizes, 0)[:-1]
    pos = start + ((count - 1).clamp(min=0)) // 2
    median = torch.where(count > 0, x[order[pos.clamp(max=n - 1)]], torch.full((num_groups,), torch.nan, dtype=x.dtype))
    # First row (lowest index) in each group with value == median.
    hit = valid & (x == median[index])
    big = torch.full((num_groups,), n, dtype=torch.long, device=x.device)
    pivot = big.scatter_reduce(0, index, torch.where(hit, rows, torch.full_like(rows, n)), "amin")
    pivot = torch.where(pivot == n, torch.full_like(pivot, -1), pivot)
    return median, pivot


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x where mask is true (0 where the mask is empty)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def returns_to_go(rewards: Tensor, valid: Tensor, gamma: float) -> Tensor:
    """Discounted returns over turns: G_t = r_t + gamma * G_{t+1}, summing only valid turns.

    rewards (N, K) with NaN where a turn has no reward of its own; valid (N, K) bool marks turns that exist.
    A turn without its own reward still gets the accumulated value from later turns. Non-existent turns get 0.
    """
    r = torch.nan_to_num(rewards, nan=0.0) * valid.to(rewards.dtype)
    out = torch.zeros_like(r)  # (N, K)
    acc = torch.zeros(r.shape[0], dtype=r.dtype, device=r.device)
    for t in range(r.shape[1] - 1, -1, -1):
        acc = r[:, t] + gamma * acc
        out[:, t] = acc
    return out * valid.to(r.dtype)


def turn_valid_mask(num_turns: Tensor, num_cols: int) -> Tensor:
    """(N, K) bool: True for turn columns t < num_turns[i]."""
    cols = torch.arange(num_cols, device=num_turns.device)
    return cols[None, :] < num_turns[:, None]
