"""matchtir: MatchTIR's dual-level advantage (arXiv 2601.10712, https://arxiv.org/abs/2601.10712).

Turn rewards r_{i,t} come from the environment: rlfw.rewards.matched_turn_rewards scores each turn's tool calls
against the ground-truth calls by bipartite matching, and the final answer turn by the outcome (e.g. F1).

    S_i          = sum_t r_{i,t}
    A_traj_i     = (S_i - mu_g) / (sigma_g + 1e-6)                 sample std; a group of one: mu 0, sigma 1
    G_{i,t}      = r_{i,t} + lam * G_{i,t+1}
    A_turn[i, t] = (G_{i,t} - mu_{g,t}) / (sigma_{g,t} + 1e-6)     over the group's rollouts that have turn t
    A[i, t]      = 0.5 * (A_traj_i + A_turn[i, t])                                             output (N, K)

A turn index only one rollout of its group reaches gets A_turn = 0 (the reference uses the raw return there, a
jump in scale). Turns without a reward of their own (NaN) count 0. NaN outcome rewards: the row gets 0 and enters
no statistic.
"""

from __future__ import annotations

import torch

from rlfw import ops
from rlfw.advantages.base import AdvantageBatch, AdvantageOutput, BaseEstimator

EPS = 1e-6


class MatchTIR(BaseEstimator):
    name = "matchtir"
    requires = frozenset({"turn_rewards", "num_turns"})

    def __init__(self, lam: float = 0.9):
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam={lam!r} must be in [0, 1] (discount of later turn rewards; default 0.9)")
        self.lam = float(lam)

    def __call__(self, batch: AdvantageBatch) -> AdvantageOutput:
        r = batch.rewards
        turn_rewards = ops.required(batch.turn_rewards, "turn_rewards", self.name)
        num_turns = ops.required(batch.num_turns, "num_turns", self.name)
        n, k = turn_rewards.shape
        scored = ~torch.isnan(r)  # (N,)
        valid = ops.turn_valid_mask(num_turns, k) & scored[:, None]  # (N, K)
        own = torch.where(valid, torch.nan_to_num(turn_rewards, nan=0.0), torch.zeros_like(turn_rewards))  # (N, K)
        index, num_groups = ops.group_index(batch.group_ids)
        # MatchTIR reference code: the trajectory score sums all turn rewards (not the outcome alone).
        total = torch.where(scored, own.sum(1), torch.full_like(r, torch.nan))  # (N,)
        a_traj = ops.group_zscore_keep_singletons(total, index, num_groups, eps=EPS)  # (N,)
        returns = ops.returns_to_go(own, valid, self.lam)  # (N, K)
        # MatchTIR: turn returns are compared across the group's rollouts at the same turn index.
        pool = index[:, None] * k + torch.arange(k, device=r.device)[None, :]  # (N, K) one pool per (group, turn)
        x = torch.where(valid, returns, torch.full_like(returns, torch.nan)).flatten()
        a_turn = ops.group_zscore(x, pool.flatten(), num_groups * k, ddof=1, eps=EPS).view(n, k)  # one rollout: 0
        adv = torch.where(valid, 0.5 * (a_traj[:, None] + a_turn), torch.zeros_like(returns))  # (N, K)
        mean_reward = own[valid].mean().item() if bool(valid.any()) else 0.0
        return AdvantageOutput(adv, metrics={"abs_mean": adv.abs().mean().item(), "turn_reward_mean": mean_reward})
