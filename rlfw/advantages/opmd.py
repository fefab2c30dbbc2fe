"""opmd: OPMD as off-policy regularised REINFORCE ("Group-Relative REINFORCE is secretly an off-policy algorithm",
arXiv 2509.24203, https://arxiv.org/abs/2509.24203; Trinity-RFT's REP form of Kimi's OPMD).

    A_i  = r_i - mean_g r                 no std; a group of one gets 0; NaN rewards excluded, their rows 0
    loss += tau * sum_tokens (log pi - log pi_old)^2 / (policy tokens)          per micro-batch

log pi_old is what the batch was sampled with (TRL's old_per_token_logps; on-policy, TRL uses the detached log pi
itself), so the term and its gradient are 0 at the first iteration on fresh data; it pulls the policy back towards
the sampling policy once it has moved (num_iterations > 1, or generation batches split over several steps).
Tokens: policy tokens only (tool tokens and keep=False rows are out of the mask). The trainer scales the term for
gradient accumulation like TRL's own terms.
"""

from __future__ import annotations

import torch

from rlfw import ops
from rlfw.advantages.base import AdvantageBatch, AdvantageOutput, BaseEstimator, LossInputs


def mean_centered(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """r - group mean, 0 for NaN rewards and for groups of one valid reward. (N,) -> (N,)"""
    index, num_groups = ops.group_index(group_ids)
    centered = rewards - ops.group_mean(rewards, index, num_groups)[index]  # (N,)
    single = ops.group_count(rewards, index, num_groups)[index] < 2
    return torch.where(single | torch.isnan(centered), torch.zeros_like(centered), centered)


class OPMD(BaseEstimator):
    name = "opmd"

    def __init__(self, tau: float = 0.1):
        self.tau = self._non_negative("tau", tau, "weight of the squared log-ratio term; default 0.1")

    def __call__(self, batch: AdvantageBatch) -> AdvantageOutput:
        adv = mean_centered(batch.rewards, batch.group_ids)  # (N,)
        return AdvantageOutput(adv, metrics={"abs_mean": adv.abs().mean().item()})

    def loss(self, inputs: LossInputs) -> torch.Tensor:
        """tau * token mean of (log pi - log pi_old)^2 over the micro-batch's policy tokens."""
        # Trinity-RFT REP "k2" regulariser: Kimi's 1/2 is absorbed into tau.
        squared = (inputs.logps - inputs.old_logps.detach()) ** 2  # (B, T)
        return self.tau * ops.masked_mean(squared, inputs.mask)
