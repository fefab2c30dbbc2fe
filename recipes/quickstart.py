"""The quickstart (``make demo``): build local assets, warm-start with SFT, evaluate, train with RL, evaluate.

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


def evaluate(model_dir: str, config: dict, n: int) -> dict[str, float]:
    """Held-out accuracy of the model (greedy decoding; multi-turn through the engine when an env is set)."""
    import importlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlfw.evaluation import evaluate_model
    from rlfw.rewards import load_reward_func

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = importlib.import_module(config["dataset"])
    dataset = task.build_dataset(n, seed=config.get("dataset_seed", 0), split="test",
                                 **config.get("dataset_kwargs", {}))
    reward = load_reward_func(config["reward_funcs"][0])
    return evaluate_model(model, tokenizer, dataset, reward, environment=config.get("environment"),
                          max_turns=config.get("max_turns", 4),
                          max_new_tokens=config.get("max_completion_length", 64))


def reward_curve(log_history: list[dict], path: Path) -> list[tuple[int, float]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["step"], h["reward"]) for h in log_history if "reward" in h]
    steps, rewards = zip(*points, strict=True)
    window = max(1, len(rewards) // 15)
    smooth = [sum(rewards[max(0, i - window + 1): i + 1]) / len(rewards[max(0, i - window + 1): i + 1])
              for i in range(len(rewards))]
    plt.figure(figsize=(6, 3.5))
    plt.plot(steps, rewards, alpha=0.35, label="mean reward per step")
    plt.plot(steps, smooth, label=f"moving average ({window} steps)")
    plt.xlabel("step")
    plt.ylabel("reward")
    plt.legend()
    plt.tight_layout()
    plt.savefig(path, dpi=120)
    plt.close()
    return list(points)


def write_report(out: Path, config_path: str, before: dict, after: dict, curve: list, timings: dict) -> None:
    first = sum(r for _, r in curve[:10]) / max(len(curve[:10]), 1)
    last = sum(r for _, r in curve[-10:]) / max(len(curve[-10:]), 1)
    lines = [
        "# rlfw quickstart report",
        "",
        f"Config: `{config_path}`. Held-out prompts: {before['n']} (disjoint from training).",
        "",
        "| | before RL (after SFT) | after RL |",
        "|---|---|---|",
    ]
    for key in before:
        if key != "n":
            lines.append(f"| {key.replace('_', ' ')} | {before[key]:.3f} | {after[key]:.3f} |")
    lines += [
        "",
        f"Training reward: mean of the first 10 steps {first:.3f}, of the last 10 steps {last:.3f}.",
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
    parser.add_argument("--sft-epochs", type=float, default=6.0)
    parser.add_argument("--sft-learning-rate", type=float, default=2e-3)
    parser.add_argument("--sft-task-kwargs", default='{"untagged_fraction": 0.6}',
                        help="JSON options of the task's synthetic_traces")
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
    print(f"      before RL: {before}", flush=True)
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
    print(f"      after RL: {after}", flush=True)
    history = json.loads((Path(rl_dir) / "trainer_state.json").read_text())["log_history"]
    curve = reward_curve(history, out / "reward_curve.png")
    timings["total"] = time.time() - t0
    write_report(out, args.config, before, after, curve, timings)
    print(f"wrote {out / 'report.md'} and {out / 'reward_curve.png'}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
