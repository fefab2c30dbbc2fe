"""A step with groups split across 2 CPU processes (launched with configs/accelerate/cpu.yaml) gives the same result
as 1 process on the same completions: advantages normalised over the whole group, the loss normaliser over all
processes, DDP's gradient average.

Sampling differs between 1 and 2 processes (each process draws its own completions), so the 1-process run
replays the completions the 2 processes generated, then both must end with the same parameters.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import REPO, run_two_ranks
from distributed_worker import StepRecorder, build

TESTS = Path(__file__).resolve().parent
ACCELERATE_CPU = REPO / "configs" / "accelerate" / "cpu.yaml"


class Replay(StepRecorder):
    """Generates nothing: returns the completions recorded for these prompts."""

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        recorded = self.replay.pop(0)
        assert [list(p) for p in prompt_ids] == recorded["prompt_ids"], "the 1-process run drew other prompts"
        self.generated.append(recorded)
        return recorded["completion_ids"], None


@pytest.mark.slow
def test_two_process_step_equals_one_process_step(tmp_path, tiny_assets):
    out = tmp_path / "mp"
    # Launched with the shipped accelerate config, which must start 2 processes (a wrong one silently starts 1).
    ranks = run_two_ranks(["accelerate.commands.launch", "--config_file", str(ACCELERATE_CPU)],
                          [str(TESTS / "distributed_worker.py"), "--assets", tiny_assets, "--out", str(out)],
                          tmp_path, out)
    (first,), (second,) = ranks[0]["generated"], ranks[1]["generated"]
    assert first["prompt_ids"][0] == second["prompt_ids"][0], "one group, split across the two processes"

    single = build(Replay, tiny_assets, tmp_path / "single", per_device_train_batch_size=4)
    single.replay = [{k: first[k] + second[k] for k in ("prompt_ids", "completion_ids")}]
    initial = {n: p.detach().clone() for n, p in single.model.state_dict().items()}
    single.train()
    assert single.replay == [] and single.accelerator.num_processes == 1
    # Advantages: the 1-process batch is the two processes' batches, in rank order.
    torch.testing.assert_close(torch.tensor(single.advantages[0]),
                               torch.tensor(ranks[0]["advantages"][0] + ranks[1]["advantages"][0]), atol=1e-6, rtol=0)
    assert max(abs(a) for a in single.advantages[0]) > 0.1, "rewards never varied within the group"
    # Parameters after the step.
    two = torch.load(out / "params.pt")
    one = {n: p.detach() for n, p in single.accelerator.unwrap_model(single.model).state_dict().items()}
    moved = max((one[n] - initial[n]).abs().max().item() for n in one)
    assert moved > 1e-3
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, atol=1e-6, rtol=1e-5, msg=name)
