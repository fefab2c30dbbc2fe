"""grpo: group-relative advantages, exactly TRL 1.16's GRPOTrainer (DeepSeekMath, arXiv 2402.03300).

    A_i = (r_i - mean_g) / (std_g + 1e-4)     std = sample std (ddof 1), NaN-aware

Option ``scale``: "group" (default, TRL's scale_rewards="group"), "batch" (std over the whole batch, mean per
group, as TRL), "none" (Dr. GRPO, arXiv 2503.20783: no division). NaN rewards get 0; a group whose valid rewards
are all equal gets 0 everywhere.
"""

from __future__ import annotations

import torch

from rlfw import ops
from rlfw.advantages.base import AdvantageBatch, AdvantageOutput, BaseEstimator

STD_EPS = 1e-4  # TRL's constant


def group_normalized(rewards: torch.Tensor, group_ids: torch.Tensor, scale: str = "group") -> torch.Tensor:
    """The grpo formula on its own, reused by estimators that reshape rewards first. (N,) -> (N,)"""
    index, num_groups = ops.group_index(group_ids)
    mean = ops.group_mean(rewards, index, num_groups)[index]  # (N,)
    centered = rewards - mean
    if scale == "group":
        centered = centered / (ops.group_std(rewards, index, num_groups, ddof=1)[index] + STD_EPS)
    elif scale == "batch":
        valid = rewards[~torch.isnan(rewards)]
        std = valid.std(unbiased=True) if valid.numel() > 1 else rewards.new_zeros(())
        centered = centered / (std + STD_EPS)
    flat = ops.group_all_equal(rewards, index, num_groups)[index]
    return torch.where(flat | torch.isnan(centered), torch.zeros_like(centered), centered)


class GRPO(BaseEstimator):
    name = "grpo"

    def __init__(self, scale: str = "group"):
        self._check_choice("scale", scale, ("group", "batch", "none"))
        self.scale = scale

    def __call__(self, batch: AdvantageBatch) -> AdvantageOutput:
        adv = group_normalized(batch.rewards, batch.group_ids, self.scale)  # (N,)
        return AdvantageOutput(adv, metrics={"abs_mean": adv.abs().mean().item()})
