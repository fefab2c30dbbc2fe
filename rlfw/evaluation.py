"""Held-out evaluation: greedy decoding, scored with the run's reward functions."""

from __future__ import annotations

import torch


@torch.no_grad()
def evaluate_single_turn(model, tokenizer, dataset, reward_func, max_new_tokens: int = 16,
                         batch_size: int = 64) -> dict[str, float]:
    """Greedy single-turn accuracy (mean of ``reward_func``) and the rate of answers in ``<answer>`` tags."""
    from rlfw.rewards import answer_format

    model.eval()
    scores, tagged = [], []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in rows["prompt"]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        out = model.generate(**enc.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        new = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        columns = {k: v for k, v in rows.items() if k != "prompt"}
        completions = [[{"role": "assistant", "content": c}] for c in new]
        scores += reward_func(completions=completions, prompts=rows["prompt"], completion_ids=None, **columns)
        tagged += answer_format(completions)
    n = max(len(scores), 1)
    return {"accuracy": float(sum(s or 0.0 for s in scores) / n), "tagged_answer_rate": sum(tagged) / n,
            "n": len(scores)}


def evaluate_model(model, tokenizer, dataset, reward_func, environment: str | None = None, max_turns: int = 4,
                   max_new_tokens: int = 64, temperature: float = 0.0, sampling: dict | None = None
                   ) -> dict[str, float]:
    """Held-out evaluation: single-turn (greedy), or multi-turn through the rollout engine when ``environment``
    (greedy with ``temperature`` 0, else sampled with ``sampling``'s top_p/top_k/min_p/repetition_penalty, TRL's
    defaults where absent)."""
    if environment is None:
        if temperature:
            raise ValueError("single-turn evaluation is greedy; temperature must be 0")
        return evaluate_single_turn(model, tokenizer, dataset, reward_func, max_new_tokens=max_new_tokens)
    from rlfw.rollout.evaluation import evaluate_episodes

    return evaluate_episodes(model, tokenizer, dataset, reward_func, environment, max_turns=max_turns,
                             max_completion_length=max_new_tokens, temperature=temperature, sampling=sampling)
