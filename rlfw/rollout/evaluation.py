"""Held-out multi-turn evaluation through the rollout engine (greedy decoding, no training)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from rlfw.environment import resolve_environment
from rlfw.rollout.backends import HFBackend, sampling_defaults
from rlfw.rollout.engine import RolloutEngine


@torch.no_grad()
def evaluate_episodes(model: Any, tokenizer: Any, dataset: Any, reward_func: Any, environment: str | type,
                      max_turns: int = 4, max_completion_length: int = 128, batch_size: int = 64,
                      temperature: float = 0.0, sampling: dict[str, Any] | None = None,
                      reuse_kv_cache: bool = True) -> dict[str, float]:
    """Accuracy (mean episode reward from the environment), tool-call statistics and turns per episode.

    The valid-tool-call rate is the fraction of tool calls that parsed, named a known tool with fitting arguments,
    and ran without error; the tool-use rate is the fraction of episodes with at least one call (accuracy is also
    split by episodes with and without a call). ``temperature`` 0
    decodes greedily; above 0 it samples (seed torch for repeatable numbers) with ``sampling``'s top_p, top_k, min_p
    and repetition_penalty (TRL's defaults where absent), so a run's training policy is what gets evaluated.
    ``reuse_kv_cache``: see ``HFBackend(reuse_cache=...)``.
    """
    env_cls = resolve_environment(environment) if isinstance(environment, str) else environment
    model.eval()
    backend = HFBackend(model, tokenizer, **{**sampling_defaults(), **(sampling or {}), "temperature": temperature},
                        reuse_cache=reuse_kv_cache)
    engine = RolloutEngine(tokenizer, backend, max_turns=max_turns, max_completion_length=max_completion_length,
                           eos_token_ids=backend.eos_ids)
    rewards, counts, turns, used = [], Counter(), [], []
    for start in range(0, len(dataset), batch_size):
        rows = [dict(dataset[i]) for i in range(start, min(start + batch_size, len(dataset)))]
        envs = [env_cls() for _ in rows]
        for env, episode in zip(envs, engine.run(rows, envs), strict=True):
            rewards.append(float(env.get_reward()))
            counts.update(episode.tool_counts)
            turns.append(episode.num_turns)
            used.append(episode.tool_counts["calls"] > 0)
    calls, n = counts["calls"], max(len(rewards), 1)
    with_tool = [r for r, u in zip(rewards, used, strict=True) if u]
    without = [r for r, u in zip(rewards, used, strict=True) if not u]
    return {
        "accuracy": sum(rewards) / n,
        "valid_tool_call_rate": (calls - counts["failures"]) / calls if calls else 0.0,
        "tool_use_rate": sum(used) / n,
        "tool_calls_per_episode": calls / n,
        # accuracy split by whether the episode called a tool (NaN when no episode falls on that side)
        "accuracy_with_tool": sum(with_tool) / len(with_tool) if with_tool else float("nan"),
        "accuracy_without_tool": sum(without) / len(without) if without else float("nan"),
        "turns_per_episode": sum(turns) / max(len(turns), 1),
        "n": len(rewards),
    }
