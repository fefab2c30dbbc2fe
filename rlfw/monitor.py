"""Run-health warnings: a run whose advantages are all zero trains nothing, and would otherwise say nothing.

``ZeroSignalMonitor`` counts generation batches in a row without a learning signal (every advantage zero, or no
row kept). With GRPO that is ``frac_reward_zero_std == 1``: every group's completions got the same reward. RLTrainer
logs the streak as ``advantages/zero_signal_streak``, warns once it reaches ``zero_signal_patience``, and warns again
at the end of a run in which no batch had a signal.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

HINT = ("Every group's completions got the same reward, so the policy-gradient term is zero. Make the reward able "
        "to differ within a group: completions cut at max_completion_length score alike (see "
        "rollout/truncated_frac; raise max_completion_length or max_turns), a reward that is always 0 needs a policy "
        "that sometimes succeeds (an SFT warm start, partial credit, an easier task), and larger num_generations "
        "makes differences likelier.")


class ZeroSignalMonitor:
    def __init__(self, patience: int, warn: bool = True):
        self.patience, self.warn = patience, warn  # warn: False on all but the main process
        self.streak = self.batches = self.zero_batches = 0

    def update(self, advantages: torch.Tensor, keep: torch.Tensor) -> int:
        """Record one generation batch ((N,) or (N, K) advantages, (N,) keep); returns the current streak."""
        kept = advantages[keep.bool()] if keep.numel() == advantages.size(0) else advantages
        zero = kept.numel() == 0 or bool((torch.nan_to_num(kept).abs() <= 1e-8).all())
        self.batches += 1
        self.zero_batches += zero
        self.streak = self.streak + 1 if zero else 0
        if self.warn and self.patience and self.streak == self.patience:
            logger.warning("No learning signal for %d generation batches in a row (advantages/zero_signal_streak). %s",
                           self.streak, HINT)
        return self.streak

    def finish(self) -> None:
        """Warn when no batch of the run had a signal: the saved policy is the one training started from."""
        if self.warn and self.batches and self.zero_batches == self.batches:
            logger.warning("No generation batch of this run had a learning signal (%d of %d had all advantages "
                           "zero): the policy-gradient updates were all zero, so the saved model is the starting "
                           "one (changed at most by weight decay or an estimator's loss term). %s",
                           self.zero_batches, self.batches, HINT)
