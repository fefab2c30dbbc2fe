"""What rlfw costs over plain TRL: whole training steps of RLTrainer(grpo) vs GRPOTrainer, same model, data, seed.

    OMP_NUM_THREADS=1 python bench/overhead.py [--modes single multi --repeats 7 --steps 10 --warmup-steps 2]
        [--device cpu|cuda --bf16 --preset tiny|small --hidden-size H --num-layers L ...] [--no-kv-cache] [--profile]
        [--no-write]

Two settings, each run = a fresh trainer built from the same saved model, ``warmup-steps`` steps not counted, then
``steps`` timed optimizer steps (wall time between consecutive ``on_step_end`` callbacks, so generation, rewards,
advantages, loss, backward, optimizer and logging are all inside):

- ``single``: single-turn ``envs.arithmetic`` with ``exact_match``; both sample from the same RNG state, and the
  bench checks that both trained on the same number of completion tokens.
- ``multi``: multi-turn tool use, rlfw's engine (``environment=``) vs TRL's own tool loop (``environment_factory=``)
  on the scripted ``BenchEnv`` of bench/rollout.py. Its ``ForceTurns`` logits processor makes every rollout call
  the tool in each turn but the last and answer in the last, for both contenders, so they sample identical tokens
  and the ratio measures the frameworks, not the model.

Runs alternate between the contenders (ABAB..., the order flipping every repeat) after one discarded warm-up run
each. Ratio = rlfw / TRL of the paired runs; the table gives min / median / max over repeats.
Memory: on CUDA, ``torch.cuda.max_memory_allocated`` per run; on CPU, the peak resident set size (RSS, sampled by a
psutil thread every 2 ms) during the timed steps minus the RSS before the trainer was built, after ``gc.collect()``
and ``malloc_trim`` (tracemalloc would slow the steps several-fold and misses torch's allocator).
``--profile`` adds one cProfile run per contender and prints where rlfw's extra time goes. The PNG
(docs/img/overhead_<device>.png) shows every repeat's ratios.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import gc
import io
import pstats
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from _common import pyplot, save_plot, set_threads
from _doc import append_result, machine
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

CONTENDERS = ("trl", "rlfw")


PHASES = ("sampling", "environment", "rewards", "logprob passes", "probes", "loss forward", "backward", "other")


class Breakdown:
    """Where a step's time goes, by wrapping the methods each phase runs in (both contenders run TRL's):

    - sampling: ``model.generate`` (every turn's decoding);
    - environment: the rest of ``_generate``: tool-call parsing, tool execution, tokenizing tool results, the
      rollout loop itself (TRL's tool loop or rlfw's engine);
    - rewards: ``_calculate_rewards``;
    - logprob passes: no-grad ``_get_per_token_logps_and_entropies`` (old / reference log-probs);
    - probes: rlfw's estimator probes (IGPO, InfoPO), their forwards included;
    - loss forward: the policy forward with grad inside the loss; backward: ``accelerator.backward``;
    - other: the step's wall time minus all of these (advantages, loss arithmetic, optimizer, logging).
    """

    def __init__(self, trainer, device: str):
        self.device = device
        self.totals: dict[str, float] = dict.fromkeys(PHASES[:-1], 0.0)
        self._generation = 0.0
        self._in_probe = False
        self._wrap(trainer, "_generate", lambda: "_generation")
        self._wrap(trainer.model, "generate", lambda: "sampling")
        self._wrap(trainer, "_calculate_rewards", lambda: "rewards")
        self._wrap(trainer, "_get_per_token_logps_and_entropies",
                   lambda: None if self._in_probe else "loss forward" if torch.is_grad_enabled() else "logprob passes")
        self._wrap(trainer.accelerator, "backward", lambda: "backward")
        if hasattr(trainer, "_timed_probes"):
            self._wrap(trainer, "_timed_probes", lambda: "probes", probe=True)

    def _now(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _wrap(self, owner, name: str, phase, probe: bool = False) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            key = phase()
            if key is None:
                return inner(*args, **kwargs)
            start = self._now()
            self._in_probe = self._in_probe or probe
            try:
                return inner(*args, **kwargs)
            finally:
                if probe:
                    self._in_probe = False
                elapsed = self._now() - start
                if key == "_generation":
                    self._generation += elapsed
                else:
                    self.totals[key] += elapsed

        setattr(owner, name, timed)

    def reset(self) -> None:
        self.totals = dict.fromkeys(self.totals, 0.0)
        self._generation = 0.0

    def per_step(self, step_times: list[float]) -> dict[str, float]:
        """Seconds per timed step of each phase (exclusive: they add up to the mean step time)."""
        n = max(len(step_times), 1)
        phases = {**self.totals, "environment": self._generation - self.totals["sampling"]}
        phases = {k: v / n for k, v in phases.items()}
        phases["other"] = statistics.fmean(step_times) - sum(phases.values()) if step_times else 0.0
        return {k: phases[k] for k in PHASES}


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (between consecutive step ends) and the memory peak of the timed steps."""

    def __init__(self, warmup_steps: int, device: str):
        self.warmup_steps, self.device = warmup_steps, device
        self.times: list[float] = []
        self._last = 0.0
        self.sampler = RSSSampler() if device == "cpu" else None
        self.breakdown: Breakdown | None = None

    def _now(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        if state.global_step > self.warmup_steps:
            self.times.append(now - self._last)
        elif state.global_step == self.warmup_steps:  # memory peak and phases of the timed steps only
            if self.breakdown is not None:
                self.breakdown.reset()
            if self.sampler is not None:
                self.sampler.start()
            else:
                torch.cuda.reset_peak_memory_stats()
        self._last = self._now()

    def on_train_end(self, args, state, control, **kwargs):
        if self.sampler is not None:
            self.sampler.stop()


class RSSSampler:
    """Peak RSS of this process, sampled by a background thread."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def release_memory() -> int:
    """Collect garbage, hand freed heap back to the OS, and return the RSS in bytes."""
    import psutil

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss


def common_settings(args, out: str) -> dict:
    cpu = args.device == "cpu"
    return dict(output_dir=out, use_cpu=cpu, bf16=args.bf16, fp16=False, gradient_checkpointing=False, report_to="none",
                dataloader_pin_memory=False, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                max_steps=args.warmup_steps + args.steps, num_generations=args.group,
                per_device_train_batch_size=args.batch, max_completion_length=args.max_completion_length,
                learning_rate=1e-5, temperature=1.0, beta=0.0)


def build_trainer(contender: str, mode: str, model_path: str, tokenizer, args, out: str, callback):
    from trl import GRPOConfig, GRPOTrainer

    from rlfw import RLConfig, RLTrainer

    settings = common_settings(args, out)
    if mode == "single":
        from envs import arithmetic

        dataset = arithmetic.build_dataset(max(64, 4 * args.batch), seed=0)
        rewards, extra = arithmetic.REWARD_FUNCS, {}
    else:
        from datasets import Dataset
        from rollout import BenchEnv

        dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"say hi {i}"}]} for i in range(64)])
        rewards = [constant_reward]
        settings["max_tool_calling_iterations"] = args.turns
        settings["max_completion_length"] = args.multi_max_completion_length
        extra = {"environment_factory": BenchEnv}
        if contender == "rlfw":
            settings["max_turns"] = args.turns
            settings["reuse_kv_cache"] = not getattr(args, "no_kv_cache", False)
    if contender == "trl":
        trainer = GRPOTrainer(model=model_path, reward_funcs=rewards, args=GRPOConfig(**settings),
                              train_dataset=dataset, processing_class=tokenizer, callbacks=[callback], **extra)
    else:
        config = RLConfig(advantage_estimator="grpo", **settings)
        trainer = RLTrainer(model=model_path, reward_funcs=rewards, args=config, train_dataset=dataset,
                            processing_class=tokenizer, callbacks=[callback], **extra)
    if mode == "multi":
        from rollout import force

        force(trainer.model, tokenizer, args.turns)
    trainer.remove_callback(PrinterCallback)  # per-step log dicts on stdout would drown the table
    return trainer


def constant_reward(completions, **kwargs) -> list[float]:
    return [1.0] * len(completions)


class TokenCounter(TrainerCallback):
    """Completion tokens trained on (TRL logs num_tokens cumulatively, prompts included)."""

    def __init__(self):
        self.tokens = 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "num_tokens" in logs:
            self.tokens = logs["num_tokens"]


def one_run(contender: str, mode: str, model_path: str, tokenizer, args, profiler=None) -> dict:
    out = tempfile.mkdtemp(prefix=f"overhead-{contender}-")
    base = release_memory()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    timer, tokens = StepTimer(args.warmup_steps, args.device), TokenCounter()
    torch.manual_seed(0)
    trainer = build_trainer(contender, mode, model_path, tokenizer, args, out, timer)
    timer.breakdown = Breakdown(trainer, args.device)
    trainer.add_callback(tokens)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with profiler if profiler is not None else contextlib.nullcontext():
        trainer.train()
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = timer.sampler.peak - base
    del trainer
    shutil.rmtree(out, ignore_errors=True)
    release_memory()
    return {"s_per_step": statistics.fmean(timer.times), "peak_mb": peak / 2**20, "tokens": tokens.tokens,
            "phases": timer.breakdown.per_step(timer.times)}


def measure(mode: str, model_path: str, tokenizer, args) -> dict[str, list[dict]]:
    runs = {c: [] for c in CONTENDERS}
    for contender in CONTENDERS:  # warm-up: lazy imports, template compilation, allocator growth
        one_run(contender, mode, model_path, tokenizer, args)
    for rep in range(args.repeats):
        order = CONTENDERS if rep % 2 == 0 else CONTENDERS[::-1]
        for contender in order:
            runs[contender].append(one_run(contender, mode, model_path, tokenizer, args))
        trl, rlfw = runs["trl"][-1], runs["rlfw"][-1]
        print(f"[{mode}] repeat {rep}: s/step trl {trl['s_per_step']:.4f} rlfw {rlfw['s_per_step']:.4f} "
              f"(ratio {rlfw['s_per_step'] / trl['s_per_step']:.3f}); peak MB trl {trl['peak_mb']:.1f} "
              f"rlfw {rlfw['peak_mb']:.1f}; tokens trl {trl['tokens']:.0f} rlfw {rlfw['tokens']:.0f}", flush=True)
    return runs


def spread(values: list[float], digits: int = 3) -> str:
    return f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} / {max(values):.{digits}f}"


def ratios(runs: dict[str, list[dict]], key: str) -> list[float]:
    """rlfw / TRL of ``key`` for each pair of alternating runs."""
    return [b[key] / a[key] if a[key] > 0 else float("nan") for a, b in zip(runs["trl"], runs["rlfw"], strict=True)]


def setting_name(mode: str, args) -> str:
    if mode == "single":
        return "single-turn (arithmetic)"
    return f"multi-turn ({args.turns} turns, BenchEnv{', rlfw without its KV cache' if getattr(args, 'no_kv_cache', False) else ''})"


def plot(results: dict[str, dict[str, list[dict]]], args, to_docs: bool) -> str:
    """Every repeat's time and memory ratio per setting, with the 1.05 target: docs/img/overhead_<device>.png."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, label in ((axes[0], "s_per_step", "time ratio rlfw / TRL"),
                           (axes[1], "peak_mb", "memory ratio rlfw / TRL")):
        for i, runs in enumerate(results.values()):
            values = ratios(runs, key)
            ax.scatter([i] * len(values), values, alpha=0.6)
            ax.hlines(statistics.median(values), i - 0.25, i + 0.25, color="black")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        if key == "s_per_step":
            ax.axhline(1.05, color="red", linestyle="--", linewidth=0.8, label="target 1.05")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(results)), [setting_name(m, args) for m in results], fontsize=8)
        ax.set_title(f"{label} (each dot a repeat, bar the median)", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"overhead on {args.device}: {args.repeats} alternating repeats", fontsize=10)
    fig.tight_layout()
    suffix = f"_{Path(args.model).name}" if args.model else ""
    return save_plot(fig, f"overhead_{args.device}{suffix}.png", to_docs)


