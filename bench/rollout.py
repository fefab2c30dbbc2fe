"""Rollout engine vs TRL's built-in tool loop, on the same tiny model, environment, prompts and sampling.

    OMP_NUM_THREADS=1 python bench/rollout.py [--turns 2 4 8 16 --repeats 3 --preset tiny|small --no-write]
        [--model assets/smollm2-135m-instruct --chat-template hermes]

Both contenders run inside ``trl.GRPOTrainer._generate_and_score_completions`` (generation, tool calls, rewards):
TRL with ``environment_factory=BenchEnv``, rlfw with ``rollout_func=make_rollout_func(BenchEnv, ...)``. The number of
turns is forced equally for both by a logits processor attached to ``model.generate``: it emits a fixed tool call in
every turn but the last and a fixed answer in the last, so both sample exactly the same tokens and the ratio measures
the loop, not the model. Rollouts alternate between contenders one by one. Appends the table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _doc import append_result, machine
from datasets import Dataset
from transformers import LogitsProcessor, LogitsProcessorList

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlfw.assets import PRESETS, build_assets, load_tokenizer  # noqa: E402
from rlfw.rollout import make_rollout_func  # noqa: E402

# The forced turns in each template's markup: tool call, answer, the start of an assistant turn, the start of a tool
# result. "hermes" for ChatML/Hermes templates (rlfw's `chat_template: hermes`), "rlfw" for the local assets'.
MARKUP = {
    "rlfw": ('<call>{"name": "echo", "arguments": {"text": "hi"}}</call><|end|>',
             "The answer is <answer>4</answer><|end|>", "<|assistant|>", "<|tool|>"),
    "hermes": ('<tool_call>\n{"name": "echo", "arguments": {"text": "hi"}}\n</tool_call><|im_end|>',
               "The answer is <answer>4</answer><|im_end|>", "<|im_start|>assistant\n", "<tool_response>"),
}


class BenchEnv:
    """A tool that always succeeds."""

    def reset(self, **row):
        return None

    def echo(self, text: str) -> str:
        """Echo the text.

        Args:
            text: what to echo
        """
        return f"echo: {text}"

    def get_reward(self) -> float:
        return 1.0


def _matches(ids: torch.Tensor, marker: list[int]) -> torch.Tensor:
    """(B, L) bool: where ``marker`` starts in each row of ``ids`` (vectorised, so the forcing costs no Python work
    per token of history and does not itself grow with the conversation)."""
    n, length = len(marker), ids.shape[1]
    hit = torch.zeros_like(ids, dtype=torch.bool)
    if length >= n:
        window = torch.ones((ids.shape[0], length - n + 1), dtype=torch.bool, device=ids.device)
        for j, token in enumerate(marker):
            window &= ids[:, j: length - n + 1 + j] == token
        hit[:, : length - n + 1] = window
    return hit


class ForceTurns(LogitsProcessor):
    """Per row: a tool call in turns 0..K-2 and the answer in turn K-1 (turn index = number of tool results so far).

    One instance serves one ``generate`` call: the first step scans the prompts, each later step looks only at the
    token it appended (the same result as a rescan, at a cost that does not grow with the conversation in either
    loop)."""

    def __init__(self, tokenizer, num_turns: int):
        markup = MARKUP["hermes" if "<tool_call>" in (tokenizer.chat_template or "") else "rlfw"]
        self.call, self.answer, self.assistant, self.tool = (tokenizer.encode(text, add_special_tokens=False)
                                                             for text in markup)
        self.eos, self.num_turns = tokenizer.eos_token_id, num_turns
        self.seen = 0  # columns of input_ids already scanned

    def _scan(self, input_ids):
        length = input_ids.shape[1]
        columns = torch.arange(length, device=input_ids.device)
        # first token of the current turn: just after the last assistant marker
        starts = torch.where(_matches(input_ids, self.assistant), columns, -1).max(dim=1).values + len(self.assistant)
        tools = _matches(input_ids, self.tool).sum(dim=1)
        ended = ((input_ids == self.eos) & (columns >= starts[:, None])).any(dim=1)
        self.starts, self.tools, self.ended = starts.tolist(), tools.tolist(), ended.tolist()

    def _step(self, input_ids):
        """Update the per-row state with the last column only."""
        length = input_ids.shape[1]
        last = input_ids[:, -max(len(self.assistant), len(self.tool)):].tolist()
        for b, row in enumerate(last):
            if row[-len(self.assistant):] == self.assistant:
                self.starts[b], self.ended[b] = length, False
            if row[-len(self.tool):] == self.tool:
                self.tools[b] += 1
            if row[-1] == self.eos and length - 1 >= self.starts[b]:
                self.ended[b] = True

    def __call__(self, input_ids, scores):
        length = input_ids.shape[1]
        if self.seen and length == self.seen + 1:
            self._step(input_ids)
        else:
            self._scan(input_ids)
        self.seen = length
        forced = torch.full_like(scores, float("-inf"))
        for b, (start, n_tools, done) in enumerate(zip(self.starts, self.tools, self.ended, strict=True)):
            if done:  # this row already ended its turn: padding follows
                forced[b, self.eos] = 0.0
                continue
            target = self.call if n_tools < self.num_turns - 1 else self.answer
            pos = length - start
            forced[b, target[pos] if pos < len(target) else self.eos] = 0.0
        return forced


def force(model, tokenizer, num_turns: int) -> None:
    generate = type(model).generate.__get__(model)

    def forced_generate(*args, **kwargs):
        return generate(*args, logits_processor=LogitsProcessorList([ForceTurns(tokenizer, num_turns)]), **kwargs)

    model.generate = forced_generate


def make_trainer(path, tok, contender: str, num_turns: int, out: str, batch: int, group: int, mcl: int):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=out, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
                      dataloader_pin_memory=False, save_strategy="no", max_steps=1, num_generations=group,
                      per_device_train_batch_size=batch, max_completion_length=mcl, disable_tqdm=True,
                      max_tool_calling_iterations=num_turns, seed=0)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"say hi {i}"}]} for i in range(batch // group)])
    kw = {"environment_factory": BenchEnv} if contender == "trl" else {
        "rollout_func": make_rollout_func(BenchEnv, max_turns=num_turns, tool_timeout=30)}
    trainer = GRPOTrainer(model=str(path), reward_funcs=[lambda completions, **_: [1.0] * len(completions)],
                          args=args, train_dataset=ds, processing_class=tok, **kw)
    force(trainer.model, tok, num_turns)
    inputs = [row for row in ds for _ in range(group)]
    return trainer, inputs


class _Spans(list):
    """(start, end) of each per-turn generation call; ``restore`` undoes the wrapping."""

    restore: object = None

    def report(self) -> tuple[list[float], list[float]]:
        """Generation ms per turn, and the between-turn loop time (parse, tools, env tokens) after each turn."""
        gen = [1000 * (e - s) for s, e in self]
        gaps = [1000 * (self[i + 1][0] - self[i][1]) for i in range(len(self) - 1)]
        return gen, gaps


def span_timer(trainer, contender: str) -> _Spans:
    """Record each per-turn generation call (TRL: _generate_single_turn; rlfw: HFBackend.generate)."""
    spans = _Spans()
    if contender == "trl":
        owner, name = trainer, "_generate_single_turn"
    else:
        from rlfw.rollout import HFBackend

        owner, name = HFBackend, "generate"
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = original(*args, **kwargs)
        spans.append((start, time.perf_counter()))
        return result

    setattr(owner, name, timed)
    spans.restore = lambda: delattr(owner, name) if owner is trainer else setattr(owner, name, original)
    return spans


def _median_per_turn(runs: list[list[float]]) -> list[float]:
    """Per turn index, the median over runs (one list of per-turn times per rollout)."""
    return [statistics.median(run[i] for run in runs) for i in range(min(map(len, runs)))]


def measure(trainer, inputs) -> tuple[float, int, int]:
    start = time.perf_counter()
    out = trainer._generate_and_score_completions([dict(x) for x in inputs])
    elapsed = time.perf_counter() - start
    mask = out["completion_mask"] * out.get("tool_mask", torch.ones_like(out["completion_mask"]))
    return elapsed, len(inputs), int(mask.sum())


def run(args) -> str:
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp()
    path = args.model or build_assets(Path(tmp) / args.preset, seed=0, preset=args.preset)
    tok = load_tokenizer(path, args.chat_template)
    lines = ["| turns | TRL episodes/s | rlfw episodes/s | episodes/s ratio (rlfw/TRL) | TRL policy tok/s | rlfw policy tok/s | tok/s ratio |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    per_turn = {}
    for k in args.turns:
        trainers = {c: make_trainer(path, tok, c, k, tmp, args.batch, args.group, args.max_completion_length)
                    for c in ("trl", "rlfw")}
        totals = {c: [0.0, 0, 0] for c in trainers}
        warm = {c: measure(*trainers[c])[0] for c in ("trl", "rlfw")}  # warm-up, not counted
        # Short rollouts are repeated within a round so that each contender's round lasts >= --min-seconds.
        calls = max(1, math.ceil(args.min_seconds / max(warm.values())))
        # The contenders alternate rollout by rollout (the order flips every time), so that a slow spell of the
        # machine falls on both alike.
        for rep in range(1, args.repeats + 1):
            for call in range(calls):
                order = ("trl", "rlfw") if (rep * calls + call) % 2 == 0 else ("rlfw", "trl")
                for c in order:
                    torch.manual_seed(rep * calls + call)
                    timer = span_timer(trainers[c][0], c) if k == max(args.turns) else None
                    t, n, toks = measure(*trainers[c])
                    if timer is not None:
                        timer.restore()
                        per_turn.setdefault(c, []).append(timer.report())
                    totals[c] = [totals[c][0] + t, totals[c][1] + n, totals[c][2] + toks]
        (tt, tn, ttok), (rt, rn, rtok) = totals["trl"], totals["rlfw"]
        assert ttok == rtok, f"contenders sampled different token counts ({ttok} vs {rtok})"
        lines.append(f"| {k} | {tn / tt:.2f} | {rn / rt:.2f} | {(rn / rt) / (tn / tt):.2f} | {ttok / tt:.0f} | "
                     f"{rtok / rt:.0f} | {(rtok / rt) / (ttok / tt):.2f} |")
        print(lines[-1], flush=True)
    k = max(args.turns)
    shown = sorted({0, 1, k // 4, k // 2, 3 * k // 4, k - 2, k - 1})
    last_call = max(k - 2, 1)  # the last turn with a tool call; turn k - 1 samples the (shorter) answer
    turn_lines = [f"\nPer turn, {k} turns, {args.batch} episodes, median over the {len(per_turn['rlfw'])} timed rollouts of "
                  "each contender (ms; loop = time between two generation calls: parsing, tool calls, building the next "
                  f"input; growth = turn {last_call} over turn 1, the first and last turns that sample a tool call):\n",
                  "| | " + " | ".join(f"turn {i}" for i in shown) + " | growth |",
                  "|---|" + "---:|" * (len(shown) + 1)]
    for c in ("trl", "rlfw"):
        gen, gaps = (_median_per_turn([r[j] for r in per_turn[c]]) for j in (0, 1))
        growth = f"{100 * (gen[last_call] / gen[1] - 1):+.0f} %" if len(gen) > 1 else "-"
        turn_lines.append(f"| {c} generation | " + " | ".join(f"{gen[i]:.1f}" for i in shown) + f" | {growth} |")
        turn_lines.append(f"| {c} loop | " + " | ".join(f"{gaps[i]:.2f}" if i < len(gaps) else "-" for i in shown)
                          + " | |")
    return "\n".join(lines + turn_lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--turns", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=1.0,
                   help="rollouts are repeated within a round until a contender's round lasts at least this long")
    p.add_argument("--batch", type=int, default=8, help="completions per step")
    p.add_argument("--group", type=int, default=4, help="num_generations")
    p.add_argument("--max-completion-length", type=int, default=640)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="local model size (rlfw.assets)")
    p.add_argument("--model", default=None, help="a model directory instead of a preset, e.g. "
                   "assets/smollm2-135m-instruct (`make real-model`)")
    p.add_argument("--chat-template", default=None, help="replace the model's chat template, e.g. 'hermes'")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to docs/benchmarks.md")
    args = p.parse_args()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    table = run(args)
    print(table)
    if args.no_write:
        return
    size = PRESETS[args.preset]
    model = (f"`{args.model}`" + (f" with chat template `{args.chat_template}`" if args.chat_template else "")
             if args.model else f"`{args.preset}` local Llama (hidden {size['hidden_size']}, {size['num_layers']} layers)")
    machine_line = (f"{machine()}; {model}, {args.batch} episodes per step, max_completion_length "
                    f"{args.max_completion_length}, "
                    f"G={args.group}, {args.repeats} rounds (each >= {args.min_seconds:g} s per contender), rollouts alternating one by one, after 1 "
                    "warm-up")
    append_result("Rollout engine vs TRL tool loop", "Produced by `bench/rollout.py`; newest results last.",
                  f"{machine_line}.\n\n{table}")


if __name__ == "__main__":
    main()
