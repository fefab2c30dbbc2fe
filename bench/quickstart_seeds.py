"""Does the quickstart learn on every run? ``make demo``'s recipe over seeds and thread counts, each from fresh outputs.

    python bench/quickstart_seeds.py [--seeds 0 1 2 3 4] [--threads 1 2] [--workers 2] [--no-write]
    python bench/quickstart_seeds.py --config configs/real/smollm2_arithmetic.yaml --seeds 0 1 2 --threads 2 \
        -- --no-sft --eval-size 100     # make demo-real's recipe (SmolLM2-135M-Instruct, RL alone)

Each run is ``recipes/quickstart.py --seed S`` under ``OMP_NUM_THREADS=T`` in its own empty directory
(outputs/bench/quickstart/<config name>/s<S>_t<T>): SFT warm start (unless ``--no-sft``), held-out evaluation, RL, evaluation again. Thread counts
change the float kernels (another machine's rounding, cheaply), so a recipe that learns only on one machine's
numerics fails here. Prints and appends to docs/benchmarks.md a table of every run (held-out sampled and greedy
accuracy, and tool calls per episode or the tagged-answer and exact-match rates, before and after RL), the gain's mean ± std and range, and a PNG.
Runs go ``--workers`` at a time; a run with T threads counts as T workers' worth of cores in the schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import _common
from _doc import append_result, machine

OUT = _common.ROOT / "outputs" / "bench" / "quickstart"


def run_one(config: str, seed: int, threads: int, extra: list[str]) -> dict:
    out = OUT / Path(config).stem / f"s{seed}_t{threads}"
    shutil.rmtree(out, ignore_errors=True)  # fresh outputs: nothing of an earlier run is reused
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.time()
    with open(out / "log.txt", "w") as log:
        subprocess.run([sys.executable, "recipes/quickstart.py", "--config", config, "--seed", str(seed), "--out",
                        str(out), *extra],
                       cwd=_common.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    result = json.loads((out / "results.json").read_text())
    result["wall_s"] = time.time() - start
    return result


def run_all(config: str, seeds: list[int], threads: list[int], workers: int, extra: list[str]) -> list[dict]:
    """Every (seed, threads) run, at most ``workers`` cores busy (a 2-thread run takes two)."""
    pending = [(s, t) for t in sorted(threads) for s in seeds]
    results, running, busy = [], {}, 0
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        while pending or running:
            while pending and (busy + min(pending[0][1], workers) <= workers or not running):
                seed, t = pending.pop(0)
                future: Future = pool.submit(run_one, config, seed, t, extra)
                running[future] = min(t, workers)
                busy += running[future]
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                busy -= running.pop(future)
                result = future.result()
                results.append(result)
                print(f"seed {result['seed']} threads {result['threads']}: " + row_text(result), flush=True)
    return sorted(results, key=lambda r: (int(r["threads"]), r["seed"]))


def sampled_key(metrics: dict) -> str:
    return next(k for k in metrics if k.startswith("sampled"))


def extra_metrics(metrics: dict) -> list[tuple[str, str]]:
    """(key, label) of the run's own metrics beyond accuracy: tool use for a tool environment, else the format."""
    if "tool_calls_per_episode" in metrics:
        return [("tool_calls_per_episode", "tool calls/episode")]
    return [(k, label) for k, label in (("tagged_answer_rate", "tagged-answer rate"), ("exact_match", "exact match"))
            if k in metrics]


def row_text(r: dict) -> str:
    s = sampled_key(r["before"])
    b, a = r["before"], r["after"]
    extra = ", ".join(f"sampled {label} {b[s][k]:.2f} -> {a[s][k]:.2f}" for k, label in extra_metrics(b[s]))
    return (f"sampled acc {b[s]['accuracy']:.3f} -> {a[s]['accuracy']:.3f} "
            f"({a[s]['accuracy'] - b[s]['accuracy']:+.3f}), greedy {b['greedy']['accuracy']:.3f} -> "
            f"{a['greedy']['accuracy']:.3f}, {extra}, {r['wall_s'] / 60:.1f} min")


def gains(results: list[dict]) -> list[float]:
    return [r["after"][sampled_key(r["after"])]["accuracy"] - r["before"][sampled_key(r["before"])]["accuracy"]
            for r in results]


