"""Parts of one learning.py run: the estimator recorder and held-out episodes through the rollout engine."""

from __future__ import annotations

import math
import random
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
        self.trainer = None

    def __getattr__(self, name):  # only for attributes Recorder itself lacks: name, requires, loss_term, ...
        return getattr(self.__dict__["inner"], name)

    def watch(self, trainer) -> None:
        """Read the environment's own reward (the noise-free outcome) of each batch from ``trainer``."""
        self.trainer = trainer

    def __call__(self, batch):
        out = self.inner(batch)
        self.steps.append(batch_stats(batch, out, self._clean_rewards(batch)))
        return out

    def _clean_rewards(self, batch):
        """The environment's reward column (the last reward function): the outcome before any noise or shaping."""
        per_func = getattr(self.trainer, "_rewards_per_func", None)
        if per_func is None or per_func.size(0) != batch.rewards.numel():
            return None
        return per_func[:, -1].to(batch.rewards.device)


def batch_stats(batch, out, clean=None) -> dict:
    """What the estimator saw and did in one generation batch (means over completions or groups). ``clean``: the
    noise-free outcome per completion (the environment's reward), for the mechanism measurements."""
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
    if clean is not None:
        stats.update(mechanism_stats(batch, out, clean, index, num_groups))
    if batch.num_tool_calls is not None:
        stats["tool_calls"] = float(batch.num_tool_calls.float().mean())
    if batch.turn_rewards is not None:
        stats["turn_reward_sum"] = float(torch.nansum(batch.turn_rewards, dim=1).mean())
    if batch.truncated is not None:
        stats["truncated"] = float(batch.truncated.float().mean())
        stats["answered"] = 1.0 - stats["truncated"]
    stats.update({f"est/{k}": float(v) for k, v in out.metrics.items()})
    return stats


def mechanism_stats(batch, out, clean, index, num_groups) -> dict:
    """The preconditions of the mechanism benchmarks, from one batch (keys absent where they do not apply):

    - wrong_sign: among kept rows whose noise-free reward differs from its group's mean, the fraction whose
      advantage has the opposite sign (per-completion advantages only);
    - label_error: fraction of training rewards that differ from the noise-free ones (both 0/1);
    - stratum_gap: over groups with 2+ call-count strata, mean reward of the fewest-call stratum minus the rest's;
    - unlucky_negative: fraction of right answers (noise-free outcome >= 1) given a negative advantage;
    - all_wrong_groups / all_right_groups: fraction of groups whose outcomes are all 0 / all 1 (hard / easy prompts);
    - failing_shaped_share: share of the immediate (turn) reward earned by episodes with outcome < 1;
      failing_shaped_gap: their mean immediate reward per episode minus that of episodes with outcome >= 1.
    """
    import torch

    from rlfw import ops

    r, stats = batch.rewards, {"clean_reward": float(torch.nanmean(clean))}
    tied = ops.group_all_equal(clean, index, num_groups)
    first = clean[ops.group_first_row(index, num_groups)]
    stats["all_wrong_groups"] = float((tied & (first <= 0)).float().mean())
    stats["all_right_groups"] = float((tied & (first >= 1)).float().mean())
    if out.advantages.dim() == 1:
        adv = out.advantages
        centered = clean - ops.group_mean(clean, index, num_groups)[index]
        rows = out.keep.bool() & (centered.abs() > 1e-6)
        if rows.any():
            stats["wrong_sign"] = float((adv[rows] * centered[rows] < -1e-12).float().mean())
        right = clean >= 1
        if right.any():
            stats["unlucky_negative"] = float((adv[right] < -1e-6).float().mean())
    binary = lambda x: bool(((x == 0) | (x == 1)).all())  # noqa: E731
    if binary(r) and binary(clean):
        stats["label_error"] = float((r != clean).float().mean())
    if batch.num_tool_calls is not None:
        calls = batch.num_tool_calls.to(r.dtype)
        fewest = torch.full((num_groups,), float("inf"), dtype=r.dtype).scatter_reduce(0, index, calls, "amin")
        low = calls == fewest[index]
        n_low = ops.group_sum(low.to(r.dtype), index, num_groups)
        n_high = ops.group_count(r, index, num_groups) - n_low
        mixed = (n_low > 0) & (n_high > 0)
        stats["multi_stratum"] = float(mixed.float().mean())
        if mixed.any():
            low_mean = ops.group_sum(torch.where(low, r, 0.0), index, num_groups) / n_low.clamp(min=1)
            high_mean = ops.group_sum(torch.where(low, 0.0, r), index, num_groups) / n_high.clamp(min=1)
            stats["stratum_gap"] = float((low_mean - high_mean)[mixed].mean())
    if batch.turn_rewards is not None:
        shaped, failing = torch.nansum(batch.turn_rewards, dim=1), clean < 1
        if float(shaped.sum()) > 0:
            stats["failing_shaped_share"] = float(shaped[failing].sum() / shaped.sum())
        if failing.any() and (~failing).any():
            stats["failing_shaped_gap"] = float(shaped[failing].mean() - shaped[~failing].mean())
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
    rewards, calls, immediate, answers, answered = [], [], [], [], []
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
                answered.append(answers[-1] is not None)
    model.train(was_training)
    n = max(len(rewards), 1)
    top = Counter(a for a in answers if a is not None).most_common(1)
    out = {"accuracy": sum(rewards) / n, "tool_calls": sum(calls) / n, "immediate": sum(immediate) / n,
           "top_answer_share": top[0][1] / n if top else 0.0,  # near 1: one answer for every prompt (a prior)
           "answered": sum(answered) / n}
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


