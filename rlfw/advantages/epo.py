"""epo: EPO, Entropy-regularized Policy Optimization for multi-turn agents (arXiv 2509.22576,
https://arxiv.org/abs/2509.22576). Paper version (§4.1-4.2, Eqs. 2-6, Alg. 1), not the released code.

Advantages are grpo's. EPO adds a loss term on the per-token entropies H (with grad) of the policy tokens:

    L_H      = mean_traj mean_turn mean_token H                                   (nested mean)
    P        = [kappa_low * Hbar - H]_+ + [H - kappa_high * Hbar]_+             per token
    L_smooth = nested mean of alpha * P          (0 while there is no history)
    beta_k   = 1 + exp(-gamma * k / floor(K / 2))                               k = step, K = max_steps
    loss    += -lam * (L_H - beta_k * L_smooth)

Hbar is the cumulative mean of the per-step mean token entropies of all previous optimizer steps, kept as
estimator state (checkpointed): ``loss`` adds each micro-batch's detached entropy sums to a window, and
``on_optimizer_step`` folds the window, summed over processes, into the history. The trainer scales the term for
gradient accumulation.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlfw import ops
from rlfw.advantages.base import AdvantageBatch, AdvantageOutput, BaseEstimator, LossInputs, SumOverProcesses
from rlfw.advantages.grpo import group_normalized


class EPO(BaseEstimator):
    name = "epo"

    def __init__(
        self,
        lam: float = 1e-3,
        kappa_low: float = 0.0,
        kappa_high: float = 2.0,
        alpha: float = 0.1,
        gamma: float = 3.0,
    ):
        if not 0.0 <= kappa_low <= kappa_high:
            raise ValueError(
                f"need 0 <= kappa_low <= kappa_high, got kappa_low={kappa_low!r}, kappa_high={kappa_high!r} "
                "(the entropy corridor is [kappa_low, kappa_high] x history mean; defaults 0.0 and 2.0)"
            )
        for option, value in (("lam", lam), ("alpha", alpha), ("gamma", gamma)):
            if not value >= 0:
                raise ValueError(f"{option}={value!r} must be >= 0 (defaults: lam 1e-3, alpha 0.1, gamma 3.0)")
        self.lam, self.alpha, self.gamma = float(lam), float(alpha), float(gamma)
        self.kappa_low, self.kappa_high = float(kappa_low), float(kappa_high)
        self._entropy_sum = 0.0
        self._entropy_steps = 0
        self._window = torch.zeros(2, dtype=torch.float64)  # this step's (entropy sum, token count) so far

    def __call__(self, batch: AdvantageBatch) -> AdvantageOutput:
        adv = group_normalized(batch.rewards, batch.group_ids)  # (N,)
        metrics = {"abs_mean": adv.abs().mean().item()}
        if self.history_mean is not None:
            metrics["history_mean"] = self.history_mean
        return AdvantageOutput(adv, metrics=metrics)

    @property
    def history_mean(self) -> float | None:
        """Hbar: mean of the per-step mean token entropies so far; None before the first step."""
        return self._entropy_sum / self._entropy_steps if self._entropy_steps else None

    def beta(self, step: int, max_steps: int) -> float:
        # EPO §4: strongest smoothing early, decaying towards 1.
        return 1.0 + math.exp(-self.gamma * step / max(max_steps // 2, 1))

    def loss_term(
        self, entropies: torch.Tensor, mask: torch.Tensor, turn_ids: torch.Tensor, step: int, max_steps: int
    ) -> torch.Tensor:
        """-lam * (L_H - beta_k * L_smooth), a scalar differentiable in entropies (N_local, T)."""
        # EPO §4: trajectory-level entropy, averaged over turns rather than over all tokens.
        l_h = ops.nested_turn_mean(entropies, mask, turn_ids)
        hbar = self.history_mean
        if hbar is None:
            # EPO Alg. 1: no history at the first step, so no smoothing.
            return -self.lam * l_h
        # EPO §4: penalise token entropies outside the corridor around the historical mean.
        penalty = torch.relu(self.kappa_low * hbar - entropies) + torch.relu(entropies - self.kappa_high * hbar)
        l_smooth = ops.nested_turn_mean(self.alpha * penalty, mask, turn_ids)
        return -self.lam * (l_h - self.beta(step, max_steps) * l_smooth)

    def loss(self, inputs: LossInputs) -> torch.Tensor:
        """The EPO term of one micro-batch; its detached entropies join this step's window."""
        mask = inputs.mask
        self._window += torch.stack([(inputs.entropies.detach() * mask).sum(), mask.sum()]).double().cpu()
        return self.loss_term(inputs.entropies, mask, inputs.turn_ids, inputs.step, inputs.max_steps)

    def on_optimizer_step(self, sum_over_processes: SumOverProcesses) -> None:
        # EPO Alg. 1: the history holds the step's mean token entropy over the whole batch (all processes).
        window = sum_over_processes(self._window)
        self.update_history(float(window[0] / window[1].clamp(min=1)))
        self._window = torch.zeros(2, dtype=torch.float64)

    def update_history(self, mean_entropy: float) -> None:
        """Add one optimizer step's detached batch mean token entropy (non-finite values are skipped)."""
        value = float(mean_entropy)
        if math.isfinite(value):
            # EPO §5.4: cumulative mean over all previous steps, not a sliding window.
            self._entropy_sum += value
            self._entropy_steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"entropy_sum": self._entropy_sum, "entropy_steps": self._entropy_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._entropy_sum = float(state["entropy_sum"])
        self._entropy_steps = int(state["entropy_steps"])