def table(results: dict[str, dict[str, list[dict]]], args) -> str:
    memory = "peak GPU memory allocated (MB)" if args.device == "cuda" else "peak RSS increase (MB)"
    lines = [f"| setting | TRL s/step (median) | rlfw s/step (median) | time ratio rlfw/TRL min / median / max | "
             f"TRL {memory} (median) | rlfw {memory} (median) | memory ratio min / median / max | same tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for mode, runs in results.items():
        trl, rlfw = runs["trl"], runs["rlfw"]
        time_ratio, mem_ratio = ratios(runs, "s_per_step"), ratios(runs, "peak_mb")
        same = all(a["tokens"] == b["tokens"] for a, b in zip(trl, rlfw, strict=True))
        name = setting_name(mode, args)
        lines.append(
            f"| {name} | {statistics.median(r['s_per_step'] for r in trl):.4f} | "
            f"{statistics.median(r['s_per_step'] for r in rlfw):.4f} | {spread(time_ratio)} | "
            f"{statistics.median(r['peak_mb'] for r in trl):.1f} | "
            f"{statistics.median(r['peak_mb'] for r in rlfw):.1f} | "
            f"{spread(mem_ratio, 2)} | {'yes' if same else 'NO'} |")
    return "\n".join(lines)


def phase_table(results: dict[str, dict[str, list[dict]]], args) -> str:
    """Seconds per step of each phase (median over repeats) per contender, and rlfw minus TRL."""
    lines = ["| setting | phase | TRL s/step | rlfw s/step | rlfw - TRL |", "|---|---|---:|---:|---:|"]
    for mode, runs in results.items():
        for phase in PHASES:
            trl = statistics.median(r["phases"][phase] for r in runs["trl"])
            rlfw = statistics.median(r["phases"][phase] for r in runs["rlfw"])
            lines.append(f"| {setting_name(mode, args)} | {phase} | {trl:.3f} | {rlfw:.3f} | {rlfw - trl:+.3f} |")
    return "\n".join(lines)


def profile(mode: str, model_path: str, tokenizer, args, top: int = 20) -> str:
    """cProfile one run per contender: total time, and the functions whose own time (tottime) differs most."""
    import cProfile

    stats = {}
    for contender in CONTENDERS:
        prof = cProfile.Profile()
        one_run(contender, mode, model_path, tokenizer, args, profiler=prof)
        stats[contender] = pstats.Stats(prof, stream=io.StringIO())

    def own_time(s: pstats.Stats) -> dict[str, float]:
        out: dict[str, float] = {}
        for (path, line, name), row in s.stats.items():
            key = f"{'/'.join(Path(path).parts[-2:])}:{line}({name})"
            out[key] = out.get(key, 0.0) + row[2]
        return out

    trl, rlfw = own_time(stats["trl"]), own_time(stats["rlfw"])
    keys = sorted(set(trl) | set(rlfw), key=lambda k: -abs(rlfw.get(k, 0.0) - trl.get(k, 0.0)))[:top]
    lines = [f"cProfile, {mode}, one run each ({args.warmup_steps + args.steps} steps): total TRL "
             f"{stats['trl'].total_tt:.3f} s, rlfw {stats['rlfw'].total_tt:.3f} s; own time (tottime) of the "
             f"functions that differ most:", f"{'function':78s} {'TRL':>7s} {'rlfw':>7s} {'diff':>7s}"]
    for k in keys:
        a, b = trl.get(k, 0.0), rlfw.get(k, 0.0)
        lines.append(f"{k[:78]:78s} {a:7.3f} {b:7.3f} {b - a:+7.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=["single", "multi"], default=["single", "multi"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--batch", type=int, default=16, help="completions per step (per_device_train_batch_size)")
    parser.add_argument("--group", type=int, default=8, help="num_generations")
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--turns", type=int, default=3, help="assistant turns per episode (multi)")
    parser.add_argument("--multi-max-completion-length", type=int, default=160,
                        help="token budget of a whole multi-turn episode (room for every forced turn)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", choices=["tiny", "small"], default="tiny", help="rlfw.assets model preset")
    parser.add_argument("--hidden-size", type=int, default=None, help="override the preset (a larger local model)")
    parser.add_argument("--num-layers", type=int, default=None, help="override the preset")
    parser.add_argument("--intermediate-size", type=int, default=None, help="override the preset")
    parser.add_argument("--num-heads", type=int, default=None, help="override the preset (attention heads)")
    parser.add_argument("--model", default=None, help="a model directory instead of a local preset, e.g. "
                        "assets/smollm2-135m-instruct (make real-model)")
    parser.add_argument("--chat-template", default=None, help="replace the model's chat template, e.g. 'hermes'")
    parser.add_argument("--bf16", action="store_true", help="train in bf16 (CUDA)")
    parser.add_argument("--no-kv-cache", action="store_true",
                        help="multi: rlfw recomputes the whole conversation every turn (reuse_kv_cache=False)")
    parser.add_argument("--profile", action="store_true", help="also cProfile one run per contender")
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch docs/")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    if args.bf16 and args.device != "cuda":
        parser.error("--bf16 is for --device cuda")
    set_threads()
    from rlfw.assets import build_assets, load_tokenizer

    start = time.time()
    if args.model is not None:
        model_path = args.model
    else:
        assets = tempfile.mkdtemp(prefix="overhead-assets-")
        atexit.register(shutil.rmtree, assets, ignore_errors=True)
        model_path = str(build_assets(Path(assets) / "model", seed=0, preset=args.preset, hidden_size=args.hidden_size,
                                      num_layers=args.num_layers, intermediate_size=args.intermediate_size,
                                      num_heads=args.num_heads))
    tokenizer = load_tokenizer(model_path, args.chat_template)
    results = {mode: measure(mode, model_path, tokenizer, args) for mode in args.modes}
    text = table(results, args) + "\n\nWhere the time goes (seconds per step, median over repeats):\n\n" + \
        phase_table(results, args)
    image = plot(results, args, to_docs=not args.no_write)
    print(f"{text}\nplot: {image}")
    profiles = [profile(mode, model_path, tokenizer, args) for mode in args.modes] if args.profile else []
    for p in profiles:
        print(p)
    if args.no_write:
        return
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_config(cfg).parameters())
    precision = "bf16" if args.bf16 else "fp32"
    model = (f"`{args.model}`" + (f" with chat template `{args.chat_template}`" if args.chat_template else "")
             if args.model else f"local Llama preset `{args.preset}`")
    body = (f"{machine()}; device {args.device}, {precision}, OMP_NUM_THREADS={torch.get_num_threads()}. Model: "
            f"{model} (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {params / 1e6:.2f} M parameters), "
            "seed 0. "
            f"{args.batch} completions per step, G={args.group}, max_completion_length {args.max_completion_length} "
            f"(single) / "
            f"{args.multi_max_completion_length} (multi, {args.turns} forced turns). "
            f"Each run: fresh trainer, {args.warmup_steps} untimed + {args.steps} timed steps; {args.repeats} "
            f"alternating repeats after one warm-up run each; {time.time() - start:.0f} s in all.\n\n{text}\n\n"
            f"![overhead]({image})\n")
    if profiles:
        body += "\n```\n" + "\n\n".join(profiles) + "\n```\n"
    append_result("Overhead: RLTrainer(grpo) vs TRL GRPOTrainer",
                  "Produced by `bench/overhead.py` (method in its docstring). Target: time ratio <= 1.05. "
                  "Newest results last.", body)


if __name__ == "__main__":
    main()
