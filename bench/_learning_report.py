"""Reporting for learning.py: the table, the computed "what happened" statements and the PNG of one comparison."""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING

import _common
from _common import mean_std, pm

if TYPE_CHECKING:
    from learning import Comparison

PRIMARY = "sampled accuracy"  # held-out pass@1 at T=1: the metric of thresholds and verdicts


def curves(runs: list[dict], part: str, key: str) -> tuple[list[int], list[list[float]]]:
    """Steps and, per step, the values of ``key`` over seeds (only steps every run logged)."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for row in run[part]:
            if key in row:
                by_step.setdefault(row["step"], []).append(row[key])
    steps = sorted(s for s, v in by_step.items() if len(v) == len(runs))
    return steps, [by_step[s] for s in steps]


def smooth(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]


def headline_keys(comp: Comparison) -> list[str]:
    keys = [PRIMARY, "greedy accuracy"]
    if comp.pass_k:
        keys += [f"pass@{comp.samples}"]
    keys += list(comp.headline)
    if comp.env == "search_qa":  # a policy that answers the most frequent answer everywhere scores by the prior
        keys += ["greedy top-answer share"]
    return keys


def threshold_of(comp: Comparison, by_method: dict[str, list[dict]]) -> float | None:
    """Halfway from the warm start's sampled accuracy to the best final mean sampled accuracy of any method."""
    start = [r["eval"][0][PRIMARY] for runs in by_method.values() for r in runs if r["eval"]]
    finals = [statistics.fmean(r["eval"][-1][PRIMARY] for r in runs) for runs in by_method.values()
              if runs and all(r["eval"] for r in runs)]
    if not start or not finals or max(finals) <= statistics.fmean(start):
        return None
    return statistics.fmean(start) + 0.5 * (max(finals) - statistics.fmean(start))


def steps_to(runs: list[dict], threshold: float | None) -> str:
    if threshold is None:
        return "n/a (no method improved)"
    hits = [next((e["step"] for e in r["eval"] if e[PRIMARY] >= threshold), None) for r in runs]
    reached = [h for h in hits if h is not None]
    text = f"{len(reached)}/{len(runs)} seeds"
    return text + (f", {pm(reached, 0)}" if reached else "")


def report(comp: Comparison, results: list[dict], args) -> tuple[str, str]:
    """(markdown table + notes, what-happened paragraph)."""
    by_method = {m.label: [r for r in results if r["method"] == m.label and not r["error"]] for m in comp.methods}
    errors = {r["method"]: r["error"] for r in results if r["error"]}
    keys = headline_keys(comp)
    threshold = threshold_of(comp, by_method)
    head = (["method", "G (gradient rows)", "completions/step"] + [f"held-out {k}: start → end" for k in keys]
            + [f"steps to {PRIMARY} >= {threshold:.3f}" if threshold is not None else "steps to threshold"]
            + [f"{label} (last 10 steps)" for _, label in comp.own_metrics] + ["minutes/run"])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for m in comp.methods:
        runs = by_method[m.label]
        if not runs:
            lines.append(f"| {m.label} | " + " | ".join(["failed"] * (len(head) - 1)) + " |")
            continue
        gradient_rows = m.num_generations - 1 if m.estimator == "median" else m.num_generations
        cells = [m.label, str(gradient_rows), str(comp.prompts_per_step * m.num_generations)]
        for k in keys:
            cells.append(f"{pm([r['eval'][0][k] for r in runs])} → {pm([r['eval'][-1][k] for r in runs])}")
        cells.append(steps_to(runs, threshold))
        for key, _ in comp.own_metrics:
            cells.append(pm([_last(r, key) for r in runs]))
        cells.append(f"{statistics.fmean(r['seconds'] for r in runs) / 60:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = "".join(f"\n\n**{label} failed** in every seed: `{err}`" for label, err in errors.items()
                    if not by_method.get(label))
    return "\n".join(lines) + notes, what_happened(comp, by_method, keys)