def table(results: list[dict]) -> str:
    s = sampled_key(results[0]["before"])
    extra = extra_metrics(results[0]["before"][s])
    tools = "valid_tool_call_rate" in results[0]["before"][s]
    lines = [f"| seed | threads | {s} accuracy before -> after (gain) | greedy accuracy before -> after | "
             + "".join(f"{s} {label} before -> after | " for _, label in extra)
             + ("valid fraction of calls after | " if tools else "") + "SFT / RL / total (s) |",
             "|---|---|---|---|" + "---|" * (len(extra) + tools) + "---|"]
    for r, g in zip(results, gains(results), strict=True):
        b, a, t = r["before"], r["after"], r["timings"]
        lines.append(
            f"| {r['seed']} | {r['threads']} | {b[s]['accuracy']:.3f} -> {a[s]['accuracy']:.3f} ({g:+.3f}) | "
            f"{b['greedy']['accuracy']:.3f} -> {a['greedy']['accuracy']:.3f} | "
            + "".join(f"{b[s][k]:.2f} -> {a[s][k]:.2f} | " for k, _ in extra)
            + (f"{a[s]['valid_tool_call_rate']:.3f} | " if tools else "")
            + f"{t['sft']:.0f} / {t['rl']:.0f} / {t['total']:.0f} |")
    return "\n".join(lines)


def summary(results: list[dict]) -> str:
    g = gains(results)
    mean, std = _common.mean_std(g)
    improved = sum(x > 0 for x in g)
    return (f"Sampled-accuracy gain over {len(g)} runs: **{mean:+.3f} ± {std:.3f}** (range {min(g):+.3f} to "
            f"{max(g):+.3f}); {improved} of {len(g)} runs improved; mean gain / std = "
            f"{mean / std if std else float('inf'):.1f} (the bar is 2).")


def plot(results: list[dict], to_docs: bool, name: str) -> str:
    plt = _common.pyplot()
    tools = bool(results[0]["curves"].get("calls"))
    fig, axes = plt.subplots(1, 2 if tools else 1, figsize=(10 if tools else 5.5, 3.6), squeeze=False)
    axes = axes[0]
    for r in results:
        style = "-" if str(r["threads"]) == "1" else "--"
        label = f"s{r['seed']} t{r['threads']}"
        axes[0].plot(*zip(*r["curves"]["reward"], strict=True), style, lw=1, label=label)
        if tools:
            axes[1].plot(*zip(*r["curves"]["calls"], strict=True), style, lw=1, label=label)
    axes[0].set_title("training reward")
    if tools:
        axes[1].set_title("tool calls per episode (training)")
    for ax in axes:
        ax.set_xlabel("step")
    axes[-1].legend(fontsize=6, ncol=2)
    return _common.save_plot(fig, f"{name}_seeds.png", to_docs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml", help="the recipe's config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="CPU cores to fill")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to docs/benchmarks.md")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: report the runs already in outputs/bench/quickstart/ (e.g. after a stop)")
    parser.add_argument("quickstart_args", nargs="*", help="passed on to recipes/quickstart.py (after --)")
    args = parser.parse_args()
    name = Path(args.config).stem
    if args.collect:
        results = sorted((json.loads(p.read_text()) for p in (OUT / name).glob("s*_t*/results.json")),
                         key=lambda r: (int(r["threads"]), r["seed"]))
        for r in results:
            r.setdefault("wall_s", r["timings"]["total"])
    else:
        results = run_all(args.config, args.seeds, args.threads, args.workers, args.quickstart_args)
    (OUT / name / "all.json").write_text(json.dumps(results, indent=1))
    text = table(results) + "\n\n" + summary(results)
    print(text)
    image = plot(results, not args.no_write, "quickstart" if name == "quickstart" else name)
    if not args.no_write:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=_common.ROOT).stdout.strip()
        body = (f"Commit {commit}; {machine()}; runs {args.workers} at a time (times include that sharing).\n\n"
                f"{text}\n\n![{name} over seeds]({image})")
        if name == "quickstart":
            append_result("Quickstart over seeds and thread counts",
                          "`make demo`'s recipe (recipes/quickstart.py) run from fresh outputs for several seeds under "
                          "OMP_NUM_THREADS 1 and 2; held-out problems, before and after RL, measured the same way.",
                          body)
        else:
            append_result(f"Recipe over seeds: {args.config}",
                          f"recipes/quickstart.py with `{args.config}` run from fresh outputs for several seeds; "
                          "held-out problems, before and after RL, measured the same way.", body)


if __name__ == "__main__":
    main()
