"""What IGPO's answer probes cost: RLTrainer(igpo) against RLTrainer(grpo) on search_qa, same model, data and seed.

    OMP_NUM_THREADS=2 python bench/probe_cost.py --model assets/smollm2-135m-instruct --chat-template hermes
        [--steps 2 --warmup-steps 1 --batch 8 --group 4 --max-completion-length 160 --max-turns 3] [--no-write]

Three contenders, each a fresh trainer from the same saved model: ``grpo`` (no probes), ``igpo`` (probes only the
rollouts whose information gains IGPO uses: finished, with at least one tool-followed turn) and ``igpo-probe-all``
(every rollout probed, as before that skipping: a truncated rollout's gains are discarded, so its probes were wasted
work). Per timed step: wall time and its phases (bench/overhead.py's ``Breakdown``), the probes' own seconds, the
fraction of rollouts probed and truncated, and the peak RSS of the step and of the probes (sampled every 2 ms).
Without ``--model``, the local ``tiny`` preset.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import set_threads
from _doc import append_result, machine
from overhead import Breakdown, RSSSampler, StepTimer, release_memory
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

CONTENDERS = ("grpo", "igpo", "igpo-probe-all")


class Logs(TrainerCallback):
    """The logged metrics of every step."""

    def __init__(self):
        self.entries: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            self.entries.append(dict(logs))


def probe_peak(trainer) -> RSSSampler:
    """Track the peak RSS while the trainer's probes run (wraps ``_timed_probes``)."""
    sampler = RSSSampler()
    inner = trainer._timed_probes

    def sampled(run):
        sampler._stop.clear()
        sampler.start()
        try:
            return inner(run)
        finally:
            sampler.stop()

    trainer._timed_probes = sampled
    return sampler


def one_run(contender: str, model_path: str, tokenizer, args) -> dict:
    from envs import search_qa
    from rlfw import RLConfig, RLTrainer, probes

    out = tempfile.mkdtemp(prefix=f"probe-cost-{contender}-")
    base = release_memory()
    timer, logs = StepTimer(args.warmup_steps, "cpu"), Logs()
    config = RLConfig(
        advantage_estimator="grpo" if contender == "grpo" else "igpo", environment="envs.search_qa",
        max_turns=args.max_turns, output_dir=out, use_cpu=True, bf16=False, gradient_checkpointing=False,
        report_to="none", dataloader_pin_memory=False, save_strategy="no", logging_steps=1, disable_tqdm=True,
        seed=0, max_steps=args.warmup_steps + args.steps, num_generations=args.group,
        per_device_train_batch_size=args.batch, max_completion_length=args.max_completion_length,
        learning_rate=1e-5, temperature=1.0, beta=0.0)
    torch.manual_seed(0)
    trainer = RLTrainer(model=model_path, args=config, train_dataset=search_qa.build_dataset(64, seed=0),
                        processing_class=tokenizer, callbacks=[timer, logs])
    trainer.remove_callback(PrinterCallback)
    timer.breakdown = Breakdown(trainer, "cpu")
    sampler = probe_peak(trainer) if contender != "grpo" else None
    original = probes.answer_logprobs
    if contender == "igpo-probe-all":
        probes.answer_logprobs = lambda *a, probed=None, **k: original(*a, **k)  # ignore the skip mask
    try:
        trainer.train()
    finally:
        probes.answer_logprobs = original
    timed = logs.entries[args.warmup_steps:]
    result = {
        "s_per_step": statistics.fmean(timer.times), "phases": timer.breakdown.per_step(timer.times),
        "peak_mb": (timer.sampler.peak - base) / 2**20,
        "probe_peak_mb": (sampler.peak - base) / 2**20 if sampler is not None and sampler.peak else float("nan"),
        "truncated": statistics.fmean(e.get("rollout/truncated_frac", float("nan")) for e in timed),
        "probed": 1.0 if contender == "igpo-probe-all" else
        statistics.fmean(e.get("advantages/igpo/probed_frac", 0.0) for e in timed),
        "reward": statistics.fmean(e["reward"] for e in timed),
    }
    del trainer
    shutil.rmtree(out, ignore_errors=True)
    release_memory()
    return result


def table(runs: dict[str, dict]) -> str:
    lines = ["| contender | s/step | probes s/step | rollouts probed | rollouts truncated | peak RSS increase (MB) | "
             "peak RSS increase during probes (MB) | reward |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['s_per_step']:.2f} | {r['phases']['probes']:.2f} | {r['probed']:.2f} | "
                     f"{r['truncated']:.2f} | {r['peak_mb']:.0f} | {r['probe_peak_mb']:.0f} | {r['reward']:.3f} |")
    phases = list(next(iter(runs.values()))["phases"])
    lines += ["", "| contender | " + " | ".join(phases) + " |", "|---|" + "---:|" * len(phases)]
    for name, r in runs.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['phases'][p]:.2f}" for p in phases) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the local tiny preset)")
    parser.add_argument("--chat-template", default=None, help="replace the model's chat template, e.g. 'hermes'")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=160)
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch docs/")
    args = parser.parse_args()
    set_threads()
    from rlfw.assets import ensure_assets, load_tokenizer

    start = time.time()
    model_path = args.model or str(ensure_assets(Path(tempfile.gettempdir()) / "rlfw-probe-cost-tiny"))
    tokenizer = load_tokenizer(model_path, args.chat_template)
    runs = {}
    for contender in CONTENDERS:
        runs[contender] = one_run(contender, model_path, tokenizer, args)
        print(f"{contender}: {runs[contender]}", flush=True)
    text = table(runs)
    print(text)
    if args.no_write:
        return
    model = f"`{model_path}`" + (f" with chat template `{args.chat_template}`" if args.chat_template else "")
    body = (f"{machine()}; OMP_NUM_THREADS={torch.get_num_threads()}. Model {model}; envs.search_qa, "
            f"{args.batch} episodes per step, G={args.group}, max_turns {args.max_turns}, max_completion_length "
            f"{args.max_completion_length}, T=1.0; each contender a fresh trainer, {args.warmup_steps} untimed + "
            f"{args.steps} timed steps; {time.time() - start:.0f} s in all.\n\n{text}\n")
    append_result("IGPO answer-probe cost",
                  "Produced by `bench/estimators.py` and `bench/probe_cost.py`; newest last.", body)


if __name__ == "__main__":
    main()