def what_happened(comp: Comparison, by_method: dict[str, list[dict]], keys: list[str]) -> str:
    """Statements computed from the numbers (no interpretation): every pair of methods on the final held-out metrics
    and on their own metrics (mean of the last 10 training steps); each method's change over training."""
    out = []
    labels = [m.label for m in comp.methods]
    for i, a_label in enumerate(labels):
        for b_label in labels[i + 1:]:
            a_runs, b_runs = by_method.get(a_label) or [], by_method.get(b_label) or []
            if not a_runs or not b_runs:
                out.append(f"- {a_label} vs {b_label}: not comparable (a method failed).")
                continue
            parts = [_verdict(f"held-out {k} (final)", [r["eval"][-1][k] for r in a_runs],
                              [r["eval"][-1][k] for r in b_runs]) for k in keys]
            parts += [_verdict(label, [_last(r, key) for r in a_runs], [_last(r, key) for r in b_runs])
                      for key, label in comp.own_metrics]
            out.append(f"- {a_label} vs {b_label}: " + "; ".join(p for p in parts if p) + ".")
    for label, runs in by_method.items():
        if not runs:
            continue
        delta, sd = mean_std([r["eval"][-1][PRIMARY] - r["eval"][0][PRIMARY] for r in runs])
        trends = [f"{name} {_first(runs, key):.3f} → {_last_mean(runs, key):.3f}" for key, name in comp.own_metrics
                  if not math.isnan(_first(runs, key))]
        out.append(f"- {label}: held-out {PRIMARY} {_moved(delta, sd)} over training ({delta:+.3f} ± {sd:.3f} over "
                   f"{len(runs)} seeds); first → last 10 training steps: " + ", ".join(trends) + ".")
    return "\n".join(out)


def _verdict(name: str, a: list[float], b: list[float]) -> str:
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if math.isnan(ma) or math.isnan(mb):
        return ""
    if min(len(a), len(b)) < 2:
        word = "one seed: no verdict"
    else:
        word = ("higher" if ma > mb else "lower") if abs(ma - mb) > max(sa, sb) else "not distinguishable"
    return f"{name} {ma:.3f} ± {sa:.3f} vs {mb:.3f} ± {sb:.3f} ({word})"


def _moved(delta: float, sd: float) -> str:
    """With one seed (sd 0) this reports the sign of any change; the seed count is printed next to it."""
    return "improved" if delta > sd and delta > 0 else "fell" if -delta > sd else "did not move beyond noise"


def _last(run: dict, key: str, n: int = 10) -> float:
    values = [row[key] for row in run["train"][-n:] if key in row]
    return statistics.fmean(values) if values else math.nan


def _first_of(run: dict, key: str, n: int = 10) -> float:
    values = [row[key] for row in run["train"][:n] if key in row]
    return statistics.fmean(values) if values else math.nan


def _first(runs: list[dict], key: str) -> float:
    return mean_std([_first_of(r, key) for r in runs])[0]


def _last_mean(runs: list[dict], key: str) -> float:
    return mean_std([_last(r, key) for r in runs])[0]


def plot(comp: Comparison, results: list[dict], name: str, to_docs: bool) -> str:
    """The curves as a PNG: docs/img/<name>.png (returned as the docs-relative link), else under outputs/bench/plots."""
    plt = _common.pyplot()
    keys = headline_keys(comp)
    panels = [("eval", k, f"held-out {k}") for k in keys] + [("train", k, label) for k, label in comp.own_metrics]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (part, key, label) in zip(axes.flat, panels, strict=False):
        for m in comp.methods:
            runs = [r for r in results if r["method"] == m.label and not r["error"]]
            if not runs:
                continue
            steps, values = curves(runs, part, key)
            if not steps:
                continue
            mean = [statistics.fmean(v) for v in values]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            if part == "train":
                window = max(1, len(mean) // 12)
                mean, std = smooth(mean, window), smooth(std, window)
            ax.plot(steps, mean, label=m.label)
            ax.fill_between(steps, [a - s for a, s in zip(mean, std, strict=True)],
                            [a + s for a, s in zip(mean, std, strict=True)], alpha=0.2)
        ax.set_title(label + (" (smoothed)" if part == "train" else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{comp.name} on {comp.env}: mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    return _common.save_plot(fig, f"{name}.png", to_docs)
