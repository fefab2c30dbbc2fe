"""Reward functions: built-ins, loading user rewards by name, and containing their errors.

A reward function has TRL's signature ``f(prompts, completions, completion_ids, **columns) -> list[float | None]``
(dataset columns such as ``answer`` arrive as keyword lists; None = unscorable). Configs name them by built-in
short name (``exact_match``) or dotted path (``my_pkg.rewards:exact_match`` or ``my_pkg.rewards.exact_match``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


class RewardFunctionError(RuntimeError):
    """A reward function failed on a sample; the message names the function and the sample."""


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the assistant messages of a conversational completion."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role") == "assistant")


def extract_answer(text: str | None) -> str | None:
    """The content of the last ``<answer>...</answer>`` in ``text``, stripped; None when there is none."""
    found = ANSWER_RE.findall(text) if text else []
    return found[-1].strip() if found else None


def final_answer(completion: Any) -> str | None:
    """The last ``<answer>...</answer>`` of a completion, stripped; None when there is none."""
    return extract_answer(completion_text(completion))


def answers_match(predicted: str | None, gold: Any) -> bool:
    """Equal as numbers when both parse as numbers, else as whitespace/case-normalised strings."""
    if predicted is None:
        return False
    try:
        return math.isclose(float(predicted), float(gold), rel_tol=1e-9, abs_tol=1e-9)
    except (TypeError, ValueError):
        return " ".join(predicted.lower().split()) == " ".join(str(gold).lower().split())


def exact_match(completions: list, answer: list, **kwargs: Any) -> list[float]:
    """1.0 when the completion's final ``<answer>`` equals the ``answer`` column, else 0.0."""
    return [float(answers_match(final_answer(c), a)) for c, a in zip(completions, answer, strict=True)]


def answer_format(completions: list, **kwargs: Any) -> list[float]:
    """1.0 when the completion ends with exactly one ``<answer>...</answer>``, else 0.0."""
    return [float(len(ANSWER_RE.findall(completion_text(c))) == 1) for c in completions]


def token_f1(completions: list, answer: list, **kwargs: Any) -> list[float]:
    """Token-level F1 between the final ``<answer>`` and the ``answer`` column (SQuAD-style, lower-cased)."""
    scores = []
    for c, gold in zip(completions, answer, strict=True):
        pred_tokens = (final_answer(c) or "").lower().split()
        gold_tokens = str(gold).lower().split()
        common = sum(min(pred_tokens.count(t), gold_tokens.count(t)) for t in set(pred_tokens))
        if common == 0:
            scores.append(0.0)
            continue
        precision, recall = common / len(pred_tokens), common / len(gold_tokens)
        scores.append(2 * precision * recall / (precision + recall))
    return scores


BUILTIN_REWARDS: dict[str, Callable] = {
    "exact_match": exact_match,
    "answer_format": answer_format,
    "token_f1": token_f1,
}


def load_reward_func(name: str) -> Callable:
    """A reward function by built-in short name or dotted path (``pkg.mod:func`` or ``pkg.mod.func``)."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    module_name, sep, attr = name.partition(":")
    if not sep:
        module_name, _, attr = name.rpartition(".")
    if not module_name:
        raise ValueError(f"Unknown reward function {name!r}. Built-ins: {sorted(BUILTIN_REWARDS)}; or give a dotted "
                         "path such as 'my_pkg.rewards:exact_match'.")
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"Cannot load reward function {name!r}: {err}. Built-ins: {sorted(BUILTIN_REWARDS)}.") from None
    if not callable(func):
        raise ValueError(f"Reward function {name!r} is not callable.")
    return func


def environment_reward(env_cls: type) -> Callable:
    """The reward function that scores each rollout with its environment's ``get_reward()``."""

    def reward(completions: list, environments: list | None = None, **kwargs: Any) -> list[float | None]:
        if environments is None:
            raise RewardFunctionError(f"{env_cls.__name__}.get_reward needs the rollout's environments; none were "
                                      "passed (is the environment configured?)")
        return [env.get_reward() for env in environments]

    reward.__name__ = env_cls.__name__
    return reward


