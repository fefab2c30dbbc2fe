"""The quickstart (``make demo``): build local assets, warm-start with SFT, evaluate, train with RL, evaluate.

By default a calculator agent: the small local model learns the tool-call format by SFT from an imperfect
demonstrator, then GRPO through rlfw's rollout engine teaches it to call the tool, with valid arguments, every time.
Writes ``outputs/quickstart/report.md`` and ``reward_curve.png``. Everything is built locally; nothing is downloaded.

    python recipes/quickstart.py [--config configs/quickstart.yaml] [--out outputs/quickstart]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml


def evaluate(model_dir: str, config: dict, n: int) -> dict[str, dict[str, float]]:
    """Held-out metrics of the model: greedy, and (for a tool environment) sampled at the training temperature.

    Multi-turn through the rollout engine when the config names an environment. Sampling is seeded, so before and
    after RL see the same random stream.
    """
    import importlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlfw.evaluation import evaluate_model
    from rlfw.rewards import load_reward_func

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = importlib.import_module(config["dataset"])
    dataset = task.build_dataset(n, seed=config.get("dataset_seed", 0), split="test",
                                 **config.get("dataset_kwargs", {}))
    funcs = config.get("reward_funcs") or []
    reward = load_reward_func(funcs[0]) if funcs else None
    environment = config.get("environment")
    common = dict(environment=environment, max_turns=config.get("max_turns", 4),
                  max_new_tokens=config.get("max_completion_length", 64))
    results = {"greedy": evaluate_model(model, tokenizer, dataset, reward, **common)}
    if environment is not None:
        torch.manual_seed(0)
        results[f"sampled (T={config.get('temperature', 1.0):g})"] = evaluate_model(
            model, tokenizer, dataset, reward, temperature=config.get("temperature", 1.0), **common)
    return results


def reward_curve(log_history: list[dict], path: Path) -> list[tuple[int, float]]:
    """Plot the mean reward per logged step (and the valid-tool-call rate, when tools were called)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["step"], h["reward"]) for h in log_history if "reward" in h]
    steps, rewards = zip(*points, strict=True)
    plt.figure(figsize=(6, 3.5))
    plt.plot(steps, rewards, marker=".", label="mean reward")
    validity = [(h["step"], 1.0 - h["tools/failure_rate"]) for h in log_history if "tools/failure_rate" in h]
    if validity:
        plt.plot(*zip(*validity, strict=True), marker=".", label="valid tool calls (fraction)")
    plt.xlabel("step")
    plt.ylim(0, 1.05)
    plt.legend()
    plt.tight_layout()
    plt.savefig(path, dpi=120)
    plt.close()
    return list(points)


METRICS = {"accuracy": "accuracy", "valid_tool_call_rate": "valid tool-call rate", "tool_use_rate": "tool-use rate",
           "tagged_answer_rate": "tagged-answer rate"}


def results_table(before: dict, after: dict) -> list[str]:
    lines = ["| decoding | metric | before RL (after SFT) | after RL |", "|---|---|---|---|"]
    for decoding, metrics in before.items():
        for key, label in METRICS.items():
            if key in metrics:
                lines.append(f"| {decoding} | {label} | {metrics[key]:.3f} | {after[decoding][key]:.3f} |")
    return lines


def write_report(out: Path, config_path: str, before: dict, after: dict, curve: list, timings: dict) -> None:
    first = sum(r for _, r in curve[:3]) / max(len(curve[:3]), 1)
    last = sum(r for _, r in curve[-3:]) / max(len(curve[-3:]), 1)
    n = next(iter(before.values()))["n"]
    lines = [
        "# rlfw quickstart report",
        "",
        f"Config: `{config_path}`. Held-out problems: {n} (disjoint from training).",
        "",
        *results_table(before, after),
        "",
        f"Training reward: mean of the first 3 logged steps {first:.3f}, of the last 3 {last:.3f}.",
        "",
        "![reward curve](reward_curve.png)",
        "",
        "Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--out", default="outputs/quickstart")
    parser.add_argument("--eval-size", type=int, default=150)
    parser.add_argument("--sft-examples", type=int, default=4000)
    parser.add_argument("--sft-epochs", type=float, default=5.0)
    parser.add_argument("--sft-learning-rate", type=float, default=2e-3)
    parser.add_argument("--sft-task-kwargs", help="JSON options of the task's synthetic_traces",
                        default='{"style": "expression", "max_ops": 2, "direct_fraction": 0.4, "bad_call_fraction": 0.4}')
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from sft import run_sft  # sibling script (recipes/ is on sys.path)

    from rlfw.assets import ensure_assets

    config = yaml.safe_load(Path(args.config).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings, t0 = {}, time.time()
    assets = ensure_assets("assets/small", seed=0, preset="small")
    sft_dir = str(out / "sft")
    print(f"[1/4] supervised warm-start of {assets} on {config['dataset']} traces", flush=True)
    run_sft(str(assets), config["dataset"], sft_dir, args.sft_examples, args.sft_epochs, args.sft_learning_rate,
            task_kwargs=json.loads(args.sft_task_kwargs))
    timings["sft"] = time.time() - t0
    print("[2/4] evaluating the warm-started model on held-out prompts", flush=True)
    before = evaluate(sft_dir, config, args.eval_size)
    print("\n".join(results_table(before, before)).replace("after RL", "(same)"), flush=True)
    rl_dir = str(out / "rl")
    print(f"[3/4] RL: accelerate launch recipes/train.py --config {args.config}", flush=True)
    t1 = time.time()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "recipes/train.py", "--config", args.config,
           "--model_name_or_path", sft_dir, "--output_dir", rl_dir]
    subprocess.run(cmd, check=True)
    timings["rl"] = time.time() - t1
    print("[4/4] evaluating the RL-trained model", flush=True)
    after = evaluate(rl_dir, config, args.eval_size)
    print("\n".join(results_table(before, after)), flush=True)
    history = json.loads((Path(rl_dir) / "trainer_state.json").read_text())["log_history"]
    curve = reward_curve(history, out / "reward_curve.png")
    timings["total"] = time.time() - t0
    write_report(out, args.config, before, after, curve, timings)
    print(f"wrote {out / 'report.md'} and {out / 'reward_curve.png'}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
