"""``make_rollout_func``: the engine behind TRL's experimental ``rollout_func(prompts, trainer) -> dict`` contract.

Generation backends are chosen from ``ROLLOUT_BACKENDS`` (``rollout_backend`` in RLConfig, checked there), or given as
a factory ``trainer -> Backend`` (``RLTrainer(..., rollout_backend=factory)``, ``register_backend``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rlfw.advantages.fields import rollout_keys
from rlfw.rollout.backends import Backend, HFBackend, VLLMBackend
from rlfw.rollout.engine import STRUCTURE_KEYS, Episode, RolloutEngine
from rlfw.tools.execution import METRIC_KEYS

# Returned per completion besides the token lists: the episode's structure and the batch fields it supplies.
PER_COMPLETION_KEYS = (*STRUCTURE_KEYS, *rollout_keys())

BackendFactory = Callable[[Any], Backend]  # trainer -> Backend


@dataclass(frozen=True)
class RolloutBackend:
    """A registered generation backend: its factory, and whether it runs on TRL's vLLM integration."""

    factory: BackendFactory
    uses_vllm: bool = False  # RLConfig turns use_vllm on (TRL then syncs weights before each rollout)


ROLLOUT_BACKENDS: dict[str, RolloutBackend] = {
    "hf": RolloutBackend(HFBackend.from_trainer),
    "vllm": RolloutBackend(VLLMBackend, uses_vllm=True),
}


def register_backend(name: str, factory: BackendFactory, *, uses_vllm: bool = False) -> None:
    """Make ``factory`` selectable as ``rollout_backend: <name>`` in configs."""
    ROLLOUT_BACKENDS[name] = RolloutBackend(factory, uses_vllm)


def backend_factory(backend: str | BackendFactory) -> BackendFactory:
    """The factory of a registered backend name, or ``backend`` itself when it is a factory."""
    if callable(backend):
        return backend
    if backend not in ROLLOUT_BACKENDS:
        raise ValueError(f"Unknown rollout backend {backend!r}; use one of {sorted(ROLLOUT_BACKENDS)}, or pass a "
                         "factory trainer -> Backend (RLTrainer(..., rollout_backend=factory)).")
    return ROLLOUT_BACKENDS[backend].factory


def _chat_template(trainer: Any) -> str | None:
    """TRL's training-safe template when the tokenizer's own is not prefix-preserving (TRL only does this for tools=)."""
    if getattr(trainer, "chat_template", None) is not None:
        return trainer.chat_template
    try:
        from trl.chat_template_utils import get_training_chat_template, is_chat_template_prefix_preserving

        if not is_chat_template_prefix_preserving(trainer.processing_class):
            return get_training_chat_template(trainer.processing_class)
    except (ImportError, ValueError):
        pass
    return None


def _build_engine(trainer: Any, factory: BackendFactory, **engine_kwargs: Any) -> RolloutEngine:
    generator = factory(trainer)
    accelerator = trainer.accelerator

    def any_active(local: bool) -> bool:
        # Every rank takes part in every turn: collective generation (vLLM server, ZeRO-3/FSDP) needs lockstep.
        if accelerator.num_processes == 1:
            return local
        return bool(accelerator.gather(torch.tensor([int(local)], device=accelerator.device)).any())

    return RolloutEngine(
        trainer.processing_class, generator, max_completion_length=trainer.max_completion_length,
        chat_template=_chat_template(trainer), chat_template_kwargs=getattr(trainer, "chat_template_kwargs", None),
        eos_token_ids=trainer.eos_token_ids, any_active=any_active, contain_reset_errors=True, **engine_kwargs,
    )


def episode_metrics(episodes: list[Episode]) -> dict[str, float]:
    """Local sums: tool outcome counts (``tools/<key>``) and episode totals, to be summed over ranks."""
    counts: Counter = Counter()
    for ep in episodes:
        counts.update(ep.tool_counts)
    sums = {f"tools/{k}": float(counts[k]) for k in METRIC_KEYS}
    sums["episodes"] = float(len(episodes))
    sums["turns"] = float(sum(ep.num_turns for ep in episodes))
    sums["truncated"] = float(sum(ep.truncated for ep in episodes))
    sums["reset_errors"] = float(sum(ep.reset_error is not None for ep in episodes))
    sums["env_tokens"] = float(sum(len(ep.env_mask) - sum(ep.env_mask) for ep in episodes))
    return sums


