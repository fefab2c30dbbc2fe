"""Crash-safe checkpoints: a checkpoint-N directory appears only complete, whatever kills the process and when.

Unit level: staging, publishing, rotation and resume selection on hand-made directories. End to end: a training
process killed with SIGKILL at several points of writing a checkpoint leaves only complete checkpoints, resume
picks the newest, and the resumed run ends with the same parameters and logs as an uninterrupted one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scenarios import FAULTS, REPO, final_parameters, subprocess_env, write_run
from transformers.trainer_utils import get_last_checkpoint

from rlfw import checkpoint

CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                    checkpoint.STATE_FILE)


def fake_checkpoint(run_dir: Path, step: int, complete: bool = True) -> Path:
    path = run_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def assert_complete(path: Path) -> None:
    assert checkpoint.incomplete_reason(path) is None, path
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    assert not missing, f"{path} lacks {missing}"


# ---------------------------------------------------------------- unit level
def test_publish_renames_a_complete_checkpoint_into_place(tmp_path):
    staging = checkpoint.prepare_staging(tmp_path, 3)
    staged = fake_checkpoint(staging, 3)
    assert get_last_checkpoint(str(tmp_path)) is None and checkpoint.latest_checkpoint(tmp_path) is None
    final = checkpoint.publish(staged, tmp_path)
    assert final == tmp_path / "checkpoint-3" and (final / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]  # the staging directory is gone
    assert checkpoint.latest_checkpoint(tmp_path) == get_last_checkpoint(str(tmp_path)) == str(final)


def test_publish_replaces_an_existing_checkpoint_of_the_same_step(tmp_path):
    old = fake_checkpoint(tmp_path, 3)
    (old / "stale.txt").write_text("from a run that went further before this one resumed")
    staged = fake_checkpoint(checkpoint.prepare_staging(tmp_path, 3), 3)
    checkpoint.publish(staged, tmp_path)
    assert not (tmp_path / "checkpoint-3" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]


def test_staging_leftovers_of_a_crash_are_removed_by_the_next_save(tmp_path):
    fake_checkpoint(checkpoint.staging_dir(tmp_path, 5), 5, complete=False)  # a save killed half-way
    fake_checkpoint(tmp_path / "tmp-checkpoint-2-deleted", 2)  # a rotation killed half-way
    root = checkpoint.prepare_staging(tmp_path, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp-checkpoint-5"] and not any(root.iterdir())


def test_resume_picks_the_newest_complete_checkpoint(tmp_path, caplog):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 12, complete=False)  # e.g. written by plain transformers and cut short
    (fake_checkpoint(tmp_path, 11) / checkpoint.INCOMPLETE_SENTINEL).write_text("in progress")
    (fake_checkpoint(tmp_path, 13) / "trainer_state.json").write_text('{"global_st')  # truncated
    fake_checkpoint(checkpoint.staging_dir(tmp_path, 14), 14)
    with caplog.at_level("WARNING", logger="rlfw.checkpoint"):
        assert checkpoint.latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert "checkpoint-13: its trainer_state.json is unreadable" in caplog.text
    assert "checkpoint-12: it has no trainer_state.json (its save did not finish)" in caplog.text
    assert "checkpoint-11: it contains checkpoint-is-incomplete.txt" in caplog.text
    assert checkpoint.latest_checkpoint(tmp_path / "missing") is None


def test_rotation_keeps_the_newest_and_the_best(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step)
    checkpoint.rotate(tmp_path, 2, newest=tmp_path / "checkpoint-4", best_model_checkpoint=str(tmp_path / "checkpoint-1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-4"]
    checkpoint.rotate(tmp_path, None, newest=tmp_path / "checkpoint-4")  # no limit: nothing deleted
    assert len(list(tmp_path.iterdir())) == 2


def test_recipe_refuses_an_incomplete_checkpoint_path(tmp_path):
    from rlfw.recipe import resume_checkpoint

    path = fake_checkpoint(tmp_path, 3, complete=False)
    with pytest.raises(ValueError, match=r"cannot be resumed from: it has no trainer_state.json .*Set "
                                         r"resume_from_checkpoint: true to pick the newest complete checkpoint"):
        resume_checkpoint(str(path), str(tmp_path))
    assert resume_checkpoint(True, str(tmp_path / "empty")) is None  # fresh start, with a warning
    fake_checkpoint(tmp_path, 2)
    assert resume_checkpoint("latest", str(tmp_path)) == str(tmp_path / "checkpoint-2")


# ---------------------------------------------------------------- training runs
def test_training_checkpoints_are_complete_and_rotated(tmp_path, tiny_assets, tokenizer, dataset, make_config):
    from conftest import hashed_reward

    from rlfw.trainer import RLTrainer

    args = make_config(max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=2)
    RLTrainer(model=tiny_assets, reward_funcs=[hashed_reward], args=args, train_dataset=dataset,
              processing_class=tokenizer).train()
    out = Path(args.output_dir)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-3"]  # no tmp-*
    for path in (out / "checkpoint-2", out / "checkpoint-3"):
        assert_complete(path)
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "reward" in e] == [1, 2, 3]


KILL_STEP, MAX_STEPS = 3, 4
# Points inside the save of checkpoint-3, in the order they happen ("rotating" is after its rename), and what the
# interrupted save left: (directory, files it has, files it does not have yet).
STAGED = "tmp-checkpoint-3/checkpoint-3"
KILL_POINTS = {
    "weights_half_written": (STAGED, ["model.safetensors"], ["optimizer.pt"]),
    "weights_written": (STAGED, ["model.safetensors"], ["optimizer.pt"]),
    "optimizer_written": (STAGED, ["optimizer.pt", "scheduler.pt"], ["rng_state.pth"]),
    "trainer_state_written": (STAGED, ["rng_state.pth", "trainer_state.json"], [checkpoint.STATE_FILE]),
    "fsynced_before_rename": (STAGED, list(CHECKPOINT_FILES), []),
    "rotating": ("tmp-checkpoint-1-deleted", list(CHECKPOINT_FILES), []),
}


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory, tiny_assets):
    """Runs killed with SIGKILL at each point (one worker process, one fork per point), and a straight run."""
    from rlfw.recipe import main

    root = tmp_path_factory.mktemp("kills")
    config = write_run(root, tiny_assets, save_strategy="steps", save_steps=1, save_total_limit=2,
                       max_steps=MAX_STEPS)
    command = [sys.executable, str(FAULTS / "train_worker.py"), "--config", str(config), "--root", str(root / "runs"),
               "--kill-step", str(KILL_STEP), "--points", ",".join(KILL_POINTS)]
    proc = subprocess.run(command, cwd=REPO, env=subprocess_env(root), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    straight = main(["--config", str(config), "--output_dir", str(root / "straight")])
    return root, config, json.loads((root / "runs" / "kills.json").read_text()), straight


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_while_saving_then_resume_is_exact(killed_runs, point):
    from rlfw.recipe import main

    root, config, kills, straight = killed_runs
    assert kills[point] == {"paused": True, "killed_by": 9}
    out = root / "runs" / point
    newest = KILL_STEP if point == "rotating" else KILL_STEP - 1  # published before the kill, or not
    checkpoints = sorted(p for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert [p.name for p in checkpoints] == [f"checkpoint-{s}" for s in range(newest - 1, newest + 1)]
    for path in checkpoints:  # nothing half-written looks like a checkpoint
        assert_complete(path)
    leftover, present, absent = KILL_POINTS[point]  # what the kill interrupted
    assert all((out / leftover / f).is_file() for f in present) and not any((out / leftover / f).exists() for f in absent)
    assert checkpoint.latest_checkpoint(out) == get_last_checkpoint(str(out)) == str(out / f"checkpoint-{newest}")

    resumed = main(["--config", str(config), "--output_dir", str(out), "--resume_from_checkpoint", "true"])
    assert resumed.state.global_step == MAX_STEPS
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [f"checkpoint-{MAX_STEPS - 1}",
                                                                   f"checkpoint-{MAX_STEPS}"]
    expected, actual = final_parameters(straight), final_parameters(resumed)
    for name, value in expected.items():
        assert torch.equal(value, actual[name]), name
    # No log is lost: the resumed run's history has every step, with the straight run's values.
    assert logged(resumed) == logged(straight) and sorted(logged(straight)) == list(range(1, MAX_STEPS + 1))


def logged(trainer) -> dict[int, tuple[float, float]]:
    return {e["step"]: (e["reward"], e["loss"]) for e in trainer.state.log_history if "reward" in e}