def contain_reward_errors(funcs: list, mode: str = "raise") -> list:
    """Wrap synchronous reward functions so a failure names the function and the sample.

    mode "raise": a raising function, or one returning a wrong-length list or an infinite value, stops the run with
    a RewardFunctionError. mode "nan": the failing samples are scored NaN (unscorable; advantage 0) and counted in
    the ``rewards/<name>/errors`` metric. None/NaN returns are unscorable samples, as in TRL.
    """
    import torch

    return [f if isinstance(f, torch.nn.Module) or inspect.iscoroutinefunction(f) or not callable(f)
            else _contain(f, mode) for f in funcs]


def _contain(func: Callable, mode: str) -> Callable:
    name = getattr(func, "__name__", type(func).__name__)

    @functools.wraps(func)
    def wrapped(prompts=None, completions=None, completion_ids=None, **kwargs):
        n = len(completions)
        batch = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **kwargs}
        # Episodes whose environment reset raised were never played (rlfw.rollout): no reward function sees them.
        played = [i for i, error in enumerate(kwargs.get("reset_error") or [None] * n) if error is None]
        values: list = [None] * n
        failing: list[int] = []
        if played:
            part = batch if len(played) == n else _select(batch, played, n)
            try:
                scored = _checked_call(func, name, part, played)
            except Exception as err:  # noqa: BLE001 - every failure is reported with its sample
                scored, failed = _score_one_by_one(func, part, len(played))
                failing = [played[i] for i in failed]
                if mode == "raise":
                    raise _describe(name, err, failing, completions) from err
            for i, value in zip(played, scored, strict=True):
                values[i] = value
        if mode == "nan" and "log_metric" in kwargs:  # logged every batch, so the curve shows 0 when all went well
            kwargs["log_metric"](f"rewards/{name}/errors", float(len(failing)))
        return values

    return wrapped


def _select(batch: dict, rows: list[int], n: int) -> dict:
    """The per-sample lists of ``batch`` (length n) restricted to ``rows``; other arguments unchanged."""
    return {k: ([v[i] for i in rows] if isinstance(v, list) and len(v) == n else v) for k, v in batch.items()}


def _checked_call(func: Callable, name: str, batch: dict, index: list[int]) -> list:
    """``func(**batch)`` as a list, checked: one value per sample, none infinite (``index``: batch sample numbers)."""
    values = list(func(**batch))
    n = len(batch["completions"])
    if len(values) != n:
        raise RewardFunctionError(f"reward function {name!r} returned {len(values)} values for {n} "
                                  "completions; return exactly one value (or None) per completion.")
    bad = [i for i, v in enumerate(values) if v is not None and math.isinf(float(v))]
    if bad:
        raise RewardFunctionError(f"reward function {name!r} returned {values[bad[0]]} for sample {index[bad[0]]} "
                                  "(infinite rewards would poison the baseline); return a finite value or None.")
    return values


def _score_one_by_one(func: Callable, batch: dict, n: int) -> tuple[list, list[int]]:
    """Call ``func`` one sample at a time: (values with None where it failed, indices of the failing samples)."""
    values, failing = [], []
    for i in range(n):
        try:
            (value,) = _checked_call(func, "", _select(batch, [i], n), [i])
            values.append(value)
        except Exception:  # noqa: BLE001
            values.append(None)
            failing.append(i)
    return values, failing


def _describe(name, err, failing, completions) -> RewardFunctionError:
    if isinstance(err, RewardFunctionError):
        return err
    where = f"sample {failing[0]}" if failing else "the batch"
    detail = ""
    if failing:
        detail = f"\n  completion: {completion_text(completions[failing[0]])[:200]!r}"
    return RewardFunctionError(
        f"reward function {name!r} raised {type(err).__name__}: {err} on {where}.{detail}\n"
        "Fix the function, or set reward_errors: nan to score failing samples NaN and continue."
    )


# ---------------------------------------------------------------- tool-call matching turn rewards (MatchTIR)
# MatchTIR (arXiv 2601.10712): each predicted tool call of a trajectory is scored by the ground-truth call it is
# matched to; a turn's reward is the mean over its calls. For environments whose dataset rows carry ground-truth
# calls ({"name", "arguments"}); rewards reach the `matchtir` estimator as turn_rewards.
ASSIGNMENTS = ("greedy", "hungarian", "ot")
OT_REG = 0.1  # entropic regularisation of the soft assignment (reference code)
OT_MAX_ITERATIONS, OT_TOLERANCE = 1000, 1e-9


