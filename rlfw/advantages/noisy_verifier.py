"""noisy_verifier: policy-gradient corrections for a binary verifier with known error rates ("RL with verifiable
yet noisy rewards", arXiv 2510.00915, https://arxiv.org/abs/2510.00915).

The verifier reports R~ in {0, 1} for a true R* with rho_fp = P(R~=1 | R*=0) and rho_fn = P(R~=0 | R*=1):

    backward:  R^_i = (R~_i - rho_fp) / (1 - rho_fp - rho_fn)         E[R^ | R*] = R*  (unbiased surrogate reward)
               A_i  = R^_i - b_i,  b_i = mean of R^ over the scored completions of the *other* groups (0 if none)
    forward:   A_i  = R~_i - (1 - rho_fn)      E[A | R*] = (1 - rho_fp - rho_fn) (R* - 1): along the clean gradient

No per-group centring or scaling: both corrections are positive-affine maps of R~, which group normalisation
would cancel exactly (GRPO on R^ equals GRPO on R~). The baseline of backward comes from other prompts, so it is
independent of the completion it centres. Rewards must be 0 or 1 (NaN: unscorable, advantage 0).
"""

from __future__ import annotations

import torch

from rlfw import ops
from rlfw.advantages.base import AdvantageBatch, AdvantageOutput, BaseEstimator


class NoisyVerifier(BaseEstimator):
    name = "noisy_verifier"

    def __init__(self, rho_fp: float = 0.0, rho_fn: float = 0.0, mode: str = "backward"):
        self._check_choice("mode", mode, ("backward", "forward"))
        if not (0.0 <= rho_fp < 0.5 and 0.0 <= rho_fn < 0.5 and rho_fp + rho_fn < 1.0):
            raise ValueError(
                f"rho_fp={rho_fp!r}, rho_fn={rho_fn!r}: the verifier's error rates need 0 <= rho_fp, rho_fn < 0.5 and "
                "rho_fp + rho_fn < 1 (beyond that the verifier is no better than its negation and the correction "
                "flips sign). Set them to the measured false-positive and false-negative rates."
            )
        self.rho_fp, self.rho_fn, self.mode = float(rho_fp), float(rho_fn), mode

    def __call__(self, batch: AdvantageBatch) -> AdvantageOutput:
        r = batch.rewards
        scored = ~torch.isnan(r)  # (N,)
        self._check_binary(r, scored)
        index, num_groups = ops.group_index(batch.group_ids)
        metrics = {"all_equal_frac": ops.group_all_equal(r, index, num_groups).float().mean().item()}
        if self.mode == "forward":
            # Forward correction: weights w(1) = rho_fn, w(0) = rho_fn - 1, i.e. a constant baseline 1 - rho_fn.
            adv = r - (1.0 - self.rho_fn)  # (N,)
        else:
            # Backward correction: invert the noise channel, then a baseline that excludes the own group.
            corrected = (r - self.rho_fp) / (1.0 - self.rho_fp - self.rho_fn)  # (N,)
            own_sum = ops.group_sum(corrected, index, num_groups)[index]
            own_count = ops.group_count(corrected, index, num_groups)[index]
            total, count = torch.nansum(corrected), scored.sum()
            others = count - own_count
            baseline = torch.where(others > 0, (total - own_sum) / others.clamp(min=1), torch.zeros_like(r))
            adv = corrected - baseline
            metrics["corrected_mean"] = corrected[scored].mean().item() if bool(scored.any()) else 0.0
        adv = torch.where(scored, adv, torch.zeros_like(adv))
        metrics["abs_mean"] = adv.abs().mean().item()
        return AdvantageOutput(adv, metrics=metrics)

    def _check_binary(self, r: torch.Tensor, scored: torch.Tensor) -> None:
        bad = scored & (r != 0) & (r != 1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"advantage_estimator='noisy_verifier' needs binary rewards (0 or 1, NaN = unscorable), but completion "
                f"{i} of the batch has reward {r[i].item()!r}. Use a 0/1 verifier reward (e.g. exact_match) with "
                "weight 1, or threshold the reward first."
            )
