"""What the advantage estimators cost: their compute time, and the no-grad probes of IGPO (answer probes) and InfoPO
(counterfactual information gain) next to a GRPO training step.

    OMP_NUM_THREADS=1 python bench/estimators.py [--device cpu|cuda] [--repeats 20] [--probe-steps 8] [--no-write]

1. Compute time (median over repeats) of every registered estimator on a synthetic generation batch of 4096
   completions (G=8; median uses G=9, i.e. 4095), K=4 turns and every optional field filled (0/1 rewards for
   noisy_verifier). The loss terms of EPO and OPMD are timed separately (forward + backward on (64, 2048) tokens).
2. Probe cost: the tiny local model is warm-started by SFT on search_qa traces (so that it searches, and episodes
   have several rounds), then trained ``--probe-steps`` steps with configs/search_qa/igpo.yaml, as is, with
   ``advantage_estimator: infopo`` and with ``advantage_estimator: grpo`` (same settings, same seed). Reported:
   seconds per training step (TRL's ``step_time``, generation included), probe seconds per step
   (``advantages/<name>/probe_seconds``), and the probe tokens forwarded per step next to the step's training
   tokens (prompt + completion); means over steps 2..N (the first step warms up).

Both tables are appended, with the command, date and machine, to docs/benchmarks.md ("Estimator compute time",
"Probe cost: IGPO and InfoPO").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _doc import ROOT, append_result, machine

from rlfw import ops
from rlfw.advantages import ESTIMATORS, AdvantageBatch, LossInputs, build_estimator

NUM_COMPLETIONS = 4096
NUM_TURNS = 4
PROBE_CONFIG = ROOT / "configs" / "search_qa" / "igpo.yaml"
PROBING = ("igpo", "infopo")  # the estimators with no-grad probes, compared with grpo
BINARY_REWARDS = {"noisy_verifier"}
# The probe run: the config's own settings except what keeps it short on a CPU.
PROBE_OVERRIDES = {"per_device_train_batch_size": 16, "num_generations": 8, "dataset_size": 256,
                   "save_strategy": "no", "disable_tqdm": True, "logging_steps": 1}


# ---------------------------------------------------------------- 1. estimator compute time
def synthetic_batch(group_size: int, device: str, seed: int = 0, binary: bool = False) -> AdvantageBatch:
    gen = torch.Generator().manual_seed(seed)
    n = (NUM_COMPLETIONS // group_size) * group_size
    turns = torch.randint(1, NUM_TURNS + 1, (n,), generator=gen)
    valid = ops.turn_valid_mask(turns, NUM_TURNS)
    nan = torch.tensor(float("nan"))
    rewards = torch.rand(n, generator=gen)  # (N,)
    batch = AdvantageBatch(
        rewards=(rewards > 0.5).float() if binary else rewards,  # (N,)
        group_ids=torch.arange(n // group_size).repeat_interleave(group_size),  # (N,)
        num_tool_calls=torch.randint(0, 4, (n,), generator=gen),  # (N,)
        num_turns=turns,  # (N,)
        truncated=torch.rand(n, generator=gen) < 0.1,  # (N,)
        turn_rewards=torch.where(valid, torch.rand(n, NUM_TURNS, generator=gen), nan),  # (N, K)
        answer_logprobs=torch.where(valid, -3 * torch.rand(n, NUM_TURNS, generator=gen), nan),  # (N, K)
        info_gain=torch.where(ops.turn_valid_mask(turns - 1, NUM_TURNS), torch.randn(n, NUM_TURNS, generator=gen),
                              nan),  # (N, K)
        turn_lengths=torch.where(valid, torch.randint(1, 200, (n, NUM_TURNS), generator=gen), 0),  # (N, K)
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
        batch = synthetic_batch(9 if name == "median" else 8, device, binary=name in BINARY_REWARDS)
        rows.append((name, batch.rewards.numel(), _timed(lambda e=estimator, b=batch: e(b), device, repeats)))
    epo = build_estimator("epo")
    epo.update_history(0.6)
    entropies = torch.rand(64, 2048, device=device, requires_grad=True)  # (N_local, T)
    mask = torch.rand(64, 2048, device=device) < 0.8  # (N_local, T)
    turn_ids = torch.arange(2048, device=device).expand(64, -1) // 512  # (N_local, T)

    def epo_loss():
        epo.loss_term(entropies, mask, turn_ids, 10, 100).backward()

    rows.append(("epo.loss_term (fwd+bwd, 64x2048 tokens)", 64 * 2048, _timed(epo_loss, device, repeats)))
    opmd = build_estimator("opmd")
    logps = -torch.rand(64, 2048, device=device, requires_grad=True)  # (N_local, T)
    inputs = LossInputs(logps=logps, old_logps=logps.detach() + 0.01, entropies=entropies, mask=mask,
                        turn_ids=turn_ids, step=10, max_steps=100)

    def opmd_loss():
        opmd.loss(inputs).backward()

    rows.append(("opmd.loss (fwd+bwd, 64x2048 tokens)", 64 * 2048, _timed(opmd_loss, device, repeats)))
    return rows


def table(rows: list[tuple[str, int, float]]) -> str:
    lines = ["| estimator | rows | median ms |", "|---|---:|---:|"]
    lines += [f"| {name} | {n} | {ms:.3f} |" for name, n, ms in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- 2. probe cost (IGPO, InfoPO)
def warm_started_model(workdir: Path, examples: int, epochs: float) -> str:
    """The tiny local model after SFT on search_qa traces (tool calls, then the answer); the bare model if 0."""
    from rlfw.assets import build_assets

    assets = str(build_assets(workdir / "tiny", seed=0))
    if examples <= 0:
        return assets
    sys.path.insert(0, str(ROOT / "recipes"))
    from sft import run_sft  # the repository's warm-start recipe

    return run_sft(assets, "envs.search_qa", str(workdir / "sft"), num_examples=examples, epochs=epochs)


def probe_run(model: str, estimator: str, steps: int, workdir: Path) -> dict[str, float]:
    """Train ``steps`` steps of the search_qa config with ``estimator``; per-step means over steps 2..N."""
    from rlfw.assets import load_tokenizer
    from rlfw.recipe import load_datasets, parse_args
    from rlfw.trainer import RLTrainer

    probe_tokens: dict[int, int] = {}  # by step (1-based)

    class CountingTrainer(RLTrainer):
        def _probe_logprobs(self, input_ids, attention_mask, logits_to_keep):
            step = self.state.global_step + 1
            probe_tokens[step] = probe_tokens.get(step, 0) + int(attention_mask.sum())
            return super()._probe_logprobs(input_ids, attention_mask, logits_to_keep)

    argv = ["--config", str(PROBE_CONFIG), "--output_dir", str(workdir / estimator), "--model_name_or_path", model,
            "--advantage_estimator", estimator, "--max_steps", str(steps)]
    for key, value in PROBE_OVERRIDES.items():
        argv += [f"--{key}", str(value)]
    script_args, config, _ = parse_args(argv)
    train_dataset, _ = load_datasets(script_args)
    trainer = CountingTrainer(model=model, args=config, train_dataset=train_dataset,
                              processing_class=load_tokenizer(model))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "step_time" in entry]
    for previous, entry in zip(logs, logs[1:], strict=False):  # num_tokens counts from the start of training
        entry["train_tokens"] = entry["num_tokens"] - previous["num_tokens"]
        entry["probe_tokens"] = probe_tokens.get(entry["step"], 0)
    logs = logs[1:]  # step 1 warms up

    def mean(key: str) -> float:
        values = [entry[key] for entry in logs if key in entry]
        return statistics.fmean(values) if values else 0.0

    return {"step_seconds": mean("step_time"), "probe_seconds": mean(f"advantages/{estimator}/probe_seconds"),
            "turns": mean("turns/mean"), "probe_tokens": mean("probe_tokens"), "train_tokens": mean("train_tokens")}


def probe_cost(steps: int, sft_examples: int, sft_epochs: float) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = warm_started_model(workdir, sft_examples, sft_epochs)
        grpo = probe_run(model, "grpo", steps, workdir)
        runs = {name: probe_run(model, name, steps, workdir) for name in PROBING}
    lines = [
        "| run | s/step | probe s/step | probe share of the step | probe s / grpo s/step | turns/episode | "
        "probe tokens/step | training tokens/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| grpo | {grpo['step_seconds']:.3f} | - | - | - | {grpo['turns']:.2f} | - | {grpo['train_tokens']:.0f} |",
    ]
    lines += [f"| {name} | {r['step_seconds']:.3f} | {r['probe_seconds']:.3f} | "
              f"{r['probe_seconds'] / r['step_seconds']:.1%} | {r['probe_seconds'] / grpo['step_seconds']:.1%} | "
              f"{r['turns']:.2f} | {r['probe_tokens']:.0f} | {r['train_tokens']:.0f} |" for name, r in runs.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of the estimator timing")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--probe-steps", type=int, default=8, help="training steps per probe run; 0 skips part 2")
    parser.add_argument("--sft-examples", type=int, default=2000, help="search_qa traces of the warm start (0: none)")
    parser.add_argument("--sft-epochs", type=float, default=2.0)
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    compute = table(run(args.device, args.repeats))
    print(compute)
    if not args.no_write:
        append_result(
            "Estimator compute time", "Produced by `bench/estimators.py`; newest results last.",
            f"{machine()}; device {args.device}, median of {args.repeats} repeats; 4096 completions (median: 4095, "
            f"G=9), G=8, K={NUM_TURNS}.\n\n{compute}")
    if args.probe_steps <= 0:
        return
    probes = probe_cost(args.probe_steps, args.sft_examples, args.sft_epochs)
    print(probes)
    if not args.no_write:
        append_result(
            "Probe cost: IGPO and InfoPO",
            "Produced by `bench/estimators.py`; newest results last. IGPO's probes are extra no-grad forward passes "
            "over every (rollout, round) prefix plus the answer; InfoPO's are two no-grad passes (real and "
            "placeholder feedback) per turn followed by a tool result, up to the end of the next action. This "
            "compares them with a whole GRPO training step (generation, tools, loss, optimizer) on the same config.",
            f"{machine()}; configs/search_qa/igpo.yaml (advantage_estimator igpo, infopo, grpo) with {PROBE_OVERRIDES['per_device_train_batch_size']} "
            f"completions per step (G={PROBE_OVERRIDES['num_generations']}), max_completion_length 160, max_turns 4; "
            f"tiny local model after SFT on {args.sft_examples} search_qa traces x {args.sft_epochs:g} epochs; "
            f"means over steps 2-{args.probe_steps}.\n\n{probes}")


if __name__ == "__main__":
    main()
