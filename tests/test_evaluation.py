"""Held-out evaluation through the rollout engine: the metrics the quickstart reports."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM

from envs import arithmetic, calculator
from rlfw.evaluation import evaluate_model


def same_metrics(a: dict, b: dict) -> bool:
    """Equal dicts, where NaN (a split of accuracy with no episode on one side) equals NaN."""
    return a.keys() == b.keys() and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in
                                        ((a[k], b[k]) for k in a))


def test_multi_turn_evaluation_greedy_and_sampled(tiny_assets, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_assets)
    dataset = calculator.build_dataset(6, seed=0, split="test", style="expression", max_ops=1)
    kwargs = dict(environment="envs.calculator", max_turns=2, max_new_tokens=12)
    greedy = evaluate_model(model, tokenizer, dataset, None, **kwargs)
    assert same_metrics(greedy, evaluate_model(model, tokenizer, dataset, None, **kwargs))  # greedy: deterministic
    torch.manual_seed(0)
    sampled = evaluate_model(model, tokenizer, dataset, None, temperature=1.0, **kwargs)
    torch.manual_seed(0)
    assert same_metrics(sampled, evaluate_model(model, tokenizer, dataset, None, temperature=1.0, **kwargs))  # seeded
    for metrics in (greedy, sampled):
        assert metrics["n"] == 6
        assert set(metrics) >= {"accuracy", "valid_tool_call_rate", "tool_use_rate", "tool_calls_per_episode"}
        assert 0.0 <= metrics["tool_use_rate"] <= 1.0 and 1.0 <= metrics["turns_per_episode"] <= 2.0


def test_single_turn_evaluation_greedy_and_sampled_with_exact_match(tiny_assets, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_assets)
    dataset = arithmetic.build_dataset(6, seed=0, split="test")
    reward = arithmetic.partial_credit
    greedy = evaluate_model(model, tokenizer, dataset, reward, max_new_tokens=8)
    assert greedy == evaluate_model(model, tokenizer, dataset, reward, max_new_tokens=8)
    torch.manual_seed(0)
    sampled = evaluate_model(model, tokenizer, dataset, reward, temperature=1.0, max_new_tokens=8)
    torch.manual_seed(0)
    assert sampled == evaluate_model(model, tokenizer, dataset, reward, temperature=1.0, max_new_tokens=8)
    for metrics in (greedy, sampled):
        assert set(metrics) == {"accuracy", "tagged_answer_rate", "exact_match", "n"} and metrics["n"] == 6
        assert metrics["exact_match"] <= metrics["tagged_answer_rate"]


def test_single_turn_sampling_follows_the_settings_given(tiny_assets, tokenizer, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_assets)
    seen = {}
    generate = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    dataset = arithmetic.build_dataset(2, seed=0, split="test")
    evaluate_model(model, tokenizer, dataset, arithmetic.partial_credit, temperature=0.7, max_new_tokens=4,
                   sampling={"top_p": 0.9})
    # TRL's defaults where not given (top_k 0 = off, not transformers' 50)
    assert seen["do_sample"] and seen["temperature"] == 0.7 and seen["top_p"] == 0.9 and seen["top_k"] == 0
