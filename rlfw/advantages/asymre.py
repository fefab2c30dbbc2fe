"""asymre: AsymRE, REINFORCE with a baseline lowered by beta ("Group-Relative REINFORCE is secretly an off-policy
algorithm", arXiv 2509.24203, https://arxiv.org/abs/2509.24203; Trinity-RFT's REP form of Meta's AsymRE).

    A_i = r_i - mean_g r + beta          no std; NaN rewards get 0; a group of one gets beta

The shift equals a forward-KL-style term -beta * log pi on the sampled tokens: every scored completion, including
those of all-equal groups, is pushed up by beta.
"""

from __future__ import annotations

import torch

from rlfw.advantages.base import AdvantageBatch, AdvantageOutput, BaseEstimator
from rlfw.advantages.opmd import mean_centered


class AsymRE(BaseEstimator):
    name = "asymre"

    def __init__(self, beta: float = 0.1):
        self.beta = self._non_negative("beta", beta, "how far the baseline is lowered; default 0.1")

    def __call__(self, batch: AdvantageBatch) -> AdvantageOutput:
        scored = ~torch.isnan(batch.rewards)  # (N,)
        # AsymRE: the baseline is the group mean minus beta (Trinity-RFT: baseline_shift -0.1).
        adv = mean_centered(batch.rewards, batch.group_ids) + self.beta * scored.to(batch.rewards.dtype)  # (N,)
        return AdvantageOutput(adv, metrics={"abs_mean": adv.abs().mean().item(),
                                             "scored_frac": scored.float().mean().item()})
