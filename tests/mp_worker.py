"""Training scenarios shared by the 1-process tests and the 2-process launch.

    torchrun --standalone --nproc_per_node 2 tests/mp_worker.py --assets DIR --out DIR

runs parity (TRL's advantages vs the ones RLTrainer trains on) and both legs of an exact-resume check, and writes
``rank<r>.json`` per process plus the final parameters of each resume run (``<run>.pt``, process 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import fast_config, hashed_reward, prompt_rows  # noqa: E402

from rlfw.assets import load_tokenizer  # noqa: E402
from rlfw.checkpoint import STATE_FILE  # noqa: E402
from rlfw.trainer import RLTrainer  # noqa: E402


class RecordingTrainer(RLTrainer):
    """Records, per generation batch, TRL's own advantages and the ones RLTrainer hands to the loss."""

    def _apply_advantages(self, inputs, output, batch, result):
        trl_advantages = output["advantages"].detach().clone()  # (N_local,) computed by GRPOTrainer
        super()._apply_advantages(inputs, output, batch, result)
        self.recorded.append({"trl": trl_advantages.tolist(), "rlfw": output["advantages"].detach().tolist()})


class StopAt(TrainerCallback):
    """Interrupts training after ``step`` optimizer steps, as a crash right after a checkpoint would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def make_trainer(assets: str, output_dir, callbacks=None, **overrides) -> RecordingTrainer:
    from datasets import Dataset

    trainer = RecordingTrainer(
        model=assets, reward_funcs=[hashed_reward], args=fast_config(output_dir, **overrides),
        train_dataset=Dataset.from_list(prompt_rows()), processing_class=load_tokenizer(assets), callbacks=callbacks,
    )
    trainer.recorded = []
    return trainer


def parity_run(assets: str, output_dir, **overrides) -> list[dict]:
    """Train with the default grpo estimator; per step {"trl": [...], "rlfw": [...]} for this process's rows."""
    trainer = make_trainer(assets, output_dir, **overrides)
    trainer.train()
    return trainer.recorded


def logged_rewards(trainer) -> dict[int, float]:
    return {entry["step"]: entry["reward"] for entry in trainer.state.log_history if "reward" in entry}


def final_parameters(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {name: p.detach().cpu().clone() for name, p in model.state_dict().items()}


def resume_runs(assets: str, root, steps: int = 4, save_steps: int = 2, **overrides) -> dict:
    """Train ``steps`` straight, and ``save_steps`` steps + interrupt + resume from the checkpoint.

    Returns, per run ("straight", "resumed"): logged rewards by step, final estimator state, final parameters;
    plus the saved rlfw state file of the checkpoint.
    """
    root = Path(root)
    common = {"max_steps": steps, **overrides}
    straight = make_trainer(assets, root / "straight", **common)
    straight.train()
    first = make_trainer(assets, root / "resumed", callbacks=[StopAt(save_steps)], save_strategy="steps",
                         save_steps=save_steps, **common)
    first.train()
    checkpoint = root / "resumed" / f"checkpoint-{save_steps}"
    saved_state = json.loads((checkpoint / STATE_FILE).read_text()) if (checkpoint / STATE_FILE).exists() else None
    state_after_first = first.estimator.state_dict()
    second = make_trainer(assets, root / "resumed", save_strategy="steps", save_steps=save_steps, **common)
    second.train(resume_from_checkpoint=str(checkpoint))
    return {
        "straight": {"rewards": logged_rewards(straight), "estimator_state": straight.estimator.state_dict(),
                     "params": final_parameters(straight), "global_step": straight.state.global_step},
        "resumed": {"rewards": logged_rewards(second), "estimator_state": second.estimator.state_dict(),
                    "params": final_parameters(second), "global_step": second.state.global_step},
        "first_leg": {"estimator_state": state_after_first, "global_step": first.state.global_step},
        "saved_state": saved_state,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--assets", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    # 2 rows per process and 4 generations: every group is split across the two processes.
    shape = {"per_device_train_batch_size": 2, "num_generations": 4, "ddp_find_unused_parameters": False}
    parity = parity_run(args.assets, out / "parity", max_steps=3, **shape)
    resume = resume_runs(args.assets, out / "resume", advantage_estimator="epo", **shape)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        for run in ("straight", "resumed"):
            torch.save(resume[run].pop("params"), out / f"{run}.pt")
    else:
        for run in ("straight", "resumed"):
            resume[run].pop("params")
    result = {"world_size": int(os.environ.get("WORLD_SIZE", "1")), "parity": parity, "resume": resume}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