def closeness(seed: int = 0):
    """The partial-credit reward function (added to the environment's 0/1 reward: continuous rewards)."""
    from envs.episode import reward_function

    return reward_function("closeness", _closeness)


JUDGE_OUTLIER_RATE, JUDGE_OUTLIER_SIZE = 0.15, (2.0, 4.0)


def judge_noise(seed: int = 0):
    """A judge that is exact most of the time and now and then wildly off: added to the 0/1 outcome, 0 with
    probability 0.85, else an outlier of random sign and size uniform in [2, 4] (twice to four times the gap between
    right and wrong). One outlier in a group of three moves the group mean by 2/3 to 4/3, past every other row."""
    rng = random.Random(f"judge-noise-{seed}")

    def judge_noise(completions, **kwargs):
        out = []
        for _ in completions:
            outlier = rng.random() < JUDGE_OUTLIER_RATE
            size, sign = rng.uniform(*JUDGE_OUTLIER_SIZE), rng.choice((-1.0, 1.0))
            out.append(sign * size if outlier else 0.0)
        return out

    return judge_noise


VERIFIER_FP, VERIFIER_FN = 0.2, 0.2


def flipped_verdict(seed: int = 0):
    """A verifier with known error rates: the environment's 0/1 verdict, flipped with probability VERIFIER_FP when it
    is 0 (a false positive) and VERIFIER_FN when it is 1 (a false negative)."""
    rng = random.Random(f"verifier-{seed}")

    def flipped_verdict(completions, environments=None, **kwargs):
        out = []
        for env in environments:
            truth = float(env.get_reward())
            flip = rng.random() < (VERIFIER_FN if truth >= 1 else VERIFIER_FP)
            out.append(1.0 - truth if flip else truth)
        return out

    return flipped_verdict


RETRY_COST = 0.5


def retry_cost(seed: int = 0):
    """-0.5 per busy (flaky) calculate call of the episode: bad luck costs reward."""

    def retry_cost(completions, environments=None, **kwargs):
        return [-RETRY_COST * sum(1 for e in env.tool_events if e.get("busy")) for env in environments]

    return retry_cost


EXTRA_REWARDS = {"closeness": closeness, "judge_noise": judge_noise, "flipped_verdict": flipped_verdict,
                 "retry_cost": retry_cost}
