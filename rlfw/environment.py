"""The Environment protocol: TRL's ``environment_factory`` contract, made explicit and typed.

An environment class is instantiated once per rollout (no arguments). Per episode:

- ``reset(**row) -> str | None``: called with the dataset row; the returned text (if any) is appended to the
  last user message. Must be deterministic per row so that the G rollouts of a group start alike.
- public methods with type hints and a Google-style docstring are the **tools** the model can call.
- ``get_reward() -> float``: scores the finished episode (joins the reward functions, weight 1 by default).

rlfw adds, optionally, four hooks, each declared below as a protocol of its own. Their names start with an
underscore because TRL exposes every public method as a tool; this way the same class runs unchanged under plain TRL.

- ``_record_final_answer(text: str) -> bool``: called by the rollout engine with every assistant turn that made no
  tool call; the environment records ``text`` as the episode's final message and returns whether it is a final
  answer (True ends the episode; False lets it continue). Default: True.
- ``_pop_turn_reward() -> float | None``: called by the engine after each assistant turn (and its tool calls); returns
  the immediate reward of that turn and starts the next turn's bookkeeping; None = no reward for that turn.
- ``_final_turn_rewards(turn_rewards: list[float]) -> list[float]``: called once when the episode is over, with
  the per-turn rewards ``_pop_turn_reward`` reported (NaN = none); returns the episode's per-turn rewards, same length.
  For turn rewards that depend on the whole trajectory (e.g. matching its tool calls against ground-truth calls).
  Default: unchanged.
- ``_format_final_answer(answer: str) -> str``: the assistant text that states ``answer`` as a final answer; IGPO
  teacher-forces it after each round's history to measure how likely the policy is to answer correctly. Default:
  the bare answer.

Because the contract is TRL's own, every rlfw environment also runs under plain ``GRPOTrainer(environment_factory=...)``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Protocol, runtime_checkable

RESERVED_METHODS = frozenset({"reset", "get_reward"})


@runtime_checkable
class Environment(Protocol):
    def reset(self, **row: Any) -> str | None: ...

    def get_reward(self) -> float: ...


@runtime_checkable
class RecordsFinalAnswer(Protocol):
    def _record_final_answer(self, text: str) -> bool: ...


@runtime_checkable
class ReportsTurnRewards(Protocol):
    def _pop_turn_reward(self) -> float | None: ...


@runtime_checkable
class RescoresTurns(Protocol):
    def _final_turn_rewards(self, turn_rewards: list[float]) -> list[float]: ...


@runtime_checkable
class FormatsFinalAnswer(Protocol):
    def _format_final_answer(self, answer: str) -> str: ...


class BaseEnvironment:
    """Optional base class with the rlfw defaults; subclasses add tools as public typed methods."""

    def reset(self, **row: Any) -> str | None:
        return None

    def get_reward(self) -> float:
        return 0.0

    def _record_final_answer(self, text: str) -> bool:
        return True

    def _pop_turn_reward(self) -> float | None:
        return None

    def _final_turn_rewards(self, turn_rewards: list[float]) -> list[float]:
        return turn_rewards

    def _format_final_answer(self, answer: str) -> str:
        return str(answer)


def record_final_answer(env: Any, text: str) -> bool:
    """Whether ``text`` (an assistant turn without tool calls) ends the episode; the environment records it."""
    return bool(env._record_final_answer(text)) if isinstance(env, RecordsFinalAnswer) else True


def pop_turn_reward(env: Any) -> float | None:
    """The immediate reward of the turn that just ended (None = none)."""
    if not isinstance(env, ReportsTurnRewards):
        return None
    value = env._pop_turn_reward()
    return None if value is None else float(value)


def final_turn_rewards(env: Any, turn_rewards: list[float]) -> list[float]:
    """The finished episode's per-turn rewards (NaN = none) after the environment's rescoring, if it has one."""
    if not isinstance(env, RescoresTurns):
        return turn_rewards
    rescored = [math.nan if r is None else float(r) for r in env._final_turn_rewards(list(turn_rewards))]
    if len(rescored) != len(turn_rewards):
        raise ValueError(f"{type(env).__name__}._final_turn_rewards returned {len(rescored)} rewards for an episode of "
                         f"{len(turn_rewards)} turns; return one per turn.")
    return rescored


def format_final_answer(env: Any, answer: str) -> str:
    """The assistant text stating ``answer`` as a final answer (the bare answer for environments without the hook)."""
    return env._format_final_answer(answer) if isinstance(env, FormatsFinalAnswer) else str(answer)


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
