"""The estimator contract: AdvantageBatch in, AdvantageOutput out (see docs/estimators.md)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from rlfw.advantages.fields import BATCH_FIELDS

Tensor = torch.Tensor
CORE_FIELDS = ("rewards", "group_ids", "step", "max_steps")


class AdvantageBatch:
    """Everything an estimator may read, gathered over all processes in TRL's row order (immutable).

    N = completions in the generation batch (G consecutive per prompt); K = max assistant turns.

        rewards    (N,) float  weighted sum of reward functions; NaN = unscorable
        group_ids  (N,) int64  completions of one prompt share an id; non-decreasing
        step, max_steps        optimizer step and planned total (for schedules)

    plus one keyword per optional field of ``rlfw.advantages.fields.BATCH_FIELDS`` (None when absent), read as
    attributes (``batch.turn_rewards``).
    """

    rewards: Tensor
    group_ids: Tensor
    step: int
    max_steps: int

    def __init__(self, rewards: Tensor, group_ids: Tensor, *, step: int = 0, max_steps: int = 1,
                 **fields: Tensor | None):
        unknown = sorted(set(fields) - set(BATCH_FIELDS))
        if unknown:
            raise TypeError(f"AdvantageBatch has no field(s) {unknown}; optional fields: {sorted(BATCH_FIELDS)} "
                            "(a new one is registered with rlfw.advantages.fields.register_field)")
        n = rewards.shape[0]
        if rewards.dim() != 1 or group_ids.shape != (n,):
            raise ValueError(f"rewards and group_ids must both be (N,); got {tuple(rewards.shape)} and "
                             f"{tuple(group_ids.shape)}")
        values = {"rewards": rewards, "group_ids": group_ids, "step": step, "max_steps": max_steps}
        for name in BATCH_FIELDS:
            value = fields.get(name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"AdvantageBatch.{name} has {value.shape[0]} rows, expected {n}")
            values[name] = value
        self.__dict__.update(values)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("AdvantageBatch is immutable; use batch.replace(field=value)")

    def replace(self, **changes: Any) -> AdvantageBatch:
        """A copy with some fields changed."""
        return AdvantageBatch(**{**vars(self), **changes})

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) if isinstance(v, Tensor) else v for k, v in vars(self).items() if v is not None}
        return f"AdvantageBatch({shapes})"


@dataclass
class AdvantageOutput:
    """advantages (N,) per completion or (N, K) per assistant turn; keep (N,) bool; metrics logged."""

    advantages: Tensor
    keep: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.keep is None:
            self.keep = torch.ones(self.advantages.shape[0], dtype=torch.bool, device=self.advantages.device)


@dataclass(frozen=True)
class LossInputs:
    """What a loss-level term receives for one micro-batch on this process (B rows, T completion tokens).

    Tensors are TRL's own, from its loss forward (no second forward): ``logps`` and ``entropies`` carry the grad.
    """

    logps: Tensor  # (B, T) log pi of the sampled tokens, current policy, with grad
    old_logps: Tensor  # (B, T) log pi_old, the policy the batch was sampled with (TRL's old_per_token_logps), detached
    entropies: Tensor  # (B, T) per-token entropy of the current policy, with grad
    mask: Tensor  # (B, T) bool: policy tokens in the loss (tool tokens and keep=False rows excluded)
    turn_ids: Tensor  # (B, T) int64: assistant turn of each policy token, -1 elsewhere
    step: int  # optimizer step
    max_steps: int  # planned total steps


SumOverProcesses = Callable[[Tensor], Tensor]  # a tensor -> its elementwise sum over all processes


@runtime_checkable
class Estimator(Protocol):
    """What RLTrainer calls: ``estimator(batch) -> AdvantageOutput``. Options are constructor arguments.

    ``requires`` names the optional batch fields it reads (``rlfw.advantages.fields.BATCH_FIELDS``). The optional
    capabilities below are separate protocols; BaseEstimator implements each as a no-op, and the trainer calls only
    those an estimator implements.
    """

    name: str
    requires: frozenset[str]

    def __call__(self, batch: AdvantageBatch) -> AdvantageOutput: ...


@runtime_checkable
class ChecksConfig(Protocol):
    """Validates the whole run configuration before any model loads (RLConfig and RLTrainer call it)."""

    def check_config(self, config: Any) -> None:
        """Raise ValueError, with the fix, for a config this estimator cannot work with (config: an RLConfig)."""


@runtime_checkable
class Stateful(Protocol):
    """Keeps state across steps; it is saved in every checkpoint and restored on resume (JSON-serialisable)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class HasLossTerm(Protocol):
    """Adds a term to TRL's loss, per micro-batch; the trainer scales it for gradient accumulation like TRL's."""

    def loss(self, inputs: LossInputs) -> Tensor | None:
        """A differentiable scalar added to the loss, or None for no term."""


@runtime_checkable
class TracksSteps(Protocol):
    """Called once per optimizer step on every process (after the step's last micro-batch term), to update
    statistics the estimator keeps; ``sum_over_processes`` reduces what the micro-batches of this process saw."""

    def on_optimizer_step(self, sum_over_processes: SumOverProcesses) -> None: ...


class BaseEstimator:
    """Convenience base: no requirements, every optional capability a no-op, option validation helpers."""

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: AdvantageBatch) -> AdvantageOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_config(self, config: Any) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def loss(self, inputs: LossInputs) -> Tensor | None:
        return None

    def on_optimizer_step(self, sum_over_processes: SumOverProcesses) -> None:
        pass

    @staticmethod
    def _check_choice(option: str, value: Any, choices: tuple) -> None:
        if value not in choices:
            raise ValueError(f"{option}={value!r} is not valid; choose one of {list(choices)}")

    @staticmethod
    def _non_negative(option: str, value: float, meaning: str) -> float:
        """``value`` as a float, or a ValueError saying what the option means."""
        if not value >= 0:
            raise ValueError(f"{option}={value!r} must be >= 0 ({meaning})")
        return float(value)

    def __repr__(self) -> str:
        opts = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in opts.items())})"


def replace_rewards(batch: AdvantageBatch, rewards: Tensor) -> AdvantageBatch:
    """The same batch with other outcome rewards (used by estimators that reshape rewards, then call grpo)."""
    return batch.replace(rewards=rewards)
