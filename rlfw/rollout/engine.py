"""The multi-turn rollout engine: token-in/token-out, one batched backend call per turn.

Per rollout the prompt is rendered once. Every turn appends the sampled ids exactly as the backend produced them
(env_mask 1), and, after tool calls, the chat template's own ids for the tool messages and the next generation prompt
(env_mask 0). Those env ids come from rendering a two-message dummy conversation with and without the tool messages
and slicing after the dummy's last EOS (the trick of TRL's ``_get_tool_suffix_ids``), so the cost of a turn does not
depend on how long the conversation already is, and nothing the policy sampled is ever re-tokenized.

Shapes: per completion, ``completion_ids``, ``logprobs``, ``env_mask`` and ``turn_ids`` all have length L (policy
plus env tokens, L <= max_completion_length); ``turn_rewards``, ``turn_tool_calls`` and ``round_prefix_lens`` have
length ``num_turns``.

The environment's optional hooks (``rlfw.environment``) are called here: ``_record_final_answer`` for an assistant
turn without tool calls, ``_pop_turn_reward`` after every turn, ``_final_turn_rewards`` once the episode is over.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlfw.environment import environment_tools, final_turn_rewards, pop_turn_reward, record_final_answer
from rlfw.rollout.backends import Backend
from rlfw.tools import ParsedTurn, ToolExecutor, detect_parser
from rlfw.tools.execution import count_outcomes

logger = logging.getLogger(__name__)

# Per-completion keys describing an episode's structure (the batch fields it supplies come from the field registry).
STRUCTURE_KEYS = ("turn_ids", "round_prefix_lens", "turn_tool_calls", "reset_error")


@dataclass
class Episode:
    """One rollout. ``round_prefix_lens[t]``: completion length when round t began (0 for the first turn)."""

    prompt_ids: list[int]
    messages: list[dict[str, Any]]
    completion_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)
    turn_ids: list[int] = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)
    turn_tool_calls: list[int] = field(default_factory=list)  # tool calls run after each turn
    round_prefix_lens: list[int] = field(default_factory=lambda: [0])
    num_tool_calls: int = 0
    truncated: bool = False
    done: bool = False
    tool_counts: Counter = field(default_factory=Counter)
    reset_error: str | None = None  # the environment's reset raised: no turn was played, the episode is unscorable

    @property
    def num_turns(self) -> int:
        return len(self.turn_rewards)

    def extend(self, ids: Sequence[int], logprobs: Sequence[float] | None, turn: int) -> None:
        """Append policy tokens of ``turn`` (logprobs given) or env tokens (``logprobs=None``, turn id -1)."""
        self.completion_ids += ids
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)
        self.env_mask += [1 if logprobs is not None else 0] * len(ids)
        self.turn_ids += [turn if logprobs is not None else -1] * len(ids)

    def finish(self, truncated: bool) -> None:
        self.done, self.truncated = True, truncated

    def to_dict(self) -> dict[str, Any]:
        """Token lists, structure, the batch fields the rollout supplies, and the messages."""
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("done", "tool_counts")}
        return {**record, "num_turns": self.num_turns}


def _assistant_message(parsed: ParsedTurn) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.calls:
        message["tool_calls"] = [
            {"type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in parsed.calls
        ]
    return message


def _with_observation(prompt: Any, observation: str | None) -> list[dict[str, Any]]:
    """The prompt as messages, with ``reset``'s observation appended to the last user message (as TRL does)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if observation is not None:
        messages[-1] = {**messages[-1], "content": messages[-1]["content"] + observation}
    return messages


NON_FINAL_TURNS = ("continue", "remind", "end")
DEFAULT_REMINDER = "Your reply was neither a tool call nor a final answer. Call a tool, or give your final answer."


