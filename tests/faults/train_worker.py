"""Kills training runs with SIGKILL in the middle of writing a checkpoint, at chosen points.

    python tests/faults/train_worker.py --config RUN.yaml --root DIR --kill-step K --points weights,optimizer,...

Imports torch/transformers/TRL once, then for each point forks a child that trains through the recipe
(``rlfw.recipe.main``, output_dir ``DIR/<point>``) with a hook that, while checkpoint-K is being written, stops at
that point and writes ``DIR/<point>/PAUSED``; this process then kills the child with SIGKILL. ``DIR/kills.json``
records how each child ended. The tests then inspect what is on disk and resume from it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import safetensors.torch  # noqa: E402
import scenarios  # noqa: E402,F401 - puts tests/ on the path; the run's reward is scenarios:pausing_reward
import transformers.modeling_utils  # noqa: E402

from rlfw import checkpoint, recipe  # noqa: E402
from rlfw.trainer import RLTrainer  # noqa: E402


def pause(out: Path) -> None:
    (out / "PAUSED").write_text(str(os.getpid()))
    time.sleep(3600)  # until SIGKILL


def install(point: str, step: int, out: Path) -> None:
    """Patch the save path of this (forked) process so that saving checkpoint-<step> stops at ``point``."""
    name = f"checkpoint-{step}"

    def at_step(trainer) -> bool:
        return trainer.state.global_step == step

    if point == "weights_half_written":  # the model file is half on disk
        save = transformers.modeling_utils.safe_save_file

        def save_file(tensors, filename, metadata=None):
            if f"/{name}/" in str(filename):
                data = safetensors.torch.save(tensors, metadata=metadata)
                Path(filename).write_bytes(data[: len(data) // 2])
                pause(out)
            return save(tensors, filename, metadata=metadata)

        transformers.modeling_utils.safe_save_file = save_file
    elif point in ("weights_written", "optimizer_written"):  # between transformers' files
        method = "_save_optimizer_and_scheduler" if point == "weights_written" else "_save_rng_state"
        original = getattr(RLTrainer, method)

        def hooked(self, output_dir):
            if at_step(self):
                pause(out)
            return original(self, output_dir)

        setattr(RLTrainer, method, hooked)
    elif point == "trainer_state_written":  # transformers is done; rlfw's state is not written yet
        save_state = checkpoint.save_state

        def hooked_state(checkpoint_dir, estimator):
            if Path(checkpoint_dir).name == name:
                pause(out)
            return save_state(checkpoint_dir, estimator)

        checkpoint.save_state = hooked_state
    elif point == "fsynced_before_rename":  # everything is on disk, the rename has not happened
        fsync_tree = checkpoint._fsync_tree

        def hooked_fsync(root):
            fsync_tree(root)
            if Path(root).name == name:
                pause(out)

        checkpoint._fsync_tree = hooked_fsync
    elif point == "rotating":  # checkpoint-<step> is published; an old one is being deleted (save_total_limit)
        rmtree = shutil.rmtree

        def hooked_rmtree(path, *args, **kwargs):
            if str(path).endswith("-deleted"):
                pause(out)
            return rmtree(path, *args, **kwargs)

        checkpoint.shutil.rmtree = hooked_rmtree
    else:
        raise ValueError(f"unknown kill point {point!r}")


def run_and_kill(config: str, root: Path, point: str, step: int, extra: list[str]) -> dict:
    out = root / point
    out.mkdir(parents=True)
    pid = os.fork()
    if pid == 0:  # child: train until the hook pauses it
        try:
            install(point, step, out)
            recipe.main(["--config", config, "--output_dir", str(out), *extra])
        finally:
            os._exit(3)  # reaching this means the hook never paused: the parent reports it
    deadline = time.monotonic() + 300
    while not (out / "PAUSED").exists():
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            return {"paused": False, "status": status}
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"paused": False, "status": "timeout"}
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return {"paused": True, "killed_by": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--kill-step", type=int, required=True)
    parser.add_argument("--points", required=True)
    args, extra = parser.parse_known_args()
    import torch

    torch.set_num_threads(1)
    root = Path(args.root)
    results = {point: run_and_kill(args.config, root, point, args.kill_step, extra)
               for point in args.points.split(",")}
    (root / "kills.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
