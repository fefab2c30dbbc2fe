"""Helpers shared by the benchmarks: plotting, number formatting, the repo on sys.path."""

from __future__ import annotations

import math
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # scripts run as `python bench/x.py`: make rlfw/ and envs/ importable from a clone
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def pyplot():
    """matplotlib.pyplot with the file-only backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, name: str) -> str:
    """Save ``fig`` as docs/img/<name> and return the link to it relative to docs/benchmarks.md."""
    from _doc import IMG

    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / name, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    print(f"wrote {IMG / name}")
    return f"img/{name}"


def save_plot(fig, name: str, to_docs: bool) -> str:
    """``save_figure`` when the run writes the docs; else outputs/bench/plots/<name> (its path returned)."""
    if to_docs:
        return save_figure(fig, name)
    path = ROOT / "outputs" / "bench" / "plots"
    path.mkdir(parents=True, exist_ok=True)
    fig.savefig(path / name, dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    return str(path / name)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single value); NaNs are ignored."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def pm(values: Sequence[float], digits: int = 3) -> str:
    """'mean ± std' of ``values`` as table text."""
    mean, std = mean_std(values)
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def set_threads() -> None:
    """One intra-op thread: tiny models run several times faster and steadier that way on CPU."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
