"""The quickstart's recipe must learn, not just run: a scaled-down ``make demo`` for two seeds, asserting that RL
raises held-out sampled accuracy by a margin on each.

Same code path as the demo (recipes/quickstart.py's ``run``: SFT warm start from the imperfect demonstrator, held-out
evaluation through the rollout engine, GRPO through RLTrainer on the environment's outcome reward, evaluation again),
with one shared warm start (the recipe's own, 1200 SFT steps, about 5 minutes on 2 cores), half the RL problems per
step and fewer held-out problems. The full recipe over seeds and thread counts is ``bench/quickstart_seeds.py``.
"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCALED = {"eval_size": 100, "rl_args": ["--max_steps", "50", "--per_device_train_batch_size", "32", "--logging_steps", "5"]}
MIN_GAIN = 0.10  # held-out sampled accuracy, after RL minus before, for every seed


@pytest.fixture(scope="module")
def quickstart():
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import quickstart

        yield quickstart
    finally:
        sys.path.remove(str(ROOT / "recipes"))


@pytest.fixture(scope="module")
def warm_start(quickstart, tmp_path_factory):
    """The recipe's own SFT warm start, shared by the seeds below (RL seeds differ)."""
    import os

    from sft import run_sft

    from rlfw.assets import ensure_assets

    os.chdir(ROOT)
    sft = quickstart.SFT_DEFAULTS
    out = str(tmp_path_factory.mktemp("warm") / "sft")
    return run_sft(str(ensure_assets("assets/small", seed=0, preset="small")), "envs.calculator", out,
                   sft["examples"], sft["epochs"], sft["learning_rate"], seed=0, task_kwargs=sft["task_kwargs"],
                   batch_size=sft["batch_size"])


@pytest.mark.slow
@pytest.mark.learning
@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", [0, 1])
def test_scaled_quickstart_improves_held_out_sampled_accuracy(quickstart, warm_start, tmp_path, monkeypatch, seed):
    monkeypatch.chdir(ROOT)  # the recipe's config and asset paths are relative to the repo
    result = quickstart.run("configs/quickstart.yaml", tmp_path / "quickstart", seed=seed,
                            eval_size=SCALED["eval_size"], rl_args=SCALED["rl_args"], launch=False,
                            warm_start=warm_start)
    key = next(k for k in result["before"] if k.startswith("sampled"))
    before, after = result["before"][key], result["after"][key]
    assert after["accuracy"] - before["accuracy"] >= MIN_GAIN, (before, after)
    assert after["tool_calls_per_episode"] >= before["tool_calls_per_episode"]  # no collapse of tool use
    report = (tmp_path / "quickstart" / "report.md").read_text()
    assert "tool calls per episode" in report and "RL improved it" in report
