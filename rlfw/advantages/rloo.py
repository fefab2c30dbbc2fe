"""rloo: leave-one-out baseline (Ahmadian et al. 2024, arXiv 2402.14740).

    A_i = r_i - mean_{j in g, j != i} r_j        no scaling; a group of one gets 0; NaN rewards excluded.
"""

from __future__ import annotations

import torch

from rlfw import ops
from rlfw.advantages.base import AdvantageBatch, AdvantageOutput, BaseEstimator


class RLOO(BaseEstimator):
    name = "rloo"

    def __call__(self, batch: AdvantageBatch) -> AdvantageOutput:
        r = batch.rewards
        index, num_groups = ops.group_index(batch.group_ids)
        total = ops.group_sum(r, index, num_groups)[index]  # (N,)
        count = ops.group_count(r, index, num_groups)[index]  # (N,)
        others = (total - torch.nan_to_num(r)) / (count - 1).clamp(min=1)
        adv = torch.where((count > 1) & ~torch.isnan(r), r - others, torch.zeros_like(r))
        return AdvantageOutput(adv, metrics={"abs_mean": adv.abs().mean().item()})
