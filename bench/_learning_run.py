"""Parts of one learning.py run: the estimator recorder and held-out episodes through the rollout engine."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

import _common  # noqa: F401  (sets up sys.path and threads)

if TYPE_CHECKING:
    from learning import WarmStart


class Recorder:
    """Wraps an estimator (same name, requires, loss term and state) and records per-step batch statistics."""

    def __init__(self, inner):
        self.inner = inner
        self.steps: list[dict] = []

    def __getattr__(self, name):  # only for attributes Recorder itself lacks: name, requires, loss_term, ...
        return getattr(self.__dict__["inner"], name)

    def __call__(self, batch):
        out = self.inner(batch)
        self.steps.append(batch_stats(batch, out))
        return out


def batch_stats(batch, out) -> dict:
    """What the estimator saw and did in one generation batch (means over completions or groups)."""
    import torch

    from rlfw import ops

    r = batch.rewards
    index, num_groups = ops.group_index(batch.group_ids)
    adv = out.advantages if out.advantages.dim() == 1 else torch.nan_to_num(out.advantages).abs().sum(1)
    kept = out.keep.bool()
    stats = {
        "reward": float(torch.nanmean(r)),
        "tie_rate": float(ops.group_all_equal(r, index, num_groups).float().mean()),
        "zero_adv_frac": float((adv[kept].abs() <= 1e-6).float().mean()),
    }
    if batch.num_tool_calls is not None:
        stats["tool_calls"] = float(batch.num_tool_calls.float().mean())
    if batch.turn_rewards is not None:
        stats["turn_reward_sum"] = float(torch.nansum(batch.turn_rewards, dim=1).mean())
    if batch.truncated is not None:
        stats["truncated"] = float(batch.truncated.float().mean())
    stats.update({f"est/{k}": float(v) for k, v in out.metrics.items()})
    return stats


def episodes_eval(model, tokenizer, rows, env_cls, spec: WarmStart, temperature: float = 0.0, samples: int = 1,
                  seed: int = 0) -> dict:
    """Held-out episodes through the rollout engine: accuracy (mean reward), tool calls, immediate reward; with
    ``samples`` > 1 also pass@samples (best of a prompt's episodes)."""
    import torch

    from rlfw.rewards import extract_answer
    from rlfw.rollout.backends import HFBackend
    from rlfw.rollout.engine import RolloutEngine

    was_training = model.training
    model.eval()
    backend = HFBackend(model, tokenizer, temperature=temperature)
    engine = RolloutEngine(tokenizer, backend, max_turns=spec.max_turns,
                           max_completion_length=spec.max_completion_length, eos_token_ids=backend.eos_ids)
    expanded = [row for row in rows for _ in range(samples)]
    rewards, calls, immediate, answers = [], [], [], []
    with torch.random.fork_rng(), torch.no_grad():  # sampling here must not move the training RNG
        torch.manual_seed(seed)
        for start in range(0, len(expanded), 64):
            chunk = expanded[start:start + 64]
            envs = [env_cls() for _ in chunk]
            for env, ep in zip(envs, engine.run(chunk, envs), strict=True):
                rewards.append(float(env.get_reward()))
                calls.append(ep.num_tool_calls)
                immediate.append(sum(x for x in ep.turn_rewards if not math.isnan(x)))
                answers.append(extract_answer(getattr(env, "final_text", None)))
    model.train(was_training)
    n = max(len(rewards), 1)
    top = Counter(a for a in answers if a is not None).most_common(1)
    out = {"accuracy": sum(rewards) / n, "tool_calls": sum(calls) / n, "immediate": sum(immediate) / n,
           "top_answer_share": top[0][1] / n if top else 0.0}  # near 1: one answer for every prompt (a prior)
    if samples > 1:
        best = [max(rewards[i:i + samples]) for i in range(0, len(rewards), samples)]
        out[f"pass@{samples}"] = sum(best) / len(best)
    return out


def _closeness(text: str, row: dict) -> float:
    """Partial credit in [0, 1]: exp(-|x - gold| / (1 + |gold|)) for the final answer's number x, else 0."""
    from rlfw.rewards import extract_answer

    try:
        x, gold = float((extract_answer(text) or "").replace(",", "")), float(row["answer"])
    except ValueError:
        return 0.0
    return math.exp(-abs(x - gold) / (1.0 + abs(gold))) if math.isfinite(x) else 0.0


def closeness():
    """The partial-credit reward function (added to the environment's 0/1 reward: continuous rewards)."""
    from envs.episode import reward_function

    return reward_function("closeness", _closeness)


EXTRA_REWARDS = {"closeness": closeness}
