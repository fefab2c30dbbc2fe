"""Advantage estimators, chosen by name (``advantage_estimator``) with options (``advantage_kwargs``).

To add one: write a class meeting the contract in ``base.py`` in its own file and add it to ``ESTIMATORS``; a new
batch field it needs is one entry in ``fields.BATCH_FIELDS``.
"""

from __future__ import annotations

import inspect
from typing import Any

from rlfw.advantages.asymre import AsymRE
from rlfw.advantages.base import (
    AdvantageBatch,
    AdvantageOutput,
    BaseEstimator,
    ChecksConfig,
    Estimator,
    HasLossTerm,
    LossInputs,
    Stateful,
    TracksSteps,
)
from rlfw.advantages.epo import EPO
from rlfw.advantages.fields import BATCH_FIELDS, BatchField, register_field
from rlfw.advantages.gated import Gated
from rlfw.advantages.grpo import GRPO
from rlfw.advantages.igpo import IGPO
from rlfw.advantages.infopo import InfoPO
from rlfw.advantages.matchtir import MatchTIR
from rlfw.advantages.median import Median
from rlfw.advantages.noisy_verifier import NoisyVerifier
from rlfw.advantages.opmd import OPMD
from rlfw.advantages.riskpo import RiskPO
from rlfw.advantages.rloo import RLOO
from rlfw.advantages.stratified import Stratified

ESTIMATORS: dict[str, type] = {
    "grpo": GRPO,
    "rloo": RLOO,
    "median": Median,
    "stratified": Stratified,
    "riskpo": RiskPO,
    "gated": Gated,
    "igpo": IGPO,
    "epo": EPO,
    "noisy_verifier": NoisyVerifier,
    "opmd": OPMD,
    "asymre": AsymRE,
    "infopo": InfoPO,
    "matchtir": MatchTIR,
}


def estimator_options(name: str) -> dict[str, Any]:
    """The constructor options of a registered estimator and their defaults."""
    cls = _lookup(name)
    params = inspect.signature(cls.__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}


def check_estimator_options(name: str, kwargs: dict[str, Any]) -> None:
    """Fail with the valid option names when kwargs holds one the estimator does not take."""
    valid = estimator_options(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for advantage_estimator={name!r}. "
            f"Valid options: {sorted(valid) or 'none'} (set them in advantage_kwargs)."
        )


def build_estimator(name: str, **kwargs: Any) -> Estimator:
    """Build the estimator registered under ``name`` with its options."""
    check_estimator_options(name, kwargs)
    return _lookup(name)(**kwargs)


def _lookup(name: str) -> type:
    if name not in ESTIMATORS:
        raise ValueError(
            f"Unknown advantage_estimator {name!r}. Valid estimators: {sorted(ESTIMATORS)}. "
            "A custom one can be passed as an instance: RLTrainer(estimator=...)."
        )
    return ESTIMATORS[name]


__all__ = [
    "BATCH_FIELDS",
    "ESTIMATORS",
    "AdvantageBatch",
    "AdvantageOutput",
    "BaseEstimator",
    "BatchField",
    "ChecksConfig",
    "Estimator",
    "HasLossTerm",
    "LossInputs",
    "Stateful",
    "TracksSteps",
    "register_field",
    "build_estimator",
    "check_estimator_options",
    "estimator_options",
]
