"""stratified: Stratified GRPO, Stratified Advantage Normalization + blend (arXiv 2510.06214,
https://arxiv.org/abs/2510.06214).

Strata are formed inside each prompt group by a structural key (number of tool calls by default):

    A_SAN(i) = (r_i - mu_k) / (sigma_k + eps)      mean / pop std over i's stratum (a stratum of one gives 0)
    A_GN(i)  = (r_i - mu)   / (sigma   + eps)      mean / pop std over the whole group
    A(i)     = alpha * A_SAN(i) + (1 - alpha) * A_GN(i)

Defaults alpha = 0.5, eps = 1e-6. NaN rewards enter no statistic and get 0.
"""

from __future__ import annotations

import torch

from rlfw import ops
from rlfw.advantages.base import AdvantageBatch, AdvantageOutput, BaseEstimator

KEYS = ("num_tool_calls", "num_turns")


class Stratified(BaseEstimator):
    name = "stratified"

    def __init__(self, alpha: float = 0.5, eps: float = 1e-6, key: str = "num_tool_calls"):
        self._check_choice("key", key, KEYS)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha!r} must be in [0, 1] (1 = pure stratified normalization; default 0.5)")
        if not eps > 0:
            raise ValueError(f"eps={eps!r} must be > 0 (default 1e-6)")
        self.alpha = float(alpha)
        self.eps = float(eps)
        self.key = key
        self.requires = frozenset({key})

    def __call__(self, batch: AdvantageBatch) -> AdvantageOutput:
        r = batch.rewards
        strata_key = ops.required(getattr(batch, self.key), self.key, self.name)
        index, num_groups = ops.group_index(batch.group_ids)
        # Stratified GRPO: strata live inside one prompt's group (the paper's variance theorem is per prompt).
        strata, num_strata = ops.subgroup_index(index, strata_key)
        # Stratified GRPO: population std, so each stratum has exactly unit variance when eps = 0.
        a_san = ops.group_zscore(r, strata, num_strata, ddof=0, eps=self.eps)  # (N,)
        a_gn = ops.group_zscore(r, index, num_groups, ddof=0, eps=self.eps)  # (N,)
        # Stratified GRPO: the blend keeps the global signal that homogeneous strata would erase.
        adv = self.alpha * a_san + (1.0 - self.alpha) * a_gn  # (N,)
        valid = ~torch.isnan(r)
        stratum_size = ops.group_count(r, strata, num_strata)[strata]  # (N,)
        singleton = ((stratum_size == 1) & valid).sum().item() / max(int(valid.sum().item()), 1)
        return AdvantageOutput(
            adv,
            metrics={
                "abs_mean": adv.abs().mean().item(),
                "singleton_strata_frac": float(singleton),
                "strata_per_group": num_strata / max(num_groups, 1),
            },
        )
