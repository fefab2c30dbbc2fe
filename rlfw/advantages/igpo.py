"""igpo: IGPO, Information Gain-based Policy Optimization (arXiv 2510.14967, https://arxiv.org/abs/2510.14967).

The trainer probes the policy's likelihood of the ground-truth answer after each round: l_{i,t} =
answer_logprobs[i, t] (mean log-prob of the answer tokens after t completed rounds), p_{i,t} = exp(l_{i,t}).

    turn t = 1..T_i-1 (followed by a tool result):  x_{i,t} = p_{i,t} - p_{i,t-1}    (gain="prob_diff")
                                                     x_{i,t} = l_{i,t} - l_{i,t-1}    (gain="log_prob_diff")
    turn T_i:                                        x_{i,T_i} = r_i (outcome)
    r~ = (x - mu) / (sigma + 1e-6),  sigma = sqrt(pop var + 1e-8), per group pool ("joint": all values of the
         group; "separate": outcomes and IG values pooled apart); a pool of one value gives 0
    A_{i,T_i} = r~_{i,T_i};  A_{i,t} = r~_{i,t} + gamma * A_{i,t+1}                     output (N, K)

Truncated rollouts, and rollouts with a missing (NaN) probe in their turns, contribute only their outcome on
their last turn; earlier turns inherit it through the accumulation.
"""

from __future__ import annotations

import torch

from rlfw import ops
from rlfw.advantages.base import AdvantageBatch, AdvantageOutput, BaseEstimator

NORM_EPS = 1e-6
VAR_EPS = 1e-8
ZERO_GAIN = 1e-10  # reference code: an IG of exactly 0 is still a reward of its own


class IGPO(BaseEstimator):
    name = "igpo"
    requires = frozenset({"answer_logprobs", "num_turns", "truncated"})

    def __init__(self, gain: str = "prob_diff", norm: str = "joint", gamma: float = 1.0):
        self._check_choice("gain", gain, ("prob_diff", "log_prob_diff"))
        self._check_choice("norm", norm, ("joint", "separate"))
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma={gamma!r} must be in [0, 1] (discount of later turns; default 1)")
        self.gain, self.norm, self.gamma = gain, norm, float(gamma)

    def __call__(self, batch: AdvantageBatch) -> AdvantageOutput:
        r = batch.rewards
        logp = ops.required(batch.answer_logprobs, "answer_logprobs", self.name)
        num_turns = ops.required(batch.num_turns, "num_turns", self.name)
        truncated = ops.required(batch.truncated, "truncated", self.name).bool()
        n, k = logp.shape
        valid = ops.turn_valid_mask(num_turns, k)  # (N, K)
        scored = ~torch.isnan(r)  # (N,)
        gains, has_gain = self._gains(logp, num_turns, truncated)  # (N, K), (N, K)
        has_gain &= scored[:, None]
        is_last = valid & ~ops.turn_valid_mask(num_turns - 1, k)  # (N, K)
        outcome = torch.where(is_last & scored[:, None], r[:, None].expand(n, k), torch.nan)  # (N, K)
        # IGPO: every turn followed by a tool result is rewarded by its information gain; the last by the outcome.
        x = torch.where(has_gain, gains, outcome)  # (N, K) NaN = no reward of its own
        index, num_groups = ops.group_index(batch.group_ids)
        pool = index[:, None].expand(n, k)  # (N, K)
        if self.norm == "separate":
            # IGPO reference code v2 option: outcomes and IG values are normalised in pools of their own.
            pool = 2 * pool + has_gain.long()
        num_pools = 2 * num_groups if self.norm == "separate" else num_groups
        z = ops.group_zscore(x.flatten(), pool.flatten(), num_pools, ddof=0, eps=NORM_EPS, var_eps=VAR_EPS)
        z = torch.where(torch.isnan(x.flatten()), torch.nan, z).view(n, k)  # (N, K)
        # IGPO: turn advantage = own normalised reward + discounted advantage of the next turn.
        adv = ops.returns_to_go(z, valid & scored[:, None], self.gamma)  # (N, K)
        return AdvantageOutput(adv, metrics=self._metrics(adv, gains, has_gain, x, pool, num_pools))

    def _gains(self, logp: torch.Tensor, num_turns: torch.Tensor, truncated: torch.Tensor):
        """IG of turns 1..T_i-1 in columns 0..T_i-2, and where they apply. (N, K) each."""
        n, k = logp.shape
        level = logp.exp() if self.gain == "prob_diff" else logp
        gains = torch.full_like(logp, torch.nan)  # (N, K)
        gains[:, : k - 1] = level[:, 1:] - level[:, :-1]
        gains = torch.where(gains == 0, torch.full_like(gains, ZERO_GAIN), gains)
        tool_turn = ops.turn_valid_mask(num_turns - 1, k)  # (N, K) turns followed by a tool result
        # IGPO reference code: a rollout whose IG list is incomplete (truncated, or a failed probe) falls back
        # to its outcome alone.
        complete = ~torch.where(tool_turn, torch.isnan(gains), False).any(dim=1) & ~truncated  # (N,)
        return gains, tool_turn & complete[:, None]

    @staticmethod
    def _metrics(adv, gains, has_gain, x, pool, num_pools) -> dict[str, float]:
        present = ~torch.isnan(x)
        pool_size = torch.bincount(pool[present], minlength=num_pools)
        used = (pool_size > 0).sum().item()
        ig = gains[has_gain]
        return {
            "abs_mean": adv.abs().mean().item(),
            "ig_mean": ig.mean().item() if ig.numel() else 0.0,
            "ig_frac_positive": (ig > 0).float().mean().item() if ig.numel() else 0.0,
            # rollouts whose tool turns got an IG reward: 0 means every gain was discarded (all truncated, say)
            "gain_rollout_frac": has_gain.any(dim=1).float().mean().item(),
            "singleton_pool_frac": (pool_size == 1).sum().item() / max(used, 1),
        }
