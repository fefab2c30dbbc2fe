"""Generation backends: token ids in, sampled token ids and their log-probs out.

``generate(prompts, max_new_tokens)`` takes one list of token ids per active rollout (prompt + completion so far)
and a per-rollout token budget; it returns, per rollout, ``(new_ids, logprobs)``: the sampled ids up to and
including the first EOS (or up to the budget) and the sampling log-prob of each. Sampling draws from torch's global
RNG (HF) so a checkpoint's RNG state makes a resumed run sample the same tokens.

A backend may also have ``release()``: the engine calls it when a batch of episodes is over (the HF backend then drops
the key/value states it kept between turns).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Protocol

import torch

GenerateOutput = list[tuple[list[int], list[float]]]


class Backend(Protocol):
    def generate(self, prompts: list[list[int]], max_new_tokens: Sequence[int] | int) -> GenerateOutput: ...


def _budgets(prompts: list, max_new_tokens: Sequence[int] | int) -> list[int]:
    if isinstance(max_new_tokens, int):
        return [max_new_tokens] * len(prompts)
    return list(max_new_tokens)


def _cut(ids: Sequence[int], logprobs: Sequence[float], budget: int, eos_ids: set[int]) -> tuple[list, list]:
    """Keep ids up to and including the first EOS, at most ``budget`` of them."""
    ids = list(ids)[:budget]
    end = next((i + 1 for i, t in enumerate(ids) if t in eos_ids), len(ids))
    return ids[:end], [float(x) for x in list(logprobs)[:end]]


def sampling_defaults() -> dict[str, Any]:
    """TRL's sampling settings as GRPOConfig defaults them: what a backend built outside a trainer must use to sample
    the policy the trainer trains."""
    from trl import GRPOConfig

    fields = GRPOConfig.__dataclass_fields__
    return {k: fields[k].default for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}


def generation_sampling(sampling: dict[str, Any]) -> dict[str, Any]:
    """Sampling kwargs for transformers' ``GenerationConfig``, stated in full.

    A setting left out (or None) is not "off" there: transformers falls back to its own defaults, e.g. top_k 50, so
    the sampled policy would not be the one trained. TRL's meaning of the values is kept: top_k 0 and min_p None mean
    disabled, top_p 1.0 keeps every token.
    """
    out = {"temperature": sampling["temperature"], "top_p": 1.0 if sampling["top_p"] is None else sampling["top_p"],
           "top_k": sampling["top_k"] or 0,
           "repetition_penalty": 1.0 if sampling["repetition_penalty"] is None else sampling["repetition_penalty"]}
    if sampling.get("min_p") is not None:
        out["min_p"] = sampling["min_p"]
    return out


class HFBackend:
    """transformers ``generate`` with left padding; log-probs from the processed scores (after temperature/top-k/p).

    Sampling settings default to TRL's (GRPOConfig: temperature 1.0, top_p 1.0, top_k 0 = off, min_p None = off,
    repetition_penalty 1.0); temperature 0 decodes greedily.

    ``reuse_cache`` (default on): keep each sequence's key/value states between turns (``PrefixCache``) and forward
    only the tokens a turn adds, so a turn's cost does not grow with the conversation. Off recomputes the whole
    prefix every turn (the same tokens and log-probs up to float rounding; for debugging).
    """

    def __init__(self, model: Any, tokenizer: Any, *, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int | None = 0, min_p: float | None = None, repetition_penalty: float = 1.0,
                 eos_token_ids: Sequence[int] | None = None, trainer: Any = None, reuse_cache: bool = True):
        from .kv_cache import PrefixCache

        self.model, self.tokenizer, self.trainer = model, tokenizer, trainer
        self.cache = PrefixCache() if reuse_cache else None
        eos = list(eos_token_ids or [])
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos += gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
        self.eos_ids = sorted(set(eos) | {tokenizer.eos_token_id})
        self.sampling = generation_sampling({"temperature": temperature, "top_p": top_p, "top_k": top_k,
                                             "min_p": min_p, "repetition_penalty": repetition_penalty})

    @classmethod
    def from_trainer(cls, trainer: Any) -> HFBackend:
        """Sampling settings and EOS ids from a TRL GRPOTrainer; generation runs on its (unwrapped) model."""
        return cls(trainer.model, trainer.processing_class, temperature=trainer.temperature, top_p=trainer.top_p,
                   top_k=trainer.top_k, min_p=trainer.min_p, repetition_penalty=trainer.repetition_penalty,
                   eos_token_ids=trainer.eos_token_ids, trainer=trainer,
                   reuse_cache=getattr(trainer.args, "reuse_kv_cache", True))

    def release(self) -> None:
        """Drop the key/value states kept between turns (the engine calls this when its episodes are over)."""
        if self.cache is not None:
            self.cache.clear()

    @contextlib.contextmanager
    def _model(self):
        if self.trainer is None:
            yield self.model
            return
        from trl.models import unwrap_model_for_generation

        t = self.trainer
        with (
            unwrap_model_for_generation(t.model_wrapped, t.accelerator,
                                        gather_deepspeed3_params=t.args.ds3_gather_for_generation,
                                        gradient_checkpointing_kwargs=t.args.gradient_checkpointing_kwargs) as model,
            t._dist.summon_full_params(t.model_wrapped, recurse=False),
        ):
            yield model

    def generate(self, prompts: list[list[int]], max_new_tokens: Sequence[int] | int) -> GenerateOutput:
        from transformers import GenerationConfig

        from .kv_cache import PrefixCache, gqa_attention

        budgets = _budgets(prompts, max_new_tokens)
        hits = self.cache.take(prompts) if self.cache is not None else [None] * len(prompts)
        # entered even when there is nothing to generate: FSDP's summon is collective
        with self._model() as model, torch.no_grad(), gqa_attention(model):
            if not prompts:
                return []
            device = next(model.parameters()).device
            width, cached = PrefixCache.layout(prompts, hits)
            past = self.cache.past(prompts, hits, cached, model.config, max(budgets)) if self.cache else None
            del hits  # the last call's states are copied into ``past``: free them before generate grows a new cache
            pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
            input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            greedy = self.sampling["temperature"] == 0  # temperature 0 = greedy decoding (evaluation)
            sampling = {} if greedy else self.sampling
            config = GenerationConfig(
                do_sample=not greedy, max_new_tokens=max(budgets), eos_token_id=self.eos_ids, pad_token_id=pad_id,
                output_scores=True, return_dict_in_generate=True, disable_compile=True, **sampling,
            )
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                 **({"past_key_values": past} if past is not None else {}))
        new = out.sequences[:, width:]  # (B, S)
        # Log-prob of each sampled token under the processed logits it was sampled from, one step at a time: stacking
        # out.scores would add (B, S, V) copies on top of the scores generate already holds.
        logprobs = torch.stack([torch.log_softmax(step.float(), dim=-1).gather(-1, new[:, t: t + 1]).squeeze(-1)
                                for t, step in enumerate(out.scores)], dim=1)  # (B, S)
        eos = set(self.eos_ids)
        results = [_cut(ids, lps, b, eos) for ids, lps, b in zip(new.tolist(), logprobs.tolist(), budgets, strict=True)]
        if self.cache is not None:
            tail = width - cached
            self.cache.stats["reused_tokens"] += sum(max(len(p) - tail, 0) for p in prompts)
            self.cache.stats["forwarded_tokens"] += sum(min(len(p), tail) for p in prompts)
            # the last sampled token of the longest row was never forwarded: the cache holds S - 1 generated columns
            steps = new.shape[1] - 1
            self.cache.keep(getattr(out, "past_key_values", None), prompts, width, [ids[:steps] for ids, _ in results])
        return results

def require_vllm() -> None:
    """Raise an ImportError with the install command when vLLM is missing."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise ImportError("The vLLM rollout backend needs vLLM: pip install 'rlfw[vllm]'") from e


