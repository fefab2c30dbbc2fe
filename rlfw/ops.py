"""Shared tensor math: group statistics, quantiles, turn accumulation.

Every estimator builds on these; none re-implements them. Shapes: N completions, K turns.
Groups are given by ``group_ids`` (N,) and need not be equal-sized or contiguous.
All statistics are NaN-aware: NaN entries are excluded from counts, sums and medians.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Dense group index (N,) in 0..num_groups-1 (sorted by id, i.e. batch order for non-decreasing ids)."""
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


def _sort_within_groups(x: Tensor, index: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Row order sorted by (group, value) with NaNs last inside each group; stable, hence deterministic.

    Returns (order (N,), start (num_groups,) first sorted position of each group, count (num_groups,) valid entries).
    """
    valid = ~torch.isnan(x)
    # Three stable passes (value, then NaN-last, then group) keep valid +inf values ahead of NaNs.
    order = torch.argsort(torch.where(valid, x, torch.zeros_like(x)), stable=True)
    order = order[torch.argsort((~valid[order]).to(torch.int8), stable=True)]
    order = order[torch.argsort(index[order], stable=True)]
    sizes = torch.zeros(num_groups, dtype=torch.long, device=x.device).index_add(0, index, torch.ones_like(index))
    start = torch.cumsum(sizes, 0) - sizes
    return order, start, group_count(x, index, num_groups).long()


def group_lower_median(x: Tensor, index: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Lower median of the valid entries per group and the first row index holding it.

    Returns (median (num_groups,), pivot (num_groups,) int64 row index into x; -1 for an all-NaN group).
    "Lower median" of n sorted values is the value at index (n-1)//2; the pivot is the first row
    (in batch order) whose value equals it, so ties resolve deterministically.
    """
    n = x.numel()
    rows = torch.arange(n, device=x.device)
    valid = ~torch.isnan(x)
    order, start, count = _sort_within_groups(x, index, num_groups)
    pos = start + ((count - 1).clamp(min=0)) // 2
    nan = torch.full((num_groups,), torch.nan, dtype=x.dtype, device=x.device)
    median = torch.where(count > 0, x[order[pos.clamp(max=n - 1)]], nan)
    # First row (lowest index) in each group with value == median.
    hit = valid & (x == median[index])
    big = torch.full((num_groups,), n, dtype=torch.long, device=x.device)
    pivot = big.scatter_reduce(0, index, torch.where(hit, rows, torch.full_like(rows, n)), "amin")
    pivot = torch.where(pivot == n, torch.full_like(pivot, -1), pivot)
    return median, pivot


def group_quantile(x: Tensor, index: Tensor, num_groups: int, q: float) -> Tensor:
    """NaN-aware q-quantile per group with linear interpolation (torch.quantile's default). (num_groups,)

    NaN for a group with no valid entry.
    """
    order, start, count = _sort_within_groups(x, index, num_groups)
    pos = q * (count - 1).clamp(min=0).to(x.dtype)  # (num_groups,) fractional sorted position
    lo, hi = pos.floor().long(), pos.ceil().long()
    last = max(x.numel() - 1, 0)
    below = x[order[(start + lo).clamp(max=last)]]
    above = x[order[(start + hi).clamp(max=last)]]
    out = torch.lerp(below, above, pos - lo.to(x.dtype))
    return torch.where(count > 0, out, torch.full_like(out, torch.nan))


def group_zscore(
    x: Tensor, index: Tensor, num_groups: int, ddof: int = 0, eps: float = 1e-6, var_eps: float = 0.0
) -> Tensor:
    """(x - mean_g) / (sqrt(var_g + var_eps) + eps) per group, NaN-aware. (N,) -> (N,)

    NaN entries, and every entry of a group whose valid entries are all equal (a singleton included),
    get exactly 0: float round-off in the mean must not turn into a 1/eps-sized signal.
    """
    mean = group_mean(x, index, num_groups)
    var = group_std(x, index, num_groups, ddof=ddof) ** 2
    z = (x - mean[index]) / ((var + var_eps).sqrt()[index] + eps)
    flat = group_all_equal(x, index, num_groups)[index]
    return torch.where(flat | torch.isnan(x), torch.zeros_like(z), z)


def subgroup_index(index: Tensor, key: Tensor) -> tuple[Tensor, int]:
    """Dense index (N,) of the (group, key) pairs, e.g. strata inside prompt groups, and their number."""
    key = key.to(index.dtype)
    if key.numel() == 0:
        return index.clone(), 0
    lo, hi = key.min(), key.max()
    # One integer per (group, key) pair: faster than torch.unique(dim=0) on stacked pairs.
    return group_index(index * (hi - lo + 1) + (key - lo))


def group_first_row(index: Tensor, num_groups: int) -> Tensor:
    """Batch row of each group's first completion. (num_groups,) int64"""
    rows = torch.arange(index.numel(), device=index.device)
    first = torch.full((num_groups,), index.numel(), dtype=torch.long, device=index.device)
    return first.scatter_reduce(0, index, rows, "amin")


def position_in_group(index: Tensor, num_groups: int) -> Tensor:
    """0-based position of each row among its group's rows, in batch order. (N,) int64"""
    order = torch.argsort(index, stable=True)
    sizes = torch.zeros(num_groups, dtype=torch.long, device=index.device).index_add(0, index, torch.ones_like(index))
    start = torch.cumsum(sizes, 0) - sizes
    pos = torch.empty_like(order)
    pos[order] = torch.arange(index.numel(), device=index.device) - start[index[order]]
    return pos


def nested_turn_mean(values: Tensor, mask: Tensor, turn_ids: Tensor) -> Tensor:
    """Mean over trajectories of (mean over the trajectory's turns of (mean of the turn's tokens)).

    values, mask, turn_ids (N, T); turn_ids is -1 on tokens of no turn. Only masked-in, finite tokens count;
    trajectories without any such token are left out. Differentiable in values; 0 when nothing counts.
    """
    ok = mask.bool() & (turn_ids >= 0) & torch.isfinite(values)
    v = torch.where(ok, values, torch.zeros_like(values))
    cols = turn_ids.clamp(min=0).long()
    num_turns = int(cols.max().item()) + 1 if cols.numel() else 1
    sums = v.new_zeros(v.shape[0], num_turns).scatter_add(1, cols, v)  # (N, K)
    counts = v.new_zeros(v.shape[0], num_turns).scatter_add(1, cols, ok.to(v.dtype))  # (N, K)
    has_turn = counts > 0
    turn_mean = sums / counts.clamp(min=1)
    traj_mean = (turn_mean * has_turn).sum(1) / has_turn.sum(1).clamp(min=1)  # (N,)
    has_traj = has_turn.any(1)
    return (traj_mean * has_traj).sum() / has_traj.sum().clamp(min=1)


def required(value: Tensor | None, field: str, estimator: str) -> Tensor:
    """The optional batch field an estimator needs, or a ValueError saying what must supply it."""
    if value is None:
        raise ValueError(
            f"advantage_estimator={estimator!r} needs AdvantageBatch.{field}, but the batch has none; "
            "use a rollout that reports it (multi-turn generation with an environment) or another estimator."
        )
    return value


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


def group_zscore_keep_singletons(x: Tensor, index: Tensor, num_groups: int, eps: float = 1e-6) -> Tensor:
    """(x - mean_g) / (sample std_g + eps); a group with one valid entry gets x / (1 + eps) (mean 0, std 1).

    The singleton rule is InfoPO's and MatchTIR's reference code. NaN entries and all-equal groups of two or more
    get 0 (as ``group_zscore``). (N,) -> (N,)
    """
    z = group_zscore(x, index, num_groups, ddof=1, eps=eps)
    single = group_count(x, index, num_groups)[index] == 1
    return torch.where(single & ~torch.isnan(x), x / (1.0 + eps), z)


def group_weighted_mean_std(x: Tensor, weight: Tensor, index: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Mean and sample std per group with frequency weights: entry j counts weight[j] times (0: not at all).

    Equal to the plain statistics of the expanded values (e.g. one copy per token of a turn) without expanding them;
    std is 0 for a group whose weights sum to 1 or less. Returns (mean, std), each (num_groups,).
    """
    w = weight.to(x.dtype)
    total = torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add(0, index, w)
    mean = torch.zeros_like(total).index_add(0, index, w * x) / total.clamp(min=1)
    squares = torch.zeros_like(total).index_add(0, index, w * (x - mean[index]) ** 2)
    std = torch.where(total > 1, squares / (total - 1).clamp(min=1), torch.zeros_like(total)).sqrt()
    return mean, std
