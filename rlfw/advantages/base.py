"""The estimator contract: AdvantageBatch in, AdvantageOutput out (see docs/estimators.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

Tensor = torch.Tensor

# Optional batch fields an estimator may declare in `requires`.
OPTIONAL_FIELDS = ("num_tool_calls", "num_turns", "truncated", "turn_rewards", "answer_logprobs")


@dataclass(frozen=True)
class AdvantageBatch:
    """Everything an estimator may read, gathered over all processes in TRL's row order.

    N = completions in the generation batch (G consecutive per prompt); K = max assistant turns.
    """

    rewards: Tensor  # (N,) float: weighted sum of reward functions; NaN = unscorable
    group_ids: Tensor  # (N,) int64: completions of one prompt share an id; non-decreasing
    num_tool_calls: Tensor | None = None  # (N,) int64
    num_turns: Tensor | None = None  # (N,) int64, >= 1
    truncated: Tensor | None = None  # (N,) bool: ended without a final answer
    turn_rewards: Tensor | None = None  # (N, K) float: immediate reward per assistant turn; NaN = none
    answer_logprobs: Tensor | None = None  # (N, K) float: IGPO probe after t completed rounds; NaN elsewhere
    step: int = 0  # optimizer step
    max_steps: int = 1  # planned total steps

    def __post_init__(self):
        n = self.rewards.shape[0]
        if self.rewards.dim() != 1 or self.group_ids.shape != (n,):
            raise ValueError(f"rewards and group_ids must both be (N,); got {tuple(self.rewards.shape)} and "
                             f"{tuple(self.group_ids.shape)}")
        for name in OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"AdvantageBatch.{name} has {value.shape[0]} rows, expected {n}")


@dataclass
class AdvantageOutput:
    """advantages (N,) per completion or (N, K) per assistant turn; keep (N,) bool; metrics logged."""

    advantages: Tensor
    keep: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.keep is None:
            self.keep = torch.ones(self.advantages.shape[0], dtype=torch.bool, device=self.advantages.device)


@runtime_checkable
class Estimator(Protocol):
    """What RLTrainer calls. Options are constructor arguments; state is optional."""

    name: str
    requires: frozenset[str]

    def __call__(self, batch: AdvantageBatch) -> AdvantageOutput: ...


class BaseEstimator:
    """Convenience base: no state, no requirements, option validation helpers."""

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: AdvantageBatch) -> AdvantageOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    @staticmethod
    def _check_choice(option: str, value: Any, choices: tuple) -> None:
        if value not in choices:
            raise ValueError(f"{option}={value!r} is not valid; choose one of {list(choices)}")

    def __repr__(self) -> str:
        opts = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in opts.items())})"


def replace_rewards(batch: AdvantageBatch, rewards: Tensor) -> AdvantageBatch:
    """The same batch with other outcome rewards (used by estimators that reshape rewards, then call grpo)."""
    return dataclasses.replace(batch, rewards=rewards)
