"""The optional AdvantageBatch fields, each defined once in ``BATCH_FIELDS``.

A field's entry says everything the rest of rlfw derives from it:

- ``AdvantageBatch`` accepts exactly these names (and checks their first dimension);
- the trainer builds each field per local row (``build``) and gathers it over processes (per-completion fields
  as (N,), per-turn fields NaN/0-padded to (N, K));
- the rollout returns the ``from_rollout`` fields per completion under their own names;
- the start-up check compares an estimator's ``requires`` with what the generation mode supplies
  (``single_turn``) and with the dataset columns a field needs (``column``).

Adding a field is one entry (``register_field`` for fields defined outside rlfw). ``build`` runs only for fields
the estimator requires unless ``always`` is set (cheap per-row metadata that every batch carries).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class LocalRows:
    """What a field is built from on one process (N_local rows, in TRL's order).

    rows: the dataset rows merged with the rollout's per-completion keys (``turn_ids``, ``round_prefix_lens``, the
    ``from_rollout`` fields, ...); output: TRL's local output dict (``prompt_ids``, ``completion_ids``,
    ``completion_mask``, ...); multi_turn: whether rlfw's multi-turn engine generated them; eos_token_ids: the
    tokens that end a completion (pad included); trainer: the RLTrainer (for fields that need the model, e.g. no-grad
    probes).
    """

    rows: list[dict[str, Any]]
    output: dict[str, Any]
    multi_turn: bool
    eos_token_ids: frozenset[int] = frozenset()
    trainer: Any = None


@dataclass(frozen=True)
class BatchField:
    """One optional AdvantageBatch field.

    name: attribute name (and per-completion key of the rollout when ``from_rollout``).
    per_turn: (N, K) when True, else (N,). dtype: of the gathered tensor (per-turn floats are NaN-padded, per-turn
    integers 0-padded). help: meaning, for messages and docs. build: LocalRows -> one value per local row (a list of
    per-turn values when per_turn). single_turn: whether single-turn generation can supply it (multi-turn always
    can). from_rollout: the rollout returns it per completion. column: (dataset column, what the field does with
    it, how to fix its absence) when the field needs one. always: built for every batch, required or not (cheap
    metadata).
    """

    name: str
    per_turn: bool
    dtype: torch.dtype
    help: str
    build: Callable[[LocalRows], list]
    single_turn: bool = False
    from_rollout: bool = False
    column: tuple[str, str, str] | None = None
    always: bool = False

    @property
    def shape(self) -> str:
        return "(N, K)" if self.per_turn else "(N,)"


def _rollout_value(name: str, default: Any, single_turn: Callable[[LocalRows, int], Any] | None = None):
    """A field the rollout reports per completion; ``single_turn(ctx, i)`` gives it without the engine."""

    def build(ctx: LocalRows) -> list:
        if not ctx.multi_turn:
            return [single_turn(ctx, i) for i in range(len(ctx.rows))]
        return [row.get(name, default) for row in ctx.rows]

    return build


def _single_turn_truncated(ctx: LocalRows, i: int) -> bool:
    """Single-turn generation: truncated when the completion's last token is not an EOS (or pad)."""
    last = max(int(ctx.output["completion_mask"][i].sum()) - 1, 0)
    return int(ctx.output["completion_ids"][i, last]) not in ctx.eos_token_ids


def _turn_rewards(ctx: LocalRows) -> list:
    return [row.get("turn_rewards") or [float("nan")] for row in ctx.rows]


def turn_lengths_of(turn_ids: list[int], num_turns: int) -> list[int]:
    """Policy tokens per assistant turn from a completion's token turn ids (-1 = environment token)."""
    lengths = [0] * max(num_turns, 1)
    for t in turn_ids:
        if 0 <= t < len(lengths):
            lengths[t] += 1
    return lengths


def _turn_lengths(ctx: LocalRows) -> list:
    if not ctx.multi_turn:
        return [[int(m.sum())] for m in ctx.output["completion_mask"]]
    return [turn_lengths_of(row.get("turn_ids") or [], row.get("num_turns", 1)) for row in ctx.rows]


def _answer_logprobs(ctx: LocalRows) -> list:
    return ctx.trainer.answer_probes(ctx.rows, ctx.output)


def _info_gain(ctx: LocalRows) -> list:
    return ctx.trainer.info_gain_probes(ctx.rows, ctx.output)


ANSWER_FIX = ("answer", "probes the policy's likelihood of the ground-truth answer",
              "Add the reference answer text as an 'answer' column, or use an estimator that needs no ground truth "
              "(e.g. stratified, gated).")

BATCH_FIELDS: dict[str, BatchField] = {
    "num_tool_calls": BatchField(
        "num_tool_calls", per_turn=False, dtype=torch.int64, help="tool calls made by the completion",
        build=_rollout_value("num_tool_calls", 0, lambda ctx, i: 0), from_rollout=True, always=True),
    "num_turns": BatchField(
        "num_turns", per_turn=False, dtype=torch.int64, help="assistant turns T_i (>= 1)",
        build=_rollout_value("num_turns", 1, lambda ctx, i: 1), single_turn=True, from_rollout=True, always=True),
    "truncated": BatchField(
        "truncated", per_turn=False, dtype=torch.bool, help="the episode ended without a final answer turn",
        build=_rollout_value("truncated", False, _single_turn_truncated), single_turn=True, from_rollout=True,
        always=True),
    "turn_rewards": BatchField(
        "turn_rewards", per_turn=True, dtype=torch.float32, help="immediate reward of each assistant turn; NaN = none",
        build=_turn_rewards, from_rollout=True, always=True),
    "answer_logprobs": BatchField(
        "answer_logprobs", per_turn=True, dtype=torch.float32,
        help="mean log-prob of the ground-truth answer after t completed rounds (IGPO's probe; NaN for truncated and "
             "single-turn rollouts, which are not probed)",
        build=_answer_logprobs, column=ANSWER_FIX),
    "turn_lengths": BatchField(
        "turn_lengths", per_turn=True, dtype=torch.int64, help="policy tokens of each assistant turn; 0 past the last",
        build=_turn_lengths, single_turn=True),
    "info_gain": BatchField(
        "info_gain", per_turn=True, dtype=torch.float32,
        help="counterfactual information gain of turn t's environment message on turn t+1 (InfoPO); NaN = undefined",
        build=_info_gain),
}


def register_field(field: BatchField) -> BatchField:
    """Add a field defined outside rlfw (an estimator of your own that needs new data); returns it."""
    if field.name in BATCH_FIELDS or field.name in ("rewards", "group_ids", "step", "max_steps"):
        raise ValueError(f"AdvantageBatch already has a field named {field.name!r}")
    BATCH_FIELDS[field.name] = field
    return field


def unregister_field(name: str) -> None:
    """Remove a field added with ``register_field`` (tests)."""
    BATCH_FIELDS.pop(name)


def rollout_keys() -> tuple[str, ...]:
    """The fields the rollout returns per completion under their own names."""
    return tuple(name for name, f in BATCH_FIELDS.items() if f.from_rollout)


def supplied_fields(multi_turn: bool) -> frozenset[str]:
    """The fields a generation mode can supply."""
    return frozenset(name for name, f in BATCH_FIELDS.items() if multi_turn or f.single_turn)
