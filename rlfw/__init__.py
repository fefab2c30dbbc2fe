"""rlfw: reinforcement-learning fine-tuning of LLM agents on top of TRL's GRPOTrainer.

Shape legend used throughout the code:
    N  completions in a generation batch, gathered over all processes, in TRL's order
    G  completions per prompt (``num_generations``); completions of one prompt are consecutive
    K  assistant turns (the largest number of turns of any completion in the batch)
    T  completion tokens (padded per process; policy tokens plus tool/environment tokens)
    F  reward functions

Public API (imported lazily, so ``import rlfw`` stays cheap):
    RLTrainer, RLConfig, build_estimator, AdvantageBatch, AdvantageOutput, ESTIMATORS,
    Environment, BaseEnvironment, make_rollout_func
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "RLTrainer": "rlfw.trainer",
    "RLConfig": "rlfw.config",
    "build_estimator": "rlfw.advantages",
    "AdvantageBatch": "rlfw.advantages",
    "AdvantageOutput": "rlfw.advantages",
    "ESTIMATORS": "rlfw.advantages",
    "Environment": "rlfw.environment",
    "BaseEnvironment": "rlfw.environment",
    "make_rollout_func": "rlfw.rollout",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rlfw' has no attribute {name!r}")
