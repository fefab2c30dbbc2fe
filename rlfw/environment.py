"""The Environment protocol: TRL's ``environment_factory`` contract, made explicit and typed.

An environment class is instantiated once per rollout (no arguments). Per episode:

- ``reset(**row) -> str | None``: called with the dataset row; the returned text (if any) is appended to the
  last user message. Must be deterministic per row so that the G rollouts of a group start alike.
- public methods with type hints and a Google-style docstring are the **tools** the model can call.
- ``get_reward() -> float``: scores the finished episode (joins the reward functions, weight 1 by default).

rlfw adds, optionally, three hooks. Their names start with an underscore because TRL exposes every public method
as a tool; this way the same class runs unchanged under plain TRL.

- ``_turn_reward() -> float | None``: immediate reward of the assistant turn that just ended (called by the
  rollout engine after each turn's tool calls ran); None = no reward for that turn.
- ``_is_final(text: str) -> bool``: whether an assistant turn without tool calls is a final answer (default True).
- ``_answer_probe(answer: str) -> str``: the assistant text that states ``answer`` as a final answer; IGPO
  teacher-forces it after each round's history to measure how likely the policy is to answer correctly.

Because the contract is TRL's own, every rlfw environment also runs under plain ``GRPOTrainer(environment_factory=...)``.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

RESERVED_METHODS = frozenset({"reset", "get_reward"})


@runtime_checkable
class Environment(Protocol):
    def reset(self, **row: Any) -> str | None: ...

    def get_reward(self) -> float: ...


class BaseEnvironment:
    """Optional base class with the rlfw defaults; subclasses add tools as public typed methods."""

    def reset(self, **row: Any) -> str | None:
        return None

    def get_reward(self) -> float:
        return 0.0

    def _turn_reward(self) -> float | None:
        return None

    def _is_final(self, text: str) -> bool:
        return True

    def _answer_probe(self, answer: str) -> str:
        return str(answer)


def environment_tools(env: object) -> dict[str, Any]:
    """The tools of an environment instance: its public methods other than the protocol's, by name.

    Same rule as TRL: public functions of the class other than reset and get_reward.
    """
    return {
        name: getattr(env, name)
        for name, _ in inspect.getmembers(type(env), predicate=inspect.isfunction)
        if not name.startswith("_") and name not in RESERVED_METHODS
    }


def resolve_environment(spec: str | None) -> type | None:
    """The environment class named by a config: a module exposing ``ENVIRONMENT`` or ``'module:Class'``."""
    if not spec:
        return None
    import importlib

    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"environment={spec!r}: cannot import module {module_name!r} ({err}).") from None
    attr = attr or "ENVIRONMENT"
    if not hasattr(module, attr):
        raise ValueError(f"environment={spec!r}: module {module_name!r} has no {attr!r}; name the class as "
                         f"'{module_name}:ClassName' or define ENVIRONMENT in the module.")
    return getattr(module, attr)
