"""Shared test parts: tiny local assets, fast CPU configs, a tiny dataset, a varying reward, a one-tool environment
and a scripted rollout policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

# Settings that keep a step around 0.1 s on a CPU; tests override what they exercise.
FAST_SETTINGS = {
    "per_device_train_batch_size": 4,
    "num_generations": 4,
    "max_completion_length": 8,
    "max_steps": 2,
    "report_to": "none",
    "save_strategy": "no",
    "gradient_checkpointing": False,
    "dataloader_pin_memory": False,
    "logging_steps": 1,
    "disable_tqdm": True,
    "learning_rate": 1e-3,
    "seed": 0,
}


def fast_config(output_dir, **overrides):
    """An RLConfig with fast CPU settings (see FAST_SETTINGS); keyword arguments override them."""
    from rlfw.config import RLConfig

    return RLConfig(output_dir=str(output_dir), **{**FAST_SETTINGS, **overrides})


def prompt_rows(n: int = 16) -> list[dict]:
    """Single-turn conversational prompts, each with an ``answer`` column."""
    return [{"prompt": [{"role": "user", "content": f"What is {i} plus {i + 1}?"}], "answer": str(2 * i + 1)}
            for i in range(n)]


def text_of(completion) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion)


def hashed_reward(completions, **kwargs) -> list[float]:
    """Deterministic in the completion text and varied within groups: crc32(text) mod 7, scaled to [0, 1]."""
    return [zlib.crc32(text_of(c).encode()) % 7 / 6 for c in completions]


class AddEnv:
    """One ``add`` tool; rewarded by the number of calls made. Rows with ``bad_row`` true make ``reset`` raise."""

    def reset(self, **row):
        if row.get("bad_row"):
            raise KeyError("document_id")
        self.calls = 0

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: first number
            b: second number
        """
        self.calls += 1
        return a + b

    def get_reward(self) -> float:
        return float(self.calls)


def tool_call(name: str, **arguments) -> str:
    return f'<call>{json.dumps({"name": name, "arguments": arguments})}</call><|end|>'


class ScriptedPolicy:
    """A rollout backend playing ``first`` as every rollout's first turn and a distinct answer afterwards."""

    def __init__(self, trainer, first: str):
        self.tokenizer = trainer.processing_class
        self.assistant_id = self.tokenizer.convert_tokens_to_ids("<|assistant|>")
        self.first, self.answers = first, 0

    def generate(self, prompts, max_new_tokens):
        out = []
        for ids in prompts:
            if ids.count(self.assistant_id) == 1:  # only the generation prompt: the first turn
                text = self.first
            else:
                self.answers += 1
                text = f"It is <answer>{self.answers}</answer><|end|>"
            new = self.tokenizer.encode(text, add_special_tokens=False)
            out.append((new, [-1.0] * len(new)))
        return out


def scripted(first: str):
    """A rollout backend factory (``RLTrainer(..., rollout_backend=scripted(first))``) playing ScriptedPolicy(first)."""
    return lambda trainer: ScriptedPolicy(trainer, first)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> str:
    """Path (string) of a tiny local tokenizer + Llama model, built once per session."""
    from rlfw.assets import build_assets

    return str(build_assets(tmp_path_factory.mktemp("assets") / "tiny", seed=0))


@pytest.fixture(scope="session")
def tokenizer(tiny_assets):
    from rlfw.assets import load_tokenizer

    return load_tokenizer(tiny_assets)


@pytest.fixture
def dataset():
    from datasets import Dataset

    return Dataset.from_list(prompt_rows())


@pytest.fixture
def make_config(tmp_path):
    """``make_config(**overrides)`` -> RLConfig with fast CPU settings writing under tmp_path/out."""

    def make(**overrides):
        overrides.setdefault("output_dir", tmp_path / "out")
        return fast_config(**overrides)

    return make


def subprocess_env(tmp_path) -> dict[str, str]:
    """Environment for child processes: one thread per process, private TMPDIR, the repo importable."""
    tmp = Path(tmp_path) / "proc_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TMPDIR=str(tmp),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_two_ranks(launcher: list[str], worker_args: list[str], tmp_path, out: Path, timeout: int = 300) -> list[dict]:
    """Run ``launcher + worker_args`` (a 2-process launch), check it succeeded with 2 ranks, and return each rank's
    ``out/rank<r>.json`` record."""
    command = [sys.executable, "-m", *launcher, *worker_args]
    proc = subprocess.run(command, cwd=REPO, env=subprocess_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2], "the launch did not start 2 processes"
    return ranks


TORCHRUN_2 = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
