"""Faulty pieces for the fault-injection tests: reward functions, environments, a scripted policy, run configs.

Importable by dotted path from recipe configs (``scenarios:pausing_reward``) when ``tests/`` and ``tests/faults/``
are on the path, which is how the subprocess tests use them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path

FAULTS = Path(__file__).resolve().parent
TESTS = FAULTS.parent
for _path in (str(TESTS), str(FAULTS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from conftest import (  # noqa: E402,F401 - REPO, AddEnv, scripted, tool_call: for the tests
    REPO,
    AddEnv,
    hashed_reward,
    prompt_rows,
    scripted,
    text_of,
    tool_call,
)


# ---------------------------------------------------------------- reward functions
def poisoned(from_step: int = 0):
    """A reward function that raises on samples whose ``poison`` column is true, from global step ``from_step`` on
    (as a parser bug on unusual completions would); otherwise the hashed reward."""

    def poisoned_reward(completions, poison, trainer_state=None, **kwargs) -> list[float]:
        step = trainer_state.global_step if trainer_state is not None else 0
        for text, bad in zip(completions, poison, strict=True):
            if bad and step >= from_step:
                raise ValueError(f"cannot parse a number from {text_of(text)[:20]!r}")
        return hashed_reward(completions)

    return poisoned_reward


def half_none_reward(completions, **kwargs) -> list[float | None]:
    """None (unscorable) for every even sample of the batch, the hashed reward for the others."""
    return [None if i % 2 == 0 else r for i, r in enumerate(hashed_reward(completions))]


def half_nan_reward(completions, **kwargs) -> list[float]:
    return [math.nan if i % 2 == 0 else r for i, r in enumerate(hashed_reward(completions))]


def all_nan_reward(completions, **kwargs) -> list[float]:
    return [math.nan] * len(completions)


def infinite_reward(completions, **kwargs) -> list[float]:
    """inf for completions starting with "a" (a division by zero on some inputs), else the hashed reward."""
    return [math.inf if text_of(c).startswith("a") else r for c, r in zip(completions, hashed_reward(completions),
                                                                        strict=True)]


def short_reward(completions, **kwargs) -> list[float]:
    """One value too few."""
    return hashed_reward(completions)[:-1]


def pausing_reward(completions, trainer_state=None, **kwargs) -> list[float]:
    """hashed_reward; with RLFW_TEST_PAUSE_DIR set, it pauses once at step RLFW_TEST_PAUSE_STEP (0-based global step
    before the step) until the test writes ``go``: a deterministic point at which to signal a training process."""
    directory = os.environ.get("RLFW_TEST_PAUSE_DIR")
    if directory and trainer_state is not None and trainer_state.global_step == int(os.environ["RLFW_TEST_PAUSE_STEP"]):
        rank = os.environ.get("RANK", "0")
        (Path(directory) / f"paused-{rank}").write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while not (Path(directory) / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return hashed_reward(completions)


# ---------------------------------------------------------------- environments
RELEASE = threading.Event()  # set by the tests to let abandoned hanging tools finish


class HangingEnv(AddEnv):
    def wait(self, seconds: int) -> str:
        """Wait for a number of seconds.

        Args:
            seconds: how long to wait
        """
        RELEASE.wait(seconds)
        return "done"


class FloodingEnv(AddEnv):
    def dump(self, size: int) -> str:
        """Dump a large log.

        Args:
            size: number of characters
        """
        return "x" * size


# ---------------------------------------------------------------- recipe runs
def write_run(tmp_path, assets: str, *, reward: str = "scenarios:pausing_reward", rows=None, **settings) -> Path:
    """A recipe YAML (and its JSONL dataset) for a fast CPU run; ``settings`` are extra YAML keys."""
    data = Path(tmp_path) / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in (rows or prompt_rows())))
    base = {"model_name_or_path": assets, "dataset": str(data), "reward_funcs": [reward],
            "per_device_train_batch_size": 4, "num_generations": 4, "max_completion_length": 8,
            "learning_rate": 1.0e-3, "logging_steps": 1, "report_to": "none", "gradient_checkpointing": False,
            "dataloader_pin_memory": False, "disable_tqdm": True, "seed": 0, "ddp_find_unused_parameters": False}
    config = Path(tmp_path) / "run.yaml"
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in {**base, **settings}.items()))
    return config


def subprocess_env(tmp_path, **extra: str) -> dict[str, str]:
    """The tests' child environment, with tests/ and tests/faults/ importable."""
    from conftest import subprocess_env as base

    env = base(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(FAULTS), str(TESTS), env["PYTHONPATH"]])
    env.update(extra)
    return env


def recording(base):
    """``base`` (RLTrainer) that keeps, per generation batch, ``applied``: (AdvantageBatch, estimator output, tensors
    handed to the loss), and ``losses``."""

    class Recording(base):
        def _apply_advantages(self, inputs, output, batch, result):
            super()._apply_advantages(inputs, output, batch, result)
            self.applied = getattr(self, "applied", [])
            self.applied.append((batch, result, {k: v for k, v in output.items() if hasattr(v, "shape")}))

        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)
            self.losses = getattr(self, "losses", [])
            self.losses.append(loss.item())
            return loss

    return Recording


def final_parameters(trainer) -> dict:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {name: p.detach().cpu().clone() for name, p in model.state_dict().items()}
