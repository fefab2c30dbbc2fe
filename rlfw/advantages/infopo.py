"""infopo: InfoPO, information-driven policy optimization for agents (arXiv 2603.00656,
https://arxiv.org/abs/2603.00656). A turn is worth what its environment feedback changes in the next action.

The trainer measures, per turn t followed by an environment message (rlfw.probes, current policy, no grad):

    info_gain[i, t] = mean_a [log pi(a | real history) - log pi(a | feedback replaced)]   a: turn t+1's action tokens

    v[i, t]     = info_gain[i, t] / turn_lengths[i, t]         on every policy token of turn t (0 where undefined)
    A_out_i     = (r_i - mu_g) / (sigma_g + 1e-6)              sample std; a group of one: mu 0, sigma 1
    A_int[i, t] = (v - mu_I) / (sigma_I + 1e-6)                over the group's non-zero token values (each turn
                                                               weighted by its tokens; one value: 0); 0 elsewhere
    rho         = min(1, max(s_out, 1) / s_int)                s = sample std over all policy tokens (+1e-6), batch
    gate_g      = sigmoid(-sigma_g / tau)                      opens when the group's outcomes say little
    A[i, t]     = A_out_i + beta * exp(-decay * step) * gate_g * rho * A_int[i, t]              output (N, K)

NaN rewards: the row gets 0 everywhere and enters no statistic. ``decay`` counts optimizer steps (the reference
counts epochs; the batch knows steps).
"""

from __future__ import annotations

import math

import torch

from rlfw import ops
from rlfw.advantages.base import AdvantageBatch, AdvantageOutput, BaseEstimator

EPS = 1e-6
BASELINE_STD = 1.0  # InfoPO reference code: the bound never lets the intrinsic term outgrow an outcome std of 1


class InfoPO(BaseEstimator):
    name = "infopo"
    requires = frozenset({"info_gain", "turn_lengths", "num_turns"})

    def __init__(self, beta: float = 0.5, tau: float = 0.5, decay: float = 0.0, token_weighted: bool = True):
        for option, value in (("beta", beta), ("decay", decay)):
            if not value >= 0:
                raise ValueError(f"{option}={value!r} must be >= 0 (defaults: beta 0.5, decay 0.0)")
        if not tau > 0:
            raise ValueError(f"tau={tau!r} must be > 0 (gate temperature; default 0.5)")
        self.beta, self.tau, self.decay = float(beta), float(tau), float(decay)
        self.token_weighted = bool(token_weighted)

    def __call__(self, batch: AdvantageBatch) -> AdvantageOutput:
        r = batch.rewards
        gain = ops.required(batch.info_gain, "info_gain", self.name)
        lengths = ops.required(batch.turn_lengths, "turn_lengths", self.name).long()
        num_turns = ops.required(batch.num_turns, "num_turns", self.name)
        n, k = gain.shape
        scored = ~torch.isnan(r)  # (N,)
        valid = ops.turn_valid_mask(num_turns, k) & scored[:, None]  # (N, K)
        lengths = torch.where(valid, lengths.clamp(min=0), torch.zeros_like(lengths))  # (N, K)
        # InfoPO: a turn's gain is spread evenly over its own tokens, so the turn's total is its gain.
        v = torch.where(valid & ~torch.isnan(gain) & (lengths > 0), gain / lengths.clamp(min=1), 0.0)  # (N, K)
        index, num_groups = ops.group_index(batch.group_ids)
        a_out = ops.group_zscore_keep_singletons(r, index, num_groups, eps=EPS)  # (N,)
        a_out = torch.where(scored, a_out, torch.zeros_like(a_out))
        a_int = self._intrinsic(v, lengths, index, num_groups)  # (N, K)
        rho = self._bound(a_out, a_int, lengths)
        sigma = ops.group_std(r, index, num_groups, ddof=1)
        sigma = torch.where(ops.group_count(r, index, num_groups) == 1, torch.ones_like(sigma), sigma)
        # InfoPO: the intrinsic term matters most where the outcomes do not discriminate (low spread).
        gate = torch.sigmoid(-sigma / self.tau)[index]  # (N,)
        weight = self.beta * math.exp(-self.decay * batch.step)
        adv = a_out[:, None] + weight * gate[:, None] * rho * a_int  # (N, K)
        adv = torch.where(valid, adv, torch.zeros_like(adv))
        return AdvantageOutput(adv, metrics={
            "abs_mean": adv.abs().mean().item(), "rho": float(rho), "gate_mean": gate[scored].mean().item()
            if bool(scored.any()) else 0.0, "info_gain_mean": gain[valid & ~torch.isnan(gain)].mean().item()
            if bool((valid & ~torch.isnan(gain)).any()) else 0.0})

    def _intrinsic(self, v: torch.Tensor, lengths: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
        """Group z-score of the non-zero token values; 0 elsewhere. (N, K)"""
        n, k = v.shape
        present = v != 0
        # InfoPO reference code: token-weighted statistics (a turn counts once per token); option: once per turn.
        weight = torch.where(present, lengths if self.token_weighted else torch.ones_like(lengths), 0)  # (N, K)
        mu, sigma = ops.group_weighted_mean_std(v.flatten(), weight.flatten(), index[:, None].expand(n, k).flatten(),
                                                num_groups)
        # A single value has sigma 0 (and v = mu): A_int 0, as the reference's sigma = 1 gives.
        return torch.where(present, (v - mu[index][:, None]) / (sigma[index][:, None] + EPS), torch.zeros_like(v))

    @staticmethod
    def _bound(a_out: torch.Tensor, a_int: torch.Tensor, lengths: torch.Tensor) -> float:
        """rho = min(1, max(s_out, 1) / s_int), sample stds over every policy token of the batch."""
        one_group = torch.zeros(a_int.numel(), dtype=torch.long, device=a_int.device)
        s_out = ops.group_weighted_mean_std(a_out, lengths.sum(1), one_group[: a_out.numel()], 1)[1] + EPS
        s_int = ops.group_weighted_mean_std(a_int.flatten(), lengths.flatten(), one_group, 1)[1] + EPS
        return min(1.0, max(float(s_out), BASELINE_STD) / float(s_int))
