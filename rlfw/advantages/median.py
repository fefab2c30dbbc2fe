"""median: MC-GRPO, Median-Centered GRPO (arXiv 2601.22582, https://arxiv.org/abs/2601.22582).

    m     = lower median of the group's rewards; pivot = first row with r_i == m (kept out of the loss)
    MAD   = lower median of |r_i - m| + mad_eps
    A_i   = (r_i - m) / MAD                         (scale="mad"; "std": sample std + 1e-4; "none": 1)
    A_i  *= n / k   for the k rows with |A_i| > 1e-6 (rescale_nonzero=True, as the reference code)

The group holds n = num_generations rollouts, n odd and >= 3: the paper's G = n - 1 carry the gradient and the
median rollout (the pivot) is dropped via keep[pivot] = False. Rows tied with the median keep advantage 0 but
stay in the loss. NaN rewards enter neither median nor scale and get 0.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from rlfw import ops
from rlfw.advantages.base import AdvantageBatch, AdvantageOutput, BaseEstimator

logger = logging.getLogger(__name__)

STD_EPS = 1e-4  # TRL's constant, for scale="std"
ZERO_ATOL = 1e-6  # the reference code's test for a zero advantage


class Median(BaseEstimator):
    name = "median"

    def __init__(self, scale: str = "mad", mad_eps: float = 1e-3, rescale_nonzero: bool = True):
        self._check_choice("scale", scale, ("mad", "std", "none"))
        if not mad_eps > 0:
            raise ValueError(f"mad_eps={mad_eps!r} must be > 0 (default 1e-3); it keeps MAD = 0 groups finite")
        self.scale = scale
        self.mad_eps = float(mad_eps)
        self.rescale_nonzero = bool(rescale_nonzero)
        self._warned_mad_zero = False

    def check_config(self, config: Any) -> None:
        self.validate_config(config.num_generations)

    def validate_config(self, num_generations: int) -> None:
        # MC-GRPO: an odd group makes the median an actual sample, the pivot.
        if num_generations < 3 or num_generations % 2 == 0:
            raise ValueError(
                f"advantage_estimator='median' needs an odd num_generations >= 3, got {num_generations}. "
                "num_generations counts all n rollouts including the pivot (the paper's G is n - 1): "
                f"use num_generations={max(3, num_generations + 1 - num_generations % 2)}."
            )

    def __call__(self, batch: AdvantageBatch) -> AdvantageOutput:
        r = batch.rewards
        index, num_groups = ops.group_index(batch.group_ids)
        # MC-GRPO: the median replaces the mean as baseline. Pivot = its first occurrence (the reference code's
        # torch.median tie choice varies by device).
        median, pivot = ops.group_lower_median(r, index, num_groups)  # (G,), (G,)
        centered = r - median[index]  # (N,)
        mad = ops.group_lower_median(centered.abs(), index, num_groups)[0]  # (G,)
        if self.scale == "mad":
            # MC-GRPO: MAD replaces the std; the reference code adds mad_eps to the MAD itself.
            scale = mad + self.mad_eps
        elif self.scale == "std":
            scale = ops.group_std(r, index, num_groups, ddof=1) + STD_EPS
        else:
            scale = torch.ones_like(mad)
        adv = torch.nan_to_num(centered / scale[index], nan=0.0)  # (N,)
        nonzero = adv.abs() > ZERO_ATOL
        if self.rescale_nonzero:
            # MC-GRPO reference code (not in the paper): zero rows do not dilute the others' gradient.
            count = ops.group_count(r, index, num_groups)
            k = torch.zeros_like(count).index_add(0, index, nonzero.to(r.dtype))
            factor = torch.where(k > 0, count / k.clamp(min=1), torch.ones_like(k))
            adv = torch.where(nonzero, adv * factor[index], adv)
        keep = torch.ones_like(r, dtype=torch.bool)  # (N,)
        keep[pivot[pivot >= 0]] = False
        return AdvantageOutput(adv, keep=keep, metrics=self._metrics(adv, mad, median, nonzero))

    def _metrics(self, adv, mad, median, nonzero) -> dict[str, float]:
        scored = ~torch.isnan(median)
        mad_zero = ((mad <= 0) & scored).sum().item() / max(int(scored.sum().item()), 1)
        if self.scale == "mad" and mad_zero > 0.5 and not self._warned_mad_zero:
            self._warned_mad_zero = True
            logger.warning(
                "median: MAD is 0 in %.0f%% of groups (typical for binary rewards), so advantages are divided by "
                "mad_eps=%g and reach ~1/mad_eps. Consider advantage_kwargs={'scale': 'std'}.",
                100 * mad_zero, self.mad_eps,
            )
        return {
            "abs_mean": adv.abs().mean().item(),
            "mad_zero_frac": float(mad_zero),
            "nonzero_frac": nonzero.float().mean().item(),
        }