class RolloutEngine:
    """Runs batches of multi-turn episodes against a generation ``Backend``.

    ``contain_reset_errors``: a ``reset`` that raises fails only its episode (training); False (default) lets the
    exception through, for evaluation and debugging.

    ``non_final_turn``: what follows an assistant turn that ended (EOS) with neither a tool call nor a final answer
    (``_record_final_answer`` said no): "continue" (default) appends the next generation prompt, so the transcript
    has two assistant messages in a row; "remind" appends ``format_reminder`` as a user turn first; "end" ends the
    episode, truncated. Environments without ``_record_final_answer`` count every call-free turn as final.
    """

    def __init__(self, tokenizer: Any, backend: Backend, *, max_turns: int, max_completion_length: int,
                 parser: Any = None, tool_timeout: float = 30.0, max_tool_result_chars: int = 2000,
                 chat_template: str | None = None, chat_template_kwargs: dict | None = None,
                 eos_token_ids: Sequence[int] | None = None, any_active: Callable[[bool], bool] | None = None,
                 contain_reset_errors: bool = False, non_final_turn: str = "continue",
                 format_reminder: str | None = None):
        if max_turns < 1 or max_completion_length < 1:
            raise ValueError("max_turns and max_completion_length must be >= 1")
        if non_final_turn not in NON_FINAL_TURNS:
            raise ValueError(f"non_final_turn={non_final_turn!r} is not valid; use one of {list(NON_FINAL_TURNS)}")
        self.non_final_turn, self.format_reminder = non_final_turn, format_reminder or DEFAULT_REMINDER
        self.tokenizer, self.backend = tokenizer, backend
        self.max_turns, self.max_completion_length = max_turns, max_completion_length
        self.parser = detect_parser(tokenizer, parser)
        self.executor = ToolExecutor(tool_timeout, max_tool_result_chars)
        self.chat_template, self.chat_template_kwargs = chat_template, dict(chat_template_kwargs or {})
        eos = list(eos_token_ids) if eos_token_ids is not None else []
        self.eos_ids = set(eos) | {tokenizer.eos_token_id}
        self._eos_texts = [t for t in tokenizer.convert_ids_to_tokens(sorted(self.eos_ids)) if t]
        # Multi-process generation backends (vLLM server, ZeRO-3/FSDP) need every rank in every turn.
        self._any_active = any_active or (lambda local: local)
        self.contain_reset_errors = contain_reset_errors

    def render(self, messages: list[dict], add_generation_prompt: bool, tools: list | None = None) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False,
            chat_template=self.chat_template, **self.chat_template_kwargs,
        )
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def env_suffix_ids(self, tool_messages: list[dict[str, Any]]) -> list[int]:
        """Template ids for ``tool_messages`` + the next generation prompt, as they follow an assistant EOS."""
        if tool_messages and tool_messages[0].get("role") == "tool":
            call = {"type": "function", "function": {"name": tool_messages[0].get("name", "tool"), "arguments": {}}}
            assistant = {"role": "assistant", "content": "", "tool_calls": [call]}
        else:
            assistant = {"role": "assistant", "content": "dummy"}
        dummy = [{"role": "user", "content": "dummy"}, assistant]
        prefix = self.render(dummy, add_generation_prompt=False)
        full = self.render(dummy + tool_messages, add_generation_prompt=True)
        eos_positions = [i for i, t in enumerate(prefix) if t in self.eos_ids]
        if eos_positions:  # the policy's turn ends at its EOS; template text after it belongs to the suffix
            prefix = prefix[: eos_positions[-1] + 1]
        if full[: len(prefix)] != prefix:
            raise ValueError(
                "The chat template is not prefix-preserving: rendering tool messages changes the tokens of earlier "
                "turns, so tool results cannot be appended token-in/token-out. Use a template whose turns end with an "
                "EOS token and never re-render history (or pass chat_template=...)."
            )
        return full[len(prefix):]

    def start(self, row: dict[str, Any], env: Any, prompt: Any = None) -> Episode:
        """Reset ``env`` with ``row`` and render the prompt once.

        With ``contain_reset_errors``, a ``reset`` that raises fails only this episode: one bad dataset row must not
        stop a training run. The episode gets no turn (a single env-masked EOS, so it trains nothing),
        ``reset_error`` says why, the reward functions do not see it, it is scored NaN (unscorable) and
        ``rollout/reset_errors`` counts it.
        """
        prompt = row["prompt"] if prompt is None else prompt
        tools = list(environment_tools(env).values()) or None  # `or None`: some templates render tools=[] as tools
        try:
            observation = env.reset(**row)
        except Exception as err:  # noqa: BLE001 - any failure of user code is contained and reported
            if not self.contain_reset_errors:
                raise
            messages = _with_observation(prompt, None)
            episode = Episode(self.render(messages, add_generation_prompt=True, tools=tools), messages)
            episode.reset_error = f"{type(err).__name__}: {err}"
            logger.warning("%s.reset raised %s on the row with prompt %.200r; that episode is scored NaN "
                           "(rollout/reset_errors). Fix reset() or the row.", type(env).__name__,
                           episode.reset_error, prompt)
            episode.extend([self.tokenizer.eos_token_id], None, -1)
            episode.turn_rewards.append(math.nan)  # one empty turn, so per-turn estimators see a well-formed row
            episode.turn_tool_calls.append(0)
            episode.finish(truncated=True)
            return episode
        messages = _with_observation(prompt, observation)
        return Episode(self.render(messages, add_generation_prompt=True, tools=tools), messages)

    def run(self, rows: Sequence[dict[str, Any]], envs: Sequence[Any], prompts: Sequence[Any] | None = None
            ) -> list[Episode]:
        """Play one episode per (row, env); ``prompts`` overrides ``row["prompt"]`` (TRL passes its own copies)."""
        prompts = prompts if prompts is not None else [None] * len(rows)
        episodes = [self.start(row, env, p) for row, env, p in zip(rows, envs, prompts, strict=True)]
        tools = [environment_tools(env) for env in envs]
        release = getattr(self.backend, "release", lambda: None)  # what the backend kept between turns goes now
        release()
        try:
            for turn in range(self.max_turns):
                active = [i for i, ep in enumerate(episodes) if not ep.done]
                if not self._any_active(bool(active)):
                    break
                self.step(turn, [episodes[i] for i in active], [envs[i] for i in active], [tools[i] for i in active])
        finally:
            release()
        for ep, env in zip(episodes, envs, strict=True):
            if ep.reset_error is None:
                ep.turn_rewards = final_turn_rewards(env, ep.turn_rewards)
        return episodes

    def step(self, turn: int, episodes: list[Episode], envs: list[Any], tools: list[dict]) -> None:
        """One turn for all active episodes: one backend call, then all their tool calls concurrently."""
        budgets = [self.max_completion_length - len(ep.completion_ids) for ep in episodes]
        outputs = self.backend.generate([ep.prompt_ids + ep.completion_ids for ep in episodes], budgets)
        jobs, owners, continuing = [], [], []
        for k, (ep, env, (ids, logprobs), budget) in enumerate(zip(episodes, envs, outputs, budgets, strict=True)):
            ids, logprobs = list(ids)[:budget], list(logprobs)[:budget]
            ep.extend(ids, logprobs, turn)
            text = self._decode_turn(ids)
            parsed = self.parser.parse(text)
            ep.messages.append(_assistant_message(parsed))
            last_turn = turn + 1 == self.max_turns
            if not ids or ids[-1] not in self.eos_ids:  # ran out of token budget mid-turn
                ep.finish(truncated=True)
            elif not parsed.has_calls and record_final_answer(env, text):
                ep.finish(truncated=False)
            elif last_turn:  # no turn left to read tool results: the calls are not run
                ep.finish(truncated=True)
            elif not parsed.has_calls and self.non_final_turn == "end":
                ep.finish(truncated=True)
            elif not parsed.has_calls:
                reminder = [{"role": "user", "content": self.format_reminder}] if self.non_final_turn == "remind" else []
                ep.messages += reminder
                continuing.append((ep, reminder))
            else:
                calls = [*parsed.calls, *parsed.errors]
                jobs += [(tools[k], c) for c in calls]
                owners += [ep] * len(calls)
        outcomes = self.executor.run(jobs)
        by_episode: dict[int, list] = {}
        for ep, outcome in zip(owners, outcomes, strict=True):
            by_episode.setdefault(id(ep), [ep, []])[1].append(outcome)
        for ep in episodes:
            ep.turn_tool_calls.append(len(by_episode.get(id(ep), (None, []))[1]))
        for ep, ep_outcomes in by_episode.values():
            ep.num_tool_calls += len(ep_outcomes)
            ep.tool_counts.update(count_outcomes(ep_outcomes))
            messages = [{"role": "tool", "name": o.name, "content": o.observation} for o in ep_outcomes]
            ep.messages += messages
            continuing.append((ep, messages))
        for ep, messages in continuing:
            self._append_env_turn(ep, messages)
        for ep, env in zip(episodes, envs, strict=True):
            reward = pop_turn_reward(env)
            ep.turn_rewards.append(math.nan if reward is None else reward)

    def _append_env_turn(self, ep: Episode, messages: list[dict]) -> None:
        suffix = self.env_suffix_ids(messages)
        # Leave room for at least one policy token; otherwise roll the env tokens back (as TRL does).
        if len(ep.completion_ids) + len(suffix) >= self.max_completion_length:
            ep.finish(truncated=True)
            return
        ep.extend(suffix, None, -1)
        ep.round_prefix_lens.append(len(ep.completion_ids))

    def _decode_turn(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        for eos in self._eos_texts:
            if text.endswith(eos):
                return text[: -len(eos)]
        return text
