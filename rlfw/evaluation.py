"""Held-out evaluation: greedy decoding, scored with the run's reward functions."""

from __future__ import annotations

import torch


@torch.no_grad()
def evaluate_single_turn(model, tokenizer, dataset, reward_func, max_new_tokens: int = 16,
                         batch_size: int = 64, temperature: float = 0.0, sampling: dict | None = None
                         ) -> dict[str, float]:
    """Single-turn accuracy (mean of ``reward_func``), the rate of answers in ``<answer>`` tags, and (with an
    ``answer`` column) the exact-match rate of those tagged answers. Greedy with ``temperature`` 0, else sampled
    with ``sampling``'s top_p/top_k/min_p/repetition_penalty (TRL's defaults where absent; seed torch first)."""
    from rlfw.rewards import answer_format, exact_match
    from rlfw.rollout.backends import generation_sampling, sampling_defaults

    model.eval()
    if temperature:
        decoding = {"do_sample": True, **generation_sampling({**sampling_defaults(), **(sampling or {}),
                                                              "temperature": temperature})}
    else:
        decoding = {"do_sample": False}
    scores, tagged, exact = [], [], []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in rows["prompt"]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        out = model.generate(**enc.to(model.device), max_new_tokens=max_new_tokens, **decoding,
                             pad_token_id=tokenizer.pad_token_id)
        new = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        columns = {k: v for k, v in rows.items() if k != "prompt"}
        completions = [[{"role": "assistant", "content": c}] for c in new]
        scores += reward_func(completions=completions, prompts=rows["prompt"], completion_ids=None, **columns)
        tagged += answer_format(completions)
        if "answer" in columns:
            exact += exact_match(completions, columns["answer"])
    n = max(len(scores), 1)
    metrics = {"accuracy": float(sum(s or 0.0 for s in scores) / n), "tagged_answer_rate": sum(tagged) / n}
    if exact:
        metrics["exact_match"] = sum(exact) / n
    return {**metrics, "n": len(scores)}


def evaluate_model(model, tokenizer, dataset, reward_func, environment: str | None = None, max_turns: int = 4,
                   max_new_tokens: int = 64, temperature: float = 0.0, sampling: dict | None = None,
                   reuse_kv_cache: bool = True) -> dict[str, float]:
    """Held-out evaluation: single-turn (greedy), or multi-turn through the rollout engine when ``environment``
    (greedy with ``temperature`` 0, else sampled with ``sampling``'s top_p/top_k/min_p/repetition_penalty, TRL's
    defaults where absent)."""
    if environment is None:
        return evaluate_single_turn(model, tokenizer, dataset, reward_func, max_new_tokens=max_new_tokens,
                                    temperature=temperature, sampling=sampling)
    from rlfw.rollout.evaluation import evaluate_episodes

    return evaluate_episodes(model, tokenizer, dataset, reward_func, environment, max_turns=max_turns,
                             max_completion_length=max_new_tokens, temperature=temperature, sampling=sampling,
                             reuse_kv_cache=reuse_kv_cache)
