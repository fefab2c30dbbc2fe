"""Preemption: SIGTERM finishes the current step, saves a checkpoint, stops training, and the process exits 0;
resuming from that checkpoint continues exactly. With several processes, signalling one stops all at the same step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from scenarios import REPO, final_parameters, subprocess_env, write_run
from transformers import TrainerCallback

from rlfw import checkpoint


def assert_same_parameters(expected, actual) -> None:
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        assert torch.equal(value, actual[name]), name


class SignalAt(TrainerCallback):
    """Sends SIGTERM to this very process when step ``step`` begins (1-based)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def make_trainer(tiny_assets, tokenizer, dataset, output_dir, **overrides):
    from conftest import fast_config, hashed_reward

    from rlfw.trainer import RLTrainer

    args = fast_config(output_dir, **{"max_steps": 4, **overrides})
    return RLTrainer(model=tiny_assets, reward_funcs=[hashed_reward], args=args, train_dataset=dataset,
                     processing_class=tokenizer)


def test_sigterm_saves_stops_and_resumes_exactly(tmp_path, tiny_assets, tokenizer, dataset):
    straight = make_trainer(tiny_assets, tokenizer, dataset, tmp_path / "straight")
    straight.train()
    before = signal.getsignal(signal.SIGTERM)
    run = make_trainer(tiny_assets, tokenizer, dataset, tmp_path / "run")  # save_strategy "no": no other saves
    run.add_callback(SignalAt(2))
    run.train()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is rlfw's only while training
    assert run.preempted and run.state.global_step == 2  # step 2 was finished, not abandoned
    saved = tmp_path / "run" / "checkpoint-2"
    assert checkpoint.latest_checkpoint(tmp_path / "run") == str(saved)
    assert json.loads((saved / "trainer_state.json").read_text())["global_step"] == 2
    resumed = make_trainer(tiny_assets, tokenizer, dataset, tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(saved))
    assert not resumed.preempted and resumed.state.global_step == 4
    assert_same_parameters(final_parameters(straight), final_parameters(resumed))


def test_sigterm_during_a_save_stops_right_after_it(tmp_path, tiny_assets, tokenizer, dataset, monkeypatch):
    from rlfw.trainer import RLTrainer

    save = RLTrainer._save_checkpoint

    def signalled_save(self, model, trial):
        save(self, model, trial)
        if self.state.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives after on_step_end decided; on_save catches it

    monkeypatch.setattr(RLTrainer, "_save_checkpoint", signalled_save)
    run = make_trainer(tiny_assets, tokenizer, dataset, tmp_path / "run", save_strategy="steps", save_steps=1)
    run.train()
    assert run.preempted and run.state.global_step == 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.is_dir()) == ["checkpoint-1"]


def wait_for(paths: list[Path], proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the run never reached the pause (exit {proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}")
        time.sleep(0.05)


PAUSE_STEP = 2  # the signal arrives while step 3 computes its rewards


@pytest.mark.slow
def test_sigterm_to_a_recipe_process_exits_0_with_a_checkpoint(tmp_path, tiny_assets):
    from rlfw.recipe import main

    config = write_run(tmp_path, tiny_assets, max_steps=5, save_strategy="no")
    pause = tmp_path / "pause"
    pause.mkdir()
    out = tmp_path / "run"
    env = subprocess_env(tmp_path, RLFW_TEST_PAUSE_DIR=str(pause), RLFW_TEST_PAUSE_STEP=str(PAUSE_STEP))
    proc = subprocess.Popen([sys.executable, "recipes/train.py", "--config", str(config), "--output_dir", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for([pause / "paused-0"], proc)
    proc.send_signal(signal.SIGTERM)
    (pause / "go").write_text("")
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-4000:]
    assert "Received SIGTERM: finishing the current step" in stderr
    assert "Preempted: stopped after step 3" in stderr and "resume_from_checkpoint: true" in stderr
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-3"]
    assert not (out / "model.safetensors").exists()  # no "final" model from an unfinished run

    straight = main(["--config", str(config), "--output_dir", str(tmp_path / "straight")])
    resumed = main(["--config", str(config), "--output_dir", str(out), "--resume_from_checkpoint", "true"])
    assert resumed.state.global_step == 5 and (out / "model.safetensors").exists()
    assert_same_parameters(final_parameters(straight), final_parameters(resumed))


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both(tmp_path, tiny_assets):
    # 2 rows per process and 4 generations: each group is split across the two processes.
    config = write_run(tmp_path, tiny_assets, max_steps=6, save_strategy="no", per_device_train_batch_size=2)
    pause = tmp_path / "pause"
    pause.mkdir()
    out = tmp_path / "run"
    env = subprocess_env(tmp_path, RLFW_TEST_PAUSE_DIR=str(pause), RLFW_TEST_PAUSE_STEP=str(PAUSE_STEP))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "recipes/train.py", "--config", str(config), "--output_dir", str(out)]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for([pause / "paused-0", pause / "paused-1"], proc)
    os.kill(int((pause / "paused-1").read_text()), signal.SIGTERM)  # only rank 1 is told
    (pause / "go").write_text("")
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-4000:]
    assert stderr.count("Preempted: stopped after step 3") == 2  # both processes stopped at the same step
    saved = out / "checkpoint-3"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-3"]
    assert checkpoint.incomplete_reason(saved) is None
    assert (saved / "rng_state_0.pth").exists() and (saved / "rng_state_1.pth").exists()
    assert json.loads((saved / "trainer_state.json").read_text())["global_step"] == 3
