"""Environment and tool faults during real training steps (scripted policy, real engine, trainer and loss).

None of them stops the run: a reset that raises fails only its episode (scored NaN, counted in
rollout/reset_errors, a warning names the environment and the error); a hung tool and a tool that returns megabytes
become bounded observations (tools/timeouts, tools/truncated); an episode that runs out of tokens in the middle of
a tool call is truncated and the half-written call is never run.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import prompt_rows
from scenarios import RELEASE, AddEnv, FloodingEnv, HangingEnv, recording, scripted, tool_call


@pytest.fixture(autouse=True)
def _release_hung_tools():
    RELEASE.clear()
    yield
    RELEASE.set()  # abandoned tool threads end with the test


def run(tiny_assets, tokenizer, args, env, rows=None, first=None):
    from datasets import Dataset

    from rlfw.trainer import RLTrainer

    trainer = recording(RLTrainer)(model=tiny_assets, reward_funcs=[], args=args, environment_factory=env,
                                   rollout_backend=scripted(first) if first is not None else None,
                                   train_dataset=Dataset.from_list(rows or prompt_rows()), processing_class=tokenizer)
    trainer.train()
    return trainer


def episode_texts(trainer, tokenizer) -> list[str]:
    """Every trained episode's completion (policy and tool-result tokens) as text."""
    return [tokenizer.decode(ids[mask.bool()]) for _, _, out in trainer.applied
            for ids, mask in zip(out["completion_ids"], out["completion_mask"], strict=True)]


def logged(trainer, key: str) -> list[float]:
    return [e[key] for e in trainer.state.log_history if "reward" in e]


def test_reset_that_raises_fails_only_its_episodes(tiny_assets, tokenizer, make_config, caplog):
    rows = [{**row, "bad_row": i == 0} for i, row in enumerate(prompt_rows(2))]  # every batch holds both rows
    args = make_config(max_steps=2, per_device_train_batch_size=8, max_turns=2, max_completion_length=64)
    with caplog.at_level("WARNING", logger="rlfw.rollout.engine"):
        trainer = run(tiny_assets, tokenizer, args, AddEnv, rows, first=tool_call("add", a=2, b=3))
    assert trainer.state.global_step == 2
    assert logged(trainer, "rollout/reset_errors") == [4.0, 4.0]
    assert "AddEnv.reset raised KeyError: 'document_id'" in caplog.text and "Fix reset() or the row" in caplog.text
    for batch, result, out in trainer.applied:
        failed = torch.isnan(batch.rewards)  # (N,) the bad row's 4 episodes, unscorable
        assert failed.sum() == 4 and (batch.rewards[~failed] == 1.0).all()  # the others called the tool once
        assert (result.advantages[failed] == 0).all()
        assert (out["completion_mask"] * out["tool_mask"])[failed].sum() == 0  # nothing of them is trained on


def test_hung_tool_times_out_and_the_step_goes_on(tiny_assets, tokenizer, make_config):
    args = make_config(max_steps=2, max_turns=2, max_completion_length=64, tool_timeout=0.3)
    start = time.monotonic()
    trainer = run(tiny_assets, tokenizer, args, HangingEnv, first=tool_call("wait", seconds=60))
    assert time.monotonic() - start < 30
    assert logged(trainer, "tools/timeouts") == [4.0, 4.0] and logged(trainer, "turns/mean") == [2.0, 2.0]
    for text in episode_texts(trainer, tokenizer):  # what the model read after its call
        assert "Error: tool 'wait' exceeded the 0.3 s timeout." in text


def test_tool_output_of_megabytes_is_truncated(tiny_assets, tokenizer, make_config):
    args = make_config(max_steps=1, max_turns=2, max_completion_length=256, max_tool_result_chars=100)
    trainer = run(tiny_assets, tokenizer, args, FloodingEnv, first=tool_call("dump", size=8_000_000))
    assert logged(trainer, "tools/truncated") == [4.0] and logged(trainer, "turns/mean") == [2.0]
    (_, _, out), = trainer.applied
    env_tokens = (out["completion_mask"] * (1 - out["tool_mask"])).sum(1)  # (N,) tool-result tokens per episode
    assert (env_tokens > 0).all() and (env_tokens < 200).all()
    for text in episode_texts(trainer, tokenizer):
        assert "x" * 100 + "... [truncated 7999900 chars]" in text and "x" * 101 not in text


def test_token_budget_ending_inside_a_tool_call_truncates_the_episode(tiny_assets, tokenizer, make_config):
    long_call = tool_call("add", a=123456789, b=987654321)
    assert len(tokenizer.encode(long_call, add_special_tokens=False)) > 12
    args = make_config(max_steps=2, max_turns=3, max_completion_length=12)
    trainer = run(tiny_assets, tokenizer, args, AddEnv, first=long_call)
    assert trainer.state.global_step == 2
    assert logged(trainer, "tools/calls") == [0.0, 0.0]  # the half-written call never ran
    assert logged(trainer, "rollout/truncated_frac") == [1.0, 1.0]
    for batch, _, out in trainer.applied:
        assert batch.truncated.all() and (batch.num_turns == 1).all()
        assert (out["completion_mask"].sum(1) == 12).all()  # exactly the budget, all policy tokens


class EndAtOnce:
    """A backend that answers every turn with EOS alone."""

    def __init__(self, tokenizer):
        self.eos = tokenizer.eos_token_id

    def generate(self, prompts, max_new_tokens):
        return [([self.eos], [0.0]) for _ in prompts]


def test_reset_errors_are_contained_only_when_training(tokenizer):
    from rlfw.rollout import RolloutEngine

    rows = [{**row, "bad_row": i == 0} for i, row in enumerate(prompt_rows(2))]
    engine = RolloutEngine(tokenizer, EndAtOnce(tokenizer), max_turns=2, max_completion_length=8)
    with pytest.raises(KeyError, match="document_id"):  # evaluation and `rlfw rollout` see the real error
        engine.run(rows, [AddEnv(), AddEnv()])
    engine.contain_reset_errors = True  # what make_rollout_func (training) sets
    failed, played = engine.run(rows, [AddEnv(), AddEnv()])
    assert failed.reset_error == "KeyError: 'document_id'" and played.reset_error is None
    assert failed.completion_ids == [tokenizer.eos_token_id] and failed.env_mask == [0] and failed.truncated
    assert failed.num_turns == 1 and played.num_turns == 1 and played.env_mask == [1]
