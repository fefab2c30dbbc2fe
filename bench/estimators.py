"""Compute time of every registered advantage estimator on a synthetic generation batch.

    OMP_NUM_THREADS=1 python bench/estimators.py [--device cpu|cuda] [--repeats 20] [--no-write]

Prints a table (median over repeats) and appends it, with the command and date, to docs/benchmarks.md under
"## Estimator compute time". The batch has 4096 completions (G=8; median uses G=9, i.e. 4095), K=4 turns and
every optional field filled. EPO's loss term is timed separately (forward + backward on (64, 2048) entropies).
The IGPO answer probes are a trainer-side cost and are not part of this benchmark.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from rlfw import ops
from rlfw.advantages import ESTIMATORS, AdvantageBatch, build_estimator

NUM_COMPLETIONS = 4096
NUM_TURNS = 4
HEADING = "## Estimator compute time"
DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def synthetic_batch(group_size: int, device: str, seed: int = 0) -> AdvantageBatch:
    gen = torch.Generator().manual_seed(seed)
    n = (NUM_COMPLETIONS // group_size) * group_size
    turns = torch.randint(1, NUM_TURNS + 1, (n,), generator=gen)
    valid = ops.turn_valid_mask(turns, NUM_TURNS)
    nan = torch.tensor(float("nan"))
    batch = AdvantageBatch(
        rewards=torch.rand(n, generator=gen),  # (N,)
        group_ids=torch.arange(n // group_size).repeat_interleave(group_size),  # (N,)
        num_tool_calls=torch.randint(0, 4, (n,), generator=gen),  # (N,)
        num_turns=turns,  # (N,)
        truncated=torch.rand(n, generator=gen) < 0.1,  # (N,)
        turn_rewards=torch.where(valid, torch.rand(n, NUM_TURNS, generator=gen), nan),  # (N, K)
        answer_logprobs=torch.where(valid, -3 * torch.rand(n, NUM_TURNS, generator=gen), nan),  # (N, K)
    )
    fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()}
    return AdvantageBatch(**fields)


def _timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(device: str, repeats: int) -> list[tuple[str, int, float]]:
    rows = []
    for name in ESTIMATORS:
        estimator = build_estimator(name)
        batch = synthetic_batch(9 if name == "median" else 8, device)
        rows.append((name, batch.rewards.numel(), _timed(lambda e=estimator, b=batch: e(b), device, repeats)))
    epo = build_estimator("epo")
    epo.update_history(0.6)
    entropies = torch.rand(64, 2048, device=device, requires_grad=True)  # (N_local, T)
    mask = torch.rand(64, 2048, device=device) < 0.8  # (N_local, T)
    turn_ids = torch.arange(2048, device=device).expand(64, -1) // 512  # (N_local, T)

    def epo_loss():
        epo.loss_term(entropies, mask, turn_ids, 10, 100).backward()

    rows.append(("epo.loss_term (fwd+bwd, 64x2048 tokens)", 64 * 2048, _timed(epo_loss, device, repeats)))
    return rows


def table(rows: list[tuple[str, int, float]]) -> str:
    lines = ["| estimator | rows | median ms |", "|---|---:|---:|"]
    lines += [f"| {name} | {n} | {ms:.3f} |" for name, n, ms in rows]
    return "\n".join(lines)


def append_to_doc(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if HEADING not in doc:
        doc = doc.rstrip("\n") + f"\n\n{HEADING}\n\nProduced by `bench/estimators.py`; newest results last.\n"
    start = doc.index(HEADING) + len(HEADING)
    end = doc.find("\n## ", start)
    end = len(doc) if end < 0 else end
    doc = doc[:end].rstrip("\n") + "\n\n" + text + "\n" + doc[end:]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch docs/benchmarks.md")
    args = parser.parse_args()
    result = table(run(args.device, args.repeats))
    print(result)
    if not args.no_write:
        hardware = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
        threads = os.environ.get("OMP_NUM_THREADS")
        command = (f"OMP_NUM_THREADS={threads} " if threads else "") + "python " + shlex.join(sys.argv)
        today = datetime.date.today().isoformat()
        append_to_doc(
            f"### {today}: `{command}`\n\n"
            f"Device {args.device} ({hardware}), torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
            f"median of {args.repeats} repeats; 4096 completions (median: 4095, G=9), G=8, K={NUM_TURNS}.\n\n{result}"
        )


if __name__ == "__main__":
    main()
