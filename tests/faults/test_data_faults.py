"""Faults in what a run is given: a tokenizer without a chat template, a dataset missing a column the estimator or
a reward function needs, and batches left empty by filtering.

The first two fail when RLTrainer is built, before any model loads (the tests pass a model path that does not
exist: loading it would be a different error), with the fix in the message. An empty batch trains nothing: the step
completes with a zero loss, parameters unchanged, and is logged and checkpointed like any other.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import hashed_reward, prompt_rows
from scenarios import AddEnv, all_nan_reward, recording

from rlfw import checkpoint
from rlfw.advantages import AdvantageOutput
from rlfw.advantages.grpo import group_normalized
from rlfw.rewards import exact_match

NO_MODEL = "/nonexistent/model"  # loading it would fail differently: the checks must come first


def dataset(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


def build(args, reward_funcs, rows, tokenizer, model=NO_MODEL, **kwargs):
    from rlfw.trainer import RLTrainer

    return recording(RLTrainer)(model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset(rows),
                                processing_class=tokenizer, **kwargs)


@pytest.fixture
def no_template(tokenizer):
    copy = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    copy.chat_template = None
    return copy


# ---------------------------------------------------------------- start-up errors
def test_tokenizer_without_chat_template(make_config, no_template):
    with pytest.raises(ValueError, match=r"The tokenizer has no chat template, but this run has conversational "
                                         r"prompts \(chat messages\)\. .*set tokenizer\.chat_template"):
        build(make_config(), [hashed_reward], prompt_rows(), no_template)
    with pytest.raises(ValueError, match="runs a multi-turn tool environment"):
        build(make_config(), [], [{"prompt": "2 + 3?"}], no_template, environment_factory=AddEnv)


def test_plain_string_prompts_need_no_chat_template(make_config, no_template, tiny_assets):
    trainer = build(make_config(), [hashed_reward], [{"prompt": f"{i} + 1 ="} for i in range(8)], no_template,
                    model=tiny_assets)
    assert trainer.processing_class.chat_template is None


def test_reward_function_needing_a_missing_column(make_config, tokenizer):
    rows = [{"prompt": row["prompt"]} for row in prompt_rows()]
    with pytest.raises(ValueError, match=r"reward function 'exact_match' needs \['answer'\], which train_dataset does "
                                         r"not have as a column \(columns: \['prompt'\]\)\. Add the column"):
        build(make_config(), [exact_match], rows, tokenizer)


def test_reward_function_needing_environments_without_one(make_config, tokenizer):
    def tool_use_bonus(completions, environments, **kwargs):
        return [float(env.calls) for env in environments]

    with pytest.raises(ValueError, match=r"'tool_use_bonus' needs \['environments'\] \(it is passed only with a "
                                         r"multi-turn environment: set `environment:`\)"):
        build(make_config(), [tool_use_bonus], prompt_rows(), tokenizer)


def test_dataset_without_prompt_column(make_config, tokenizer):
    rows = [{"question": row["prompt"], "answer": row["answer"]} for row in prompt_rows()]
    with pytest.raises(ValueError, match=r"train_dataset has no 'prompt' column \(columns: \['answer', 'question'\]\)\. "
                                         r"Rename the column"):
        build(make_config(), [hashed_reward], rows, tokenizer)


def test_estimator_needing_a_missing_column(make_config, tokenizer):
    rows = [{"prompt": row["prompt"]} for row in prompt_rows()]
    with pytest.raises(ValueError, match=r"advantage_estimator 'igpo' probes .* train_dataset has no 'answer' column"):
        build(make_config(advantage_estimator="igpo"), [], rows, tokenizer, environment_factory=AddEnv)


# ---------------------------------------------------------------- empty batches
class DropAll:
    """grpo advantages with every row dropped (keep=False), as a filter that rejects the whole batch would."""

    name = "drop_all"
    requires = frozenset()

    def __call__(self, batch):
        advantages = group_normalized(batch.rewards, batch.group_ids)  # (N,)
        return AdvantageOutput(advantages, keep=torch.zeros_like(advantages, dtype=torch.bool))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_every_row_dropped_trains_nothing_and_is_logged(tmp_path, make_config, tokenizer, tiny_assets, loss_type):
    args = make_config(max_steps=2, save_strategy="steps", save_steps=1, loss_type=loss_type)
    trainer = build(args, [hashed_reward], prompt_rows(), tokenizer, model=tiny_assets, estimator=DropAll())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.losses == [0.0, 0.0]
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    logs = [e for e in trainer.state.log_history if "reward" in e]
    assert [e["advantages/kept_frac"] for e in logs] == [0.0, 0.0] and [e["loss"] for e in logs] == [0.0, 0.0]
    assert checkpoint.latest_checkpoint(tmp_path / "out") == str(tmp_path / "out" / "checkpoint-2")


def test_all_rewards_unscorable_trains_nothing(make_config, tokenizer, tiny_assets):
    trainer = build(make_config(max_steps=2), [all_nan_reward], prompt_rows(), tokenizer, model=tiny_assets)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.losses == [0.0, 0.0]
    for _, result, _ in trainer.applied:
        assert (result.advantages == 0).all()
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]  # logged as missing, not a number
    assert len(rewards) == 2 and all(r is None or math.isnan(r) for r in rewards)
