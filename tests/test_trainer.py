"""RLTrainer integration tests with the real trainer, tiny local model and tokenizer on CPU.

Covered: grpo parity with TRL (1 and 2 processes), (N, K) advantages reaching the right tokens (single- and
multi-turn), keep=False rows leaving the loss, exact resume with estimator state (1 and 2 processes, and through
the recipe), LoRA, offline wandb.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TORCHRUN_2, AddEnv, hashed_reward, prompt_rows, run_two_ranks, scripted, tool_call
from mp_worker import parity_run, resume_runs

from rlfw.advantages import AdvantageBatch, AdvantageOutput
from rlfw.advantages.grpo import group_normalized
from rlfw.checkpoint import STATE_FILE
from rlfw.trainer import RLTrainer

TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------- parity with TRL
def test_grpo_advantages_equal_trl(tmp_path, tiny_assets):
    recorded = parity_run(tiny_assets, tmp_path / "out", max_steps=3, per_device_train_batch_size=8)
    assert len(recorded) == 3
    for step in recorded:
        trl, ours = torch.tensor(step["trl"]), torch.tensor(step["rlfw"])  # (N,) two groups of 4
        assert trl.shape == ours.shape == (8,)
        torch.testing.assert_close(ours, trl, atol=1e-6, rtol=0)
    assert any(abs(a) > 0.1 for step in recorded for a in step["rlfw"]), "rewards never varied within a group"


def test_parameters_change(tmp_path, tiny_assets, tokenizer, dataset, make_config):
    trainer = RLTrainer(model=tiny_assets, reward_funcs=[hashed_reward], args=make_config(max_steps=1),
                        train_dataset=dataset, processing_class=tokenizer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) > len(before) // 2
    logged = trainer.state.log_history[0]
    assert logged["advantages/kept_frac"] == 1.0 and "advantages/grpo/abs_mean" in logged


# ---------------------------------------------------------------- estimator output reaches the loss
class TurnEstimator:
    """(N, K) advantages 10 * row + turn + 1: every (row, turn) value is distinct and non-zero."""

    name = "turns"
    requires = frozenset()

    def __call__(self, batch: AdvantageBatch) -> AdvantageOutput:
        n = batch.rewards.numel()
        k = int(batch.num_turns.max()) if batch.num_turns is not None else 1
        adv = 10.0 * torch.arange(n)[:, None] + torch.arange(k)[None, :] + 1.0  # (N, K)
        return AdvantageOutput(adv)


class KeepEstimator:
    """grpo advantages, with the first completion of every group dropped from the loss."""

    name = "keep_test"
    requires = frozenset()

    def __call__(self, batch: AdvantageBatch) -> AdvantageOutput:
        adv = group_normalized(batch.rewards, batch.group_ids) + 0.25 * torch.arange(batch.rewards.numel())  # (N,)
        keep = torch.arange(batch.rewards.numel()) % 4 != 0
        return AdvantageOutput(adv, keep=keep)


class StashingTrainer(RLTrainer):
    """Keeps what the estimator returned, the batch handed to the loss, and the loss itself."""

    def _apply_advantages(self, inputs, output, batch, result):
        super()._apply_advantages(inputs, output, batch, result)
        self.applied.append((batch, result, {k: v for k, v in output.items() if isinstance(v, torch.Tensor)}))

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        self.losses.append(loss.item())
        return loss


def stashing_trainer(tiny_assets, tokenizer, args, **kwargs) -> StashingTrainer:
    from datasets import Dataset

    trainer = StashingTrainer(model=tiny_assets, reward_funcs=[hashed_reward], args=args,
                              train_dataset=Dataset.from_list(prompt_rows()), processing_class=tokenizer, **kwargs)
    trainer.applied, trainer.losses = [], []
    return trainer


def test_single_column_advantages_reach_every_policy_token(tmp_path, tiny_assets, tokenizer, make_config):
    trainer = stashing_trainer(tiny_assets, tokenizer, make_config(max_steps=1), estimator=TurnEstimator())
    trainer.train()
    (_, result, out), = trainer.applied
    assert result.advantages.shape == (4, 1)
    mask = out["completion_mask"].bool()
    expected = torch.where(mask, result.advantages[:, :1].expand_as(mask), torch.zeros(()))  # (N, T)
    assert torch.equal(out["advantages"], expected)


def test_per_turn_advantages_reach_policy_tokens_only(tmp_path, tiny_assets, tokenizer, make_config):
    args = make_config(max_steps=1, max_turns=3, max_completion_length=64)
    trainer = stashing_trainer(tiny_assets, tokenizer, args, estimator=TurnEstimator(), environment_factory=AddEnv,
                               rollout_backend=scripted(tool_call("add", a=2, b=3)))
    trainer.train()
    (batch, result, out), = trainer.applied
    assert batch.num_turns.tolist() == [2, 2, 2, 2] and batch.num_tool_calls.tolist() == [1, 1, 1, 1]
    assert result.advantages.shape == (4, 2)
    turn_ids, mask = out["rlfw_turn_ids"], out["completion_mask"].bool()
    policy = mask & out["tool_mask"].bool()
    env_tokens = mask & ~out["tool_mask"].bool()
    assert env_tokens.any(1).all(), "every rollout has tool-result tokens"
    assert torch.equal(turn_ids >= 0, policy)
    assert set(turn_ids[policy].tolist()) == {0, 1}
    rows = torch.arange(4)[:, None].expand_as(turn_ids)
    expected = torch.where(policy, result.advantages[rows, turn_ids.clamp(min=0)], torch.zeros(()))  # (N, T)
    assert torch.equal(out["advantages"], expected)
    assert (out["advantages"][env_tokens] == 0).all()
    assert trainer.state.log_history[0]["tools/calls"] == 4


def test_dropped_rows_leave_the_loss(tmp_path, tiny_assets, tokenizer, make_config):
    args = make_config(max_steps=2, per_device_train_batch_size=8, loss_type="grpo")
    trainer = stashing_trainer(tiny_assets, tokenizer, args, estimator=KeepEstimator())
    trainer.train()
    assert len(trainer.applied) == len(trainer.losses) == 2
    for (_, result, out), loss in zip(trainer.applied, trainer.losses, strict=True):
        keep = result.keep
        assert keep.tolist() == [False, True, True, True] * 2
        assert torch.equal(out["rlfw_keep"], keep.float())
        loss_mask = out["completion_mask"] * out["tool_mask"]  # (N, T)
        assert (loss_mask[~keep] == 0).all() and (loss_mask[keep].sum(1) > 0).all()
        assert int(out["num_items_in_batch"]) == int(out["completion_mask"][keep].sum())
        # On-policy the ratio is 1, so each kept row's token-mean loss is -A_i; "grpo" averages kept rows only.
        expected = -result.advantages[keep].mean().item()
        assert loss == pytest.approx(expected, abs=1e-5)
    assert trainer.state.log_history[0]["advantages/kept_frac"] == 0.75


# ---------------------------------------------------------------- exact resume
def assert_exact_resume(resume: dict, params_straight: dict, params_resumed: dict) -> None:
    assert resume["first_leg"]["global_step"] == 2 and resume["resumed"]["global_step"] == 4
    assert resume["saved_state"] is not None, f"{STATE_FILE} missing from checkpoint-2"
    assert resume["saved_state"]["estimator"] == "epo"
    assert resume["saved_state"]["estimator_state"] == resume["first_leg"]["estimator_state"]
    assert resume["saved_state"]["estimator_state"]["entropy_steps"] == 2
    assert resume["resumed"]["estimator_state"] == resume["straight"]["estimator_state"]
    assert resume["straight"]["estimator_state"]["entropy_steps"] == 4
    rewards = {int(k): v for k, v in resume["straight"]["rewards"].items()}
    assert sorted(rewards) == [1, 2, 3, 4]
    assert {int(k): v for k, v in resume["resumed"]["rewards"].items()} == rewards
    assert params_straight.keys() == params_resumed.keys()
    for name, value in params_straight.items():
        assert torch.equal(value, params_resumed[name]), name


def test_resume_is_exact_with_estimator_state(tmp_path, tiny_assets):
    resume = resume_runs(tiny_assets, tmp_path, advantage_estimator="epo")
    assert_exact_resume(resume, resume["straight"].pop("params"), resume["resumed"].pop("params"))


def test_recipe_resume_true_picks_latest_checkpoint(tmp_path, tiny_assets, monkeypatch):
    from rlfw.recipe import main

    monkeypatch.syspath_prepend(str(TESTS))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in prompt_rows()))
    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_assets}\ndataset: {data}\nreward_funcs: ['conftest:hashed_reward']\n"
        "per_device_train_batch_size: 4\nnum_generations: 4\nmax_completion_length: 8\nlearning_rate: 1.0e-3\n"
        "logging_steps: 1\nreport_to: none\ngradient_checkpointing: false\ndataloader_pin_memory: false\n"
        "disable_tqdm: true\nsave_strategy: steps\nsave_steps: 1\nseed: 0\nadvantage_estimator: epo\n"
    )
    argv = ["--config", str(config), "--output_dir", str(out)]
    main([*argv, "--max_steps", "2"])
    assert (out / "checkpoint-1" / STATE_FILE).exists() and (out / "checkpoint-2" / STATE_FILE).exists()
    saved = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    trainer = main([*argv, "--max_steps", "3", "--resume_from_checkpoint", "true"])
    assert trainer.state.global_step == 3
    logs = [e for e in trainer.state.log_history if "reward" in e]
    assert [e["step"] for e in logs] == [1, 2, 3]
    # Steps 1-2 were loaded from checkpoint-2, not re-run (re-running would change step_time).
    assert logs[:2] == [e for e in saved if "reward" in e]
    assert trainer.estimator.state_dict()["entropy_steps"] == 3


@pytest.mark.slow
def test_two_processes_parity_and_exact_resume(tmp_path, tiny_assets):
    out = tmp_path / "mp"
    ranks = run_two_ranks(TORCHRUN_2, [str(TESTS / "mp_worker.py"), "--assets", tiny_assets, "--out", str(out)],
                          tmp_path, out)
    # Parity: each process holds 2 of a group's 4 completions; TRL's and rlfw's advantages agree per process.
    for rank in ranks:
        assert len(rank["parity"]) == 3
        for step in rank["parity"]:
            assert len(step["trl"]) == 2
            torch.testing.assert_close(torch.tensor(step["rlfw"]), torch.tensor(step["trl"]), atol=1e-6, rtol=0)
    for steps in zip(ranks[0]["parity"], ranks[1]["parity"], strict=True):
        group = torch.tensor(steps[0]["rlfw"] + steps[1]["rlfw"])  # the full group, normalised across processes
        assert abs(group.sum().item()) < 1e-4 and group.abs().max() > 0.1
    # Resume: both processes saw the same run; process 0 saved the parameters.
    assert ranks[0]["resume"] == ranks[1]["resume"]
    assert_exact_resume(ranks[0]["resume"], torch.load(out / "straight.pt"), torch.load(out / "resumed.pt"))


# ---------------------------------------------------------------- LoRA and logging integrations
def test_lora_weights_train(tmp_path, tiny_assets, tokenizer, dataset, make_config):
    from peft import LoraConfig

    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = RLTrainer(model=tiny_assets, reward_funcs=[hashed_reward], args=make_config(max_steps=2),
                        train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    lora = [n for n in before if "lora_" in n]
    assert lora and all(trainer.model.get_parameter(n).requires_grad for n in lora)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(after[n], before[n]) for n in lora)
    assert all(torch.equal(after[n], before[n]) for n in before if "lora_" not in n)


def test_wandb_offline_run(tmp_path, tiny_assets, tokenizer, dataset, make_config, monkeypatch):
    wandb = pytest.importorskip("wandb")
    wandb_dir = tmp_path / "wandb_root"
    wandb_dir.mkdir()
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": wandb_dir, "WANDB_CACHE_DIR": wandb_dir / "cache",
                       "WANDB_CONFIG_DIR": wandb_dir / "config", "WANDB_DATA_DIR": wandb_dir / "data",
                       "WANDB_ARTIFACT_DIR": wandb_dir / "artifacts", "WANDB_SILENT": "true",
                       "WANDB_PROJECT": "rlfw-tests"}.items():
        monkeypatch.setenv(key, str(value))
    trainer = RLTrainer(model=tiny_assets, reward_funcs=[hashed_reward],
                        args=make_config(max_steps=1, report_to="wandb", run_name="offline-test"),
                        train_dataset=dataset, processing_class=tokenizer)
    try:
        trainer.train()
    finally:
        wandb.finish()
    runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert runs, f"no offline run under {wandb_dir}"
    assert any(runs[0].rglob("*.wandb"))