class VLLMBackend:
    """Generation through the trainer's own vLLM integration (``trainer.vllm_generation``, colocate or server).

    TRL has already synced the weights before ``rollout_func`` runs. Its helper samples ``max_completion_length``
    tokens for every prompt, so the budget is set to the largest per-rollout budget and each output is cut to its own.
    """

    def __init__(self, trainer: Any):
        require_vllm()
        if getattr(trainer, "vllm_generation", None) is None:
            raise ValueError("backend='vllm' needs a trainer created with use_vllm=True")
        self.trainer = trainer
        self.generation = trainer.vllm_generation
        self.eos_ids = set(trainer.eos_token_ids)
        # Server mode gathers prompts of all ranks, and TP colocate gathers within its group: all must call.
        self.collective = self.generation.mode == "server" or getattr(self.generation, "tensor_parallel_size", 1) > 1

    def generate(self, prompts: list[list[int]], max_new_tokens: Sequence[int] | int) -> GenerateOutput:
        if not prompts and not self.collective:
            return []
        budgets = _budgets(prompts, max_new_tokens)
        limit = max(budgets, default=1)
        if self.collective and self.trainer.accelerator.num_processes > 1:  # the main process samples for all ranks
            limit = int(self.trainer.accelerator.gather(torch.tensor([limit], device=self.trainer.accelerator.device)).max())
        previous = self.generation.max_completion_length
        self.generation.max_completion_length = limit
        try:
            _, ids, logprobs, _ = self.generation.generate(prompts=prompts, images=None, num_generations=1)
        finally:
            self.generation.max_completion_length = previous
        top1 = [[lp[0] for lp in seq] for seq in logprobs]  # vLLM returns top-k per token; the first is the sample's
        return [_cut(i, lp, b, self.eos_ids) for i, lp, b in zip(ids, top1, budgets, strict=True)]
