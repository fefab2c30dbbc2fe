"""The quickstart (``make demo``): build local assets, warm-start with SFT, evaluate, train with RL, evaluate.

By default a calculator agent: the small local model learns the tool-call format by SFT from an imperfect
demonstrator, then GRPO through rlfw's rollout engine teaches it to call the tool, with valid arguments, every time.
Writes ``outputs/quickstart/report.md`` and ``reward_curve.png``. Everything is built locally; nothing is downloaded.

    python recipes/quickstart.py [--config configs/quickstart.yaml] [--out outputs/quickstart]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

# The warm start: SFT on traces of an imperfect demonstrator (see the module docstring).
# Its tool-less answers are guesses (see envs.calculator.synthetic_traces): answers it "knew" would teach the warm
# start to answer without the tool, a path that competes with the tool's and made RL abandon the tool on some machines.
SFT_DEFAULTS = {"examples": 2400, "epochs": 4.0, "learning_rate": 2e-3, "batch_size": 8,
                "task_kwargs": {"style": "expression", "max_ops": 2, "direct_fraction": 0.4, "bad_call_fraction": 0.4,
                                "guess_answers": True}}
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def evaluate(model_dir: str, config: dict, n: int) -> dict[str, dict[str, float]]:
    """Held-out metrics of the model: greedy, and (for a tool environment) sampled exactly as training samples.

    Multi-turn through the rollout engine when the config names an environment. Sampling uses the config's settings
    (TRL's defaults where it has none) and is seeded, so before and after RL see the same random stream. The
    config's ``chat_template`` (if any) replaces the model's, as in training.
    """
    import importlib

    import torch
    from transformers import AutoModelForCausalLM

    from rlfw.assets import load_tokenizer
    from rlfw.evaluation import evaluate_model
    from rlfw.rewards import load_reward_func

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir, config.get("chat_template"))
    task = importlib.import_module(config["dataset"])
    dataset = task.build_dataset(n, seed=config.get("dataset_seed", 0), split="test",
                                 **config.get("dataset_kwargs", {}))
    funcs = config.get("reward_funcs") or []
    reward = load_reward_func(funcs[0]) if funcs else None
    environment = config.get("environment")
    common = dict(environment=environment, max_turns=config.get("max_turns", 4),
                  max_new_tokens=config.get("max_completion_length", 64))
    results = {"greedy": evaluate_model(model, tokenizer, dataset, reward, **common)}
    from rlfw.rollout.backends import sampling_defaults

    sampling = {**sampling_defaults(), **{k: config[k] for k in SAMPLING_KEYS if k in config}}
    torch.manual_seed(0)
    results[f"sampled (T={sampling['temperature']:g})"] = evaluate_model(
        model, tokenizer, dataset, reward, temperature=sampling["temperature"], sampling=sampling, **common)
    return results


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def training_curves(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Per logged step: mean reward, tool calls per episode, and the valid fraction of the calls made."""
    curves = {"reward": "reward", "calls": "tools/calls_per_episode", "failure": "tools/failure_rate"}
    out = {name: [(h["step"], h[key]) for h in log_history if key in h] for name, key in curves.items()}
    out["valid"] = [(step, 1.0 - rate) for step, rate in out.pop("failure")]
    return out


def reward_curve(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """Plot reward, tool calls per episode and the valid fraction of those calls, per logged step.

    Calls per episode is drawn so that a collapse of tool use shows: the valid fraction alone can rise while
    almost no calls are made.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    labels = {"reward": "mean reward", "calls": "tool calls per episode", "valid": "valid fraction of those calls"}
    for name, label in labels.items():
        if curves.get(name):
            ax.plot(*zip(*curves[name], strict=True), marker=".", label=label)
    top = max([1.0] + [v for _, v in curves.get("calls", [])])
    ax.set_xlabel("step")
    ax.set_ylim(0, top * 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


METRICS = {"accuracy": "accuracy", "tool_calls_per_episode": "tool calls per episode",
           "valid_tool_call_rate": "valid fraction of calls", "tool_use_rate": "tool-use rate (episodes with a call)",
           "accuracy_with_tool": "accuracy of episodes with a call",
           "accuracy_without_tool": "accuracy of episodes without a call", "tagged_answer_rate": "tagged-answer rate",
           "exact_match": "exact match (right result in tags)"}


def results_table(before: dict, after: dict, start: str = "before RL (after SFT)") -> list[str]:
    lines = [f"| decoding | metric | {start} | after RL |", "|---|---|---|---|"]
    for decoding, metrics in before.items():
        for key, label in METRICS.items():
            if key in metrics:
                lines.append(f"| {decoding} | {label} | {metrics[key]:.3f} | {after[decoding][key]:.3f} |")
    return lines


def verdict(before: dict, after: dict, curves: dict) -> list[str]:
    """The report's conclusion in words: did RL improve the held-out metric, by how much against the noise of the
    held-out set (the spread over seeds is in docs/benchmarks.md), and did tool use hold up."""
    decoding = next((k for k in before if k.startswith("sampled")), "greedy")
    b, a = before[decoding]["accuracy"], after[decoding]["accuracy"]
    gain = a - b
    n = before[decoding]["n"]
    noise = 2 * math.sqrt(max(b * (1 - b) + a * (1 - a), 1e-12) / n)  # ~2 standard errors of the difference
    lines = [f"**Held-out {decoding} accuracy {b:.3f} -> {a:.3f} ({gain:+.3f}).** "
             + ("RL improved it" if gain > noise else "RL did not improve it measurably" if gain > -noise
                else "RL made it worse")
             + f" (two standard errors of a difference on {n} problems: {noise:.3f})."]
    calls = [v for _, v in curves.get("calls", [])]
    if "tool_calls_per_episode" in before[decoding]:
        cb, ca = before[decoding]["tool_calls_per_episode"], after[decoding]["tool_calls_per_episode"]
        state = "collapsed" if ca < 0.5 * cb else "held" if ca < 1.1 * cb else "rose"
        lines.append(f"Tool use {state}: held-out tool calls per episode {cb:.2f} -> {ca:.2f}"
                     + (f"; in training {_mean(calls[:3]):.2f} (first 3 logged steps) -> {_mean(calls[-3:]):.2f} "
                        "(last 3)." if calls else "."))
    return lines


def write_report(out: Path, config_path: str, seed: int, before: dict, after: dict, curves: dict,
                 timings: dict, start: str = "before RL (after SFT)") -> None:
    rewards = [v for _, v in curves["reward"]]
    n = next(iter(before.values()))["n"]
    lines = [
        "# rlfw quickstart report",
        "",
        f"Config: `{config_path}`, seed {seed}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}. "
        f"Held-out problems: {n} (disjoint from training).",
        "",
        *verdict(before, after, curves),
        "",
        *results_table(before, after, start),
        "",
        f"Training reward: mean of the first 3 logged steps {_mean(rewards[:3]):.3f}, of the last 3 "
        f"{_mean(rewards[-3:]):.3f}.",
        "",
        "![reward curve](reward_curve.png)",
        "",
        "Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))


def run(config_path: str, out: Path, seed: int = 0, eval_size: int = 150, sft: dict | None = None,
        rl_args: list[str] | None = None, launch: bool = True, warm_start: str | None = None,
        no_sft: bool = False) -> dict:
    """The whole quickstart: SFT warm start, held-out evaluation, RL, evaluation again, report.

    ``sft`` overrides SFT_DEFAULTS; ``rl_args`` are extra flags of recipes/train.py; ``launch`` False trains in this
    process instead of through ``accelerate launch`` (the tests do, to save a process start); ``warm_start``, an
    SFT output directory, skips the SFT; ``no_sft`` starts RL from the config's own ``model_name_or_path`` (a
    pretrained model that needs no warm start). Returns what results.json holds.
    """
    from sft import run_sft  # sibling script (recipes/ is on sys.path)

    from rlfw.assets import ensure_assets

    sft = {**SFT_DEFAULTS, **(sft or {})}
    config = yaml.safe_load(Path(config_path).read_text())
    out.mkdir(parents=True, exist_ok=True)
    timings, t0 = {}, time.time()
    start = "before RL" if no_sft else "before RL (after SFT)"
    if no_sft:
        warm_start = config["model_name_or_path"]
        print(f"[1/4] no warm start: RL starts from {warm_start}", flush=True)
    sft_dir = warm_start or str(out / "sft")
    if warm_start is None:
        assets = ensure_assets("assets/small", seed=0, preset="small")
        print(f"[1/4] supervised warm-start of {assets} on {config['dataset']} traces", flush=True)
        run_sft(str(assets), config["dataset"], sft_dir, sft["examples"], sft["epochs"], sft["learning_rate"],
                seed=seed, task_kwargs=sft["task_kwargs"], batch_size=sft["batch_size"])
    timings["sft"] = time.time() - t0
    print(f"[2/4] evaluating {sft_dir} on held-out prompts", flush=True)
    before = evaluate(sft_dir, config, eval_size)
    timings["evaluation before"] = time.time() - t0 - timings["sft"]
    print("\n".join(results_table(before, before, start)).replace("after RL", "(same)"), flush=True)
    rl_dir = str(out / "rl")
    train_args = ["--config", config_path, "--model_name_or_path", sft_dir, "--output_dir", rl_dir,
                  "--seed", str(seed), *(rl_args or [])]
    print(f"[3/4] RL: accelerate launch recipes/train.py {' '.join(train_args)}", flush=True)
    t1 = time.time()
    if launch:
        subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines",
                        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "recipes/train.py", *train_args],
                       check=True)
    else:
        from rlfw.recipe import main as train

        train(train_args)
    timings["rl"] = time.time() - t1
    print("[4/4] evaluating the RL-trained model", flush=True)
    t2 = time.time()
    after = evaluate(rl_dir, config, eval_size)
    timings["evaluation after"] = time.time() - t2
    print("\n".join(results_table(before, after, start)), flush=True)
    history = json.loads((Path(rl_dir) / "trainer_state.json").read_text())["log_history"]
    curves = training_curves(history)
    reward_curve(curves, out / "reward_curve.png")
    timings["total"] = time.time() - t0
    write_report(out, config_path, seed, before, after, curves, timings, start)
    results = {"seed": seed, "threads": os.environ.get("OMP_NUM_THREADS", "?"), "before": before, "after": after,
               "curves": curves, "timings": timings}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n".join(verdict(before, after, curves)))
    print(f"wrote {out / 'report.md'}, {out / 'reward_curve.png'} and {out / 'results.json'}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--out", default="outputs/quickstart")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the SFT traces and data order and of RL (evaluation sampling is always seed 0)")
    parser.add_argument("--eval-size", type=int, default=150)
    parser.add_argument("--sft-examples", type=int, default=SFT_DEFAULTS["examples"])
    parser.add_argument("--sft-epochs", type=float, default=SFT_DEFAULTS["epochs"])
    parser.add_argument("--sft-learning-rate", type=float, default=SFT_DEFAULTS["learning_rate"])
    parser.add_argument("--sft-batch-size", type=int, default=SFT_DEFAULTS["batch_size"])
    parser.add_argument("--sft-task-kwargs", help="JSON options of the task's synthetic_traces",
                        default=json.dumps(SFT_DEFAULTS["task_kwargs"]))
    parser.add_argument("--no-sft", action="store_true",
                        help="no warm start: RL starts from the config's model_name_or_path (a pretrained model)")
    parser.add_argument("--rl-args", default="", help="extra flags for recipes/train.py, e.g. '--max_steps 50'")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sft = {"examples": args.sft_examples, "epochs": args.sft_epochs, "learning_rate": args.sft_learning_rate,
           "batch_size": args.sft_batch_size, "task_kwargs": json.loads(args.sft_task_kwargs)}
    run(args.config, Path(args.out), args.seed, args.eval_size, sft, args.rl_args.split(), no_sft=args.no_sft)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
