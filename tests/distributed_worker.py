"""One training step with each group split across processes, recorded for a 1-process replay.

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py --assets DIR --out DIR

Each process writes ``rank<r>.json`` (its prompt and completion token ids, the advantages it trained on); process
0 writes the parameters after the step (``params.pt``). tests/test_distributed.py replays the same completions in
one process and compares.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import fast_config, hashed_reward, prompt_rows  # noqa: E402

from rlfw.assets import load_tokenizer  # noqa: E402
from rlfw.trainer import RLTrainer  # noqa: E402

# SGD, so that the update is proportional to the gradient (Adam's first step is ~lr * sign(grad) and would hide a
# wrongly scaled loss); one group of 4 per step, 2 completions on each of the 2 processes.
STEP = {"max_steps": 1, "num_generations": 4, "optim": "sgd", "learning_rate": 0.5,
        "ddp_find_unused_parameters": False}


class StepRecorder(RLTrainer):
    """Records the generated token ids and the advantages handed to the loss."""

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        self.generated.append({"prompt_ids": [list(p) for p in prompt_ids], "completion_ids": completion_ids})
        return completion_ids, logprobs

    def _apply_advantages(self, inputs, output, batch, result):
        super()._apply_advantages(inputs, output, batch, result)
        self.advantages.append(output["advantages"].tolist())


def build(cls, assets: str, output_dir, **overrides):
    from datasets import Dataset

    trainer = cls(model=assets, reward_funcs=[hashed_reward], args=fast_config(output_dir, **{**STEP, **overrides}),
                  train_dataset=Dataset.from_list(prompt_rows()), processing_class=load_tokenizer(assets))
    trainer.generated, trainer.advantages = [], []
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--assets", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    trainer = build(StepRecorder, args.assets, out / "run", per_device_train_batch_size=2)
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    record = {"world_size": trainer.accelerator.num_processes, "generated": trainer.generated,
              "advantages": trainer.advantages}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        model = trainer.accelerator.unwrap_model(trainer.model)
        torch.save({n: p.detach().cpu() for n, p in model.state_dict().items()}, out / "params.pt")


if __name__ == "__main__":
    main()