def log_metrics(trainer: Any, episodes: list[Episode]) -> None:
    """Log globally summed counts into TRL's metric store (TRL gathers only its own metrics)."""
    local = episode_metrics(episodes)
    names = sorted(local)
    values = torch.tensor([local[n] for n in names], dtype=torch.float64, device=trainer.accelerator.device)
    total = dict(zip(names, trainer.accelerator.gather(values[None]).sum(0).tolist(), strict=True))
    max_turns = trainer.accelerator.gather(
        torch.tensor([max((ep.num_turns for ep in episodes), default=0)], device=trainer.accelerator.device)
    ).max().item()
    store = trainer._metrics["train" if trainer.model.training else "eval"]
    for key in METRIC_KEYS:  # counts per generation batch, over all ranks
        store[f"tools/{key}"].append(total[f"tools/{key}"])
    n = max(total["episodes"], 1.0)
    store["tools/calls_per_episode"].append(total["tools/calls"] / n)
    store["tools/failure_rate"].append(total["tools/failures"] / total["tools/calls"] if total["tools/calls"] else 0.0)
    store["turns/mean"].append(total["turns"] / n)
    store["turns/max"].append(float(max_turns))
    store["rollout/truncated_frac"].append(total["truncated"] / n)
    store["rollout/reset_errors"].append(total["reset_errors"])
    store["rollout/env_tokens_per_episode"].append(total["env_tokens"] / n)


def make_rollout_func(env_factory: Callable[[], Any], *, max_turns: int, tool_timeout: float = 30.0,
                      max_tool_result_chars: int = 2000, parser: Any = None, backend: str | BackendFactory = "hf",
                      non_final_turn: str = "continue", format_reminder: str | None = None
                      ) -> Callable[[list, Any], dict[str, list]]:
    """A TRL ``rollout_func(prompts, trainer)`` running the multi-turn engine with one env per completion.

    Rows come from ``trainer.rollout_rows`` (set by RLTrainer before generation) or, under plain GRPOTrainer,
    ``{"prompt": p}``. Env instances are pooled across steps and exposed as ``trainer.environments`` so reward
    functions receive them as ``environments=``. Returned per-completion lists (TRL merges them into the reward
    inputs; ``env_mask`` becomes TRL's ``tool_mask``):

    - ``prompt_ids``, ``completion_ids`` (sampled + env ids), ``logprobs`` (0.0 on env tokens), ``env_mask``
      (1 policy token, 0 env token), ``turn_ids`` (turn index of each policy token, -1 on env tokens)
    - ``num_turns``, ``num_tool_calls``, ``turn_rewards`` (one per turn, NaN = none), ``truncated`` (no final
      answer), ``round_prefix_lens`` (completion length at the start of each turn; first is 0), ``reset_error``
      (None, or why the environment's reset raised: that episode is unscorable)

    ``backend``: a name in ``ROLLOUT_BACKENDS`` ("hf": transformers generate, "vllm": the trainer's vLLM) or a
    factory ``trainer -> Backend``. ``non_final_turn`` / ``format_reminder``: see ``RolloutEngine``.
    """
    if backend == "vllm":
        from rlfw.rollout.backends import require_vllm

        require_vllm()
    factory = backend_factory(backend)
    engines: dict[int, RolloutEngine] = {}
    pool: list[Any] = []

    def rollout_func(prompts: list, trainer: Any) -> dict[str, list]:
        rows = getattr(trainer, "rollout_rows", None) or [{"prompt": p} for p in prompts]
        if len(rows) != len(prompts):
            raise ValueError(f"trainer.rollout_rows has {len(rows)} rows for {len(prompts)} prompts")
        if id(trainer) not in engines:
            engines[id(trainer)] = _build_engine(trainer, factory, max_turns=max_turns, parser=parser,
                                                 tool_timeout=tool_timeout, max_tool_result_chars=max_tool_result_chars,
                                                 non_final_turn=non_final_turn, format_reminder=format_reminder)
        while len(pool) < len(rows):
            pool.append(env_factory())
        envs = pool[: len(rows)]
        episodes = engines[id(trainer)].run(rows, envs, prompts=prompts)
        trainer.environments = list(envs)
        log_metrics(trainer, episodes)
        records = [ep.to_dict() for ep in episodes]
        return {k: [r[k] for r in records] for k in ("prompt_ids", "completion_ids", "logprobs", "env_mask",
                                                      *PER_COMPLETION_KEYS)}

    return rollout_func


