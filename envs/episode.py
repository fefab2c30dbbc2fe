"""What the three environments share: final-answer parsing, the episode bookkeeping behind ``get_reward`` and
``_pop_turn_reward``, stable train/test splitting, and turning a scorer into a TRL reward function.

Scoring has two equivalent entry points that give the same number for the same final answer:

- ``get_reward()`` scores the final answer the environment recorded. rlfw's rollout engine hands every assistant
  message without tool calls to ``_record_final_answer(text)``, which records it. Plain TRL never calls
  ``_record_final_answer``, so there ``get_reward()`` returns 0.0.
- the module's ``REWARD_FUNCS`` read the final assistant message from ``completions`` (TRL's reward signature).

Use one of them per run, not both, or the score counts twice: under rlfw the environment's ``get_reward`` column
is the reward (pass no correctness reward function); under plain TRL pass ``reward_funcs=REWARD_FUNCS``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

from datasets import Dataset
from transformers.utils import get_json_schema

from rlfw.environment import BaseEnvironment, environment_tools
from rlfw.rewards import ANSWER_RE, extract_answer  # noqa: F401 - re-exported for the environments

ANSWER_FORMAT = "<answer>{}</answer>"
TEST_FRACTION_BUCKETS = 5  # one bucket in five (20%) of the problem keys is the test split


def message_text(content: Any) -> str:
    """A message's content as text (TRL may give a string or a list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


def final_assistant_text(completion: Any) -> str:
    """The text of the last assistant message of a completion (a message list or a plain string)."""
    if isinstance(completion, str):
        return completion
    for message in reversed(completion):
        if message.get("role") == "assistant":
            return message_text(message.get("content"))
    return ""


def stable_hash(key: str) -> int:
    """A hash that is the same in every process and Python run (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def split_of(key: str) -> str:
    """The split a problem belongs to, decided by its key alone, so train and test can never share a problem."""
    return "test" if stable_hash(key) % TEST_FRACTION_BUCKETS == 0 else "train"


def check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def conversation(system: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def tool_call_message(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """An assistant message that calls one tool, in the chat-template format TRL and transformers use.

    The arguments are a JSON string (templates render it as is): as a dict, ``datasets`` would merge the argument
    names of all rows into one schema and render absent ones as ``null``.
    """
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]}


def traces_dataset(traces: list[list[dict[str, Any]]], environment: type | None = None) -> Dataset:
    """Conversations (system, user, then the ideal turns) as TRL's conversational prompt-completion SFT format.

    With ``environment``, a ``tools`` column holds its tool schemas (JSON), so SFT renders the prompt exactly as the
    rollout engine does (templates that list the tools in the prompt would otherwise differ between SFT and RL).
    """
    rows = [{"prompt": trace[:2], "completion": trace[2:]} for trace in traces]
    if environment is not None:
        tools = json.dumps([get_json_schema(fn) for fn in environment_tools(environment()).values()])
        rows = [{**row, "tools": tools} for row in rows]
    return Dataset.from_list(rows)


def reward_function(name: str, score: Callable[[str, dict[str, Any]], float]) -> Callable[..., list[float | None]]:
    """A TRL reward function that scores the final assistant message of each completion.

    ``score(final_text, row)`` gets the text and that sample's dataset columns (``answer`` and the rest).
    """

    def reward(completions: list, answer: list[str], **kwargs: Any) -> list[float | None]:
        # Per-sample columns arrive as sequences with one entry per completion; other kwargs (trainer_state, ...) not.
        columns = {k: v for k, v in kwargs.items()
                   if isinstance(v, Sequence) and not isinstance(v, str) and len(v) == len(completions)}
        rewards: list[float | None] = []
        for i, completion in enumerate(completions):
            row = {"answer": answer[i], **{k: v[i] for k, v in columns.items()}}
            rewards.append(float(score(final_assistant_text(completion), row)))
        return rewards

    reward.__name__ = reward.__qualname__ = name
    return reward


class EpisodeEnvironment(BaseEnvironment):
    """Episode bookkeeping shared by the environments.

    Subclasses implement ``_score(final_text) -> float`` (the episode score of a final message, same as the reward
    function's) and ``_score_turn(events) -> float`` (the immediate reward of a turn from the tool events it
    produced); tools call ``_record(event)``. Every helper is underscore-named: TRL makes public methods tools.
    """

    def __init__(self) -> None:
        self._clear({})

    def reset(self, **row: Any) -> str | None:
        self._clear(row)
        return None

    def _clear(self, row: dict[str, Any]) -> None:
        self.row = row
        self.final_text: str | None = None
        self.tool_events: list[dict[str, Any]] = []  # every tool call of the episode, in order
        self._turn_start = 0

    def get_reward(self) -> float:
        return 0.0 if self.final_text is None else float(self._score(self.final_text))

    def _record_final_answer(self, text: str) -> bool:
        """Records ``text`` as the episode's final message; True when it states an answer in this env's format."""
        self.final_text = text
        return self._has_answer(text)

    def _has_answer(self, text: str) -> bool:
        return extract_answer(text) is not None

    def _format_final_answer(self, answer: str) -> str:
        return ANSWER_FORMAT.format(answer)

    def _record(self, event: dict[str, Any]) -> None:
        self.tool_events.append(event)

    def _pop_turn_reward(self) -> float | None:
        """Immediate reward of the turn since the previous call: None when that turn called no tool."""
        events = self.tool_events[self._turn_start:]
        self._turn_start = len(self.tool_events)
        return None if not events else float(self._score_turn(events))

    def _score(self, final_text: str) -> float:
        raise NotImplementedError

    def _score_turn(self, events: list[dict[str, Any]]) -> float:
        raise NotImplementedError
