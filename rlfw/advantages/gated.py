"""gated: G-RA, Gated Reward Accumulation (arXiv 2508.10548, https://arxiv.org/abs/2508.10548).

Immediate (per-turn) rewards only count when the episode's outcome clears a threshold:

    R_i = r_i + 1[r_i >= threshold] * sum_t turn_rewards[i, t]        (NaN turn rewards skipped)
    A   = grpo(R)                                                     (grpo defaults; (N,))

threshold = -inf is direct accumulation (D-RA), the paper's comparison baseline. With mode="turn" the gated
turn rewards stay on their turns, the outcome is added to the last turn, returns-to-go with `gamma` are taken
and z-scored per group over all (rollout, turn) returns with pop std + 1e-6; output (N, K), 0 past each
rollout's last turn.
"""

from __future__ import annotations

import torch

from rlfw import ops
from rlfw.advantages.base import AdvantageBatch, AdvantageOutput, BaseEstimator
from rlfw.advantages.grpo import group_normalized

TURN_EPS = 1e-6


class Gated(BaseEstimator):
    name = "gated"

    def __init__(self, threshold: float = 1.0, mode: str = "trajectory", gamma: float = 1.0):
        self._check_choice("mode", mode, ("trajectory", "turn"))
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma={gamma!r} must be in [0, 1] (discount of later turns in mode='turn'; default 1)")
        self.threshold = float(threshold)  # float() also accepts "-inf" from YAML
        self.mode = mode
        self.gamma = float(gamma)
        self.requires = frozenset({"turn_rewards", "num_turns"} if mode == "turn" else {"turn_rewards"})

    def __call__(self, batch: AdvantageBatch) -> AdvantageOutput:
        r = batch.rewards
        turn_rewards = ops.required(batch.turn_rewards, "turn_rewards", self.name)
        # G-RA: the gate is the outcome itself; a NaN outcome compares False and stays NaN below.
        gate = (r >= self.threshold).to(r.dtype)  # (N,)
        if self.mode == "trajectory":
            total = r + gate * torch.nansum(turn_rewards, dim=1)  # (N,)
            adv = group_normalized(total, batch.group_ids)
        else:
            adv = self._turn_advantages(batch, turn_rewards, gate)
        return AdvantageOutput(
            adv,
            metrics={"abs_mean": adv.abs().mean().item(), "gate_open_frac": gate.mean().item()},
        )

    def _turn_advantages(self, batch: AdvantageBatch, turn_rewards: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        r = batch.rewards
        num_turns = ops.required(batch.num_turns, "num_turns", self.name)
        n, k = turn_rewards.shape
        valid = ops.turn_valid_mask(num_turns, k)  # (N, K)
        last = torch.nn.functional.one_hot((num_turns - 1).clamp(0, k - 1), k).to(r.dtype)  # (N, K)
        # G-RA, turn-level variant: gated immediate rewards on their turns, outcome on the last turn.
        per_turn = torch.nan_to_num(turn_rewards, nan=0.0) * gate[:, None] + last * torch.nan_to_num(r)[:, None]
        returns = ops.returns_to_go(per_turn, valid, self.gamma)  # (N, K)
        scored = valid & ~torch.isnan(r)[:, None]
        pooled = torch.where(scored, returns, torch.full_like(returns, torch.nan)).flatten()  # (N*K,)
        index, num_groups = ops.group_index(batch.group_ids)
        z = ops.group_zscore(pooled, index.repeat_interleave(k), num_groups, ddof=0, eps=TURN_EPS)
        return z.view(n, k)