def call_arguments(call: dict[str, Any]) -> dict[str, Any] | None:
    """A call's arguments as a dict (given as a dict or a JSON string); None when they do not parse to one."""
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return None
    return arguments if isinstance(arguments, dict) else None


def call_similarity(predicted: dict[str, Any], truth: dict[str, Any]) -> float:
    """S(p, g) in [0, 1]: 0 for different names (case-insensitive) or unparseable arguments, else
    (1 + Jaccard(keys) + #{k in g: p[k] == g[k]}) / (2 + |params_g|), Jaccard 1 when both have no keys."""
    if str(predicted.get("name", "")).lower() != str(truth.get("name", "")).lower():
        return 0.0
    p, g = call_arguments(predicted), call_arguments(truth)
    if p is None or g is None:
        return 0.0
    union = set(p) | set(g)
    jaccard = len(set(p) & set(g)) / len(union) if union else 1.0
    same = sum(1 for key, value in g.items() if key in p and p[key] == value)
    return (1.0 + jaccard + same) / (2.0 + len(g))


def match_calls(predicted: list[dict[str, Any]], truth: list[dict[str, Any]], assignment: str = "greedy") -> list[float]:
    """The reward of each predicted call under the assignment to ground-truth calls.

    "greedy" (the reference code): pairs by similarity, highest first (row-major ties), each call and each truth
    used once, only S > 0; "hungarian": the maximum-similarity one-to-one assignment; "ot": entropic optimal
    transport with uniform marginals and cost -S, a call earning sum_j T_ij S_ij. Unmatched calls get 0.
    """
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment={assignment!r} is not valid; choose one of {list(ASSIGNMENTS)}")
    if not predicted or not truth:
        return [0.0] * len(predicted)
    sim = np.array([[call_similarity(p, g) for g in truth] for p in predicted])  # (P, G)
    if assignment == "ot":
        return (_sinkhorn(sim) * sim).sum(axis=1).tolist()
    rewards = [0.0] * len(predicted)
    if assignment == "hungarian":
        for i, j in zip(*linear_sum_assignment(sim, maximize=True), strict=True):
            rewards[i] = float(sim[i, j])
        return rewards
    used_rows, used_cols = set(), set()
    for flat in np.argsort(-sim, axis=None, kind="stable"):
        i, j = divmod(int(flat), sim.shape[1])
        if sim[i, j] > 0 and i not in used_rows and j not in used_cols:
            rewards[i] = float(sim[i, j])
            used_rows.add(i), used_cols.add(j)
    return rewards


def _sinkhorn(sim: np.ndarray) -> np.ndarray:
    """Entropic OT plan between uniform marginals for cost -sim (Sinkhorn-Knopp iterations). (P, G)"""
    rows, cols = np.full(sim.shape[0], 1 / sim.shape[0]), np.full(sim.shape[1], 1 / sim.shape[1])
    kernel = np.exp(sim / OT_REG)
    u, v = np.ones_like(rows) / len(rows), np.ones_like(cols) / len(cols)
    for _ in range(OT_MAX_ITERATIONS):
        v = cols / (kernel.T @ u)
        u = rows / (kernel @ v)
        plan = u[:, None] * kernel * v[None, :]
        if np.abs(plan.sum(axis=0) - cols).sum() < OT_TOLERANCE:
            break
    return u[:, None] * kernel * v[None, :]


def matched_turn_rewards(turn_calls: list[list[dict[str, Any]]], truth: list[dict[str, Any]],
                         assignment: str = "greedy", answer_score: float | None = None) -> list[float]:
    """Per assistant turn: the mean reward of its tool calls (0 for a turn without calls), matched over all calls
    of the trajectory; with ``answer_score``, the last turn (the final answer) gets that score instead."""
    flat = [call for calls in turn_calls for call in calls]
    rewards = iter(match_calls(flat, truth, assignment))
    per_turn = []
    for calls in turn_calls:
        values = [next(rewards) for _ in calls]
        per_turn.append(sum(values) / len(values) if values else 0.0)
    if answer_score is not None and per_turn:
        per_turn[-1] = float(answer_score)
    return per_turn
