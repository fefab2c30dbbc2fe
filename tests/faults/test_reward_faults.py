"""Reward functions that raise, or return NaN / None / inf / the wrong number of values.

reward_errors: raise (default) stops the run with a RewardFunctionError naming the function and the sample and
saying how to fix it; the checkpoints and logs written before stay intact. reward_errors: nan scores the failing
samples NaN (advantage 0), counts them in rewards/<name>/errors and goes on. NaN and None are "unscorable", as in
TRL: those samples get advantage 0 and the others are normalised among themselves.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import hashed_reward, prompt_rows
from scenarios import (
    half_nan_reward,
    half_none_reward,
    infinite_reward,
    poisoned,
    recording,
    short_reward,
)

from rlfw import checkpoint
from rlfw.rewards import RewardFunctionError, contain_reward_errors

COMPLETIONS = ["a", "bb", "ccc", "dddd"]


def poisoned_dataset(poison: bool = True):
    from datasets import Dataset

    return Dataset.from_list([{**row, "poison": poison} for row in prompt_rows()])


def train(tiny_assets, tokenizer, args, reward_funcs, dataset=None):
    from rlfw.trainer import RLTrainer

    trainer = recording(RLTrainer)(model=tiny_assets, reward_funcs=reward_funcs, args=args,
                                   train_dataset=dataset or poisoned_dataset(), processing_class=tokenizer)
    trainer.train()
    return trainer


# ---------------------------------------------------------------- the wrapper, one fault at a time
@pytest.mark.parametrize(
    ("func", "message"),
    [
        (poisoned(), r"reward function 'poisoned_reward' raised ValueError: cannot parse a number from 'a' on sample 0"
                     r"\.\n  completion: 'a'\nFix the function, or set reward_errors: nan to score failing samples NaN"),
        (infinite_reward, r"reward function 'infinite_reward' returned inf for sample 0 \(infinite rewards would "
                          r"poison the baseline\); return a finite value or None"),
        (short_reward, r"reward function 'short_reward' returned 3 values for 4 completions; return exactly one value "
                       r"\(or None\) per completion"),
    ],
)
def test_failing_reward_raises_naming_function_and_sample(func, message):
    (wrapped,) = contain_reward_errors([func], "raise")
    with pytest.raises(RewardFunctionError, match=message):
        wrapped(prompts=["p"] * 4, completions=COMPLETIONS, completion_ids=[[1]] * 4, poison=[True] * 4)


@pytest.mark.parametrize(
    ("func", "expected"),
    [
        (poisoned(), [None, None, None, None]),
        (infinite_reward, [None, *hashed_reward(COMPLETIONS)[1:]]),  # only the infinite sample is lost
        (short_reward, [None, None, None, None]),  # each sample alone returns 0 values: all fail
    ],
)
def test_failing_reward_in_nan_mode_scores_nan_and_counts(func, expected):
    logged = []
    (wrapped,) = contain_reward_errors([func], "nan")
    values = wrapped(prompts=["p"] * 4, completions=COMPLETIONS, completion_ids=[[1]] * 4, poison=[True] * 4,
                     log_metric=lambda name, value: logged.append((name, value)))
    assert values == expected
    assert logged == [(f"rewards/{func.__name__}/errors", float(expected.count(None)))]


def test_nan_and_none_pass_through_as_unscorable():
    for func in (half_none_reward, half_nan_reward):
        (wrapped,) = contain_reward_errors([func], "raise")
        values = wrapped(prompts=["p"] * 4, completions=COMPLETIONS, completion_ids=[[1]] * 4)
        assert [v is None or math.isnan(v) for v in values] == [True, False, True, False]


# ---------------------------------------------------------------- in a training run
def test_raising_reward_stops_the_run_and_keeps_earlier_checkpoints(tmp_path, tiny_assets, tokenizer, make_config):
    args = make_config(max_steps=3, save_strategy="steps", save_steps=1)
    with pytest.raises(RewardFunctionError, match=r"(?s)'poisoned_reward' raised ValueError: cannot parse a number .* on "
                                                  r"sample 0\..*set reward_errors: nan"):
        train(tiny_assets, tokenizer, args, [poisoned(from_step=1)])
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-1"]  # step 2 never finished
    assert checkpoint.incomplete_reason(out / "checkpoint-1") is None
    history = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "reward" in e] == [1]


def test_nan_mode_run_completes_and_counts_errors(tiny_assets, tokenizer, make_config):
    args = make_config(max_steps=2, reward_errors="nan")
    trainer = train(tiny_assets, tokenizer, args, [hashed_reward, poisoned()])
    logs = [e for e in trainer.state.log_history if "reward" in e]
    assert [e["rewards/poisoned_reward/errors"] for e in logs] == [4.0, 4.0]  # every sample, every step
    assert all(math.isfinite(e["reward"]) for e in logs)  # the healthy function still scores the batch
    for batch, _, _ in trainer.applied:
        assert torch.isfinite(batch.rewards).all()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("func", [half_none_reward, half_nan_reward])
def test_unscorable_samples_get_zero_advantage(tiny_assets, tokenizer, make_config, func):
    trainer = train(tiny_assets, tokenizer, make_config(max_steps=2), [func])
    for batch, result, _ in trainer.applied:
        unscorable = torch.isnan(batch.rewards)  # (N,)
        assert unscorable.tolist() == [True, False, True, False]
        assert (result.advantages[unscorable] == 0).all() and torch.isfinite(result.advantages).all()
    assert all(math.isfinite(loss) for loss in trainer.losses)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
