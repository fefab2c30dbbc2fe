"""The ``rlfw`` command. Subcommands register in ``SUBCOMMANDS`` (name -> (add_arguments, run)).

    rlfw rollout --model PATH --env envs.calculator --num-episodes 8 --max-turns 4 --out transcripts.jsonl \
        [--chat-template hermes]

``rollout`` writes each batch's transcripts as soon as the batch is played (the file can be read while it runs) and
prints one progress line per batch to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any


def _load(spec: str, default_attr: str) -> Any:
    """``module:attr`` (or ``module``, meaning ``module.<default_attr>``)."""
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr or default_attr)


def _add_rollout_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model path or hub id")
    p.add_argument("--env", required=True, help="env module (exposes ENVIRONMENT and build_dataset) or module:Class")
    p.add_argument("--dataset", default=None, help="module:function(n, seed=...) building the rows; default: the env module's build_dataset")
    p.add_argument("--num-episodes", type=int, default=8)
    p.add_argument("--max-turns", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=256, help="tokens per episode, policy + tool tokens")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off (TRL's training default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="episodes generated together")
    p.add_argument("--parser", default=None, help="tool-call parser family (default: detected from the chat template; "
                   "the training config's key is tool_parser)")
    p.add_argument("--chat-template", default=None, help="replace the model's chat template: 'hermes' (tools for "
                   "ChatML models) or a Jinja file (the training config's key is chat_template)")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="recompute the whole conversation every turn instead of keeping its key/value cache")
    p.add_argument("--non-final-turn", default="continue", choices=["continue", "remind", "end"],
                   help="after a turn that is neither a tool call nor a final answer (see RLConfig.non_final_turn)")
    p.add_argument("--tool-timeout", type=float, default=30.0, help="seconds per tool call")
    p.add_argument("--max-tool-result-chars", type=int, default=2000)
    p.add_argument("--out", required=True, help="JSONL file, one transcript per line")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def _rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    builder = _load(args.dataset, "build_dataset") if args.dataset else _load(args.env.partition(":")[0], "build_dataset")
    dataset = builder(args.num_episodes, seed=args.seed)
    return [dict(dataset[i]) for i in range(min(args.num_episodes, len(dataset)))]


def run_rollout(args: argparse.Namespace) -> int:
    """Play episodes with the model (no training) and write one JSON transcript per line."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlfw.assets import load_tokenizer
    from rlfw.rollout import HFBackend, RolloutEngine

    torch.manual_seed(args.seed)
    env_cls = _load(args.env, "ENVIRONMENT")
    rows = _rows(args)
    tokenizer = load_tokenizer(args.model, args.chat_template)
    from rlfw.tools import detect_parser

    detect_parser(tokenizer, args.parser)  # before the model loads: the error names --parser and --chat-template
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    backend = HFBackend(model, tokenizer, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        reuse_cache=not args.no_kv_cache)
    engine = RolloutEngine(tokenizer, backend, max_turns=args.max_turns, max_completion_length=args.max_completion_length,
                           parser=args.parser, tool_timeout=args.tool_timeout,
                           max_tool_result_chars=args.max_tool_result_chars, eos_token_ids=backend.eos_ids,
                           non_final_turn=args.non_final_turn)
    summary = {"episodes": 0, "turns": 0, "reward": 0.0, "tool_calls": 0}
    started, batches = time.perf_counter(), math.ceil(len(rows) / args.batch_size)
    with open(args.out, "w") as f:
        for start in range(0, len(rows), args.batch_size):
            batch = rows[start : start + args.batch_size]
            envs = [env_cls() for _ in batch]
            for row, env, ep in zip(batch, envs, engine.run(batch, envs), strict=True):
                record = {"row": {k: v for k, v in row.items() if k != "prompt"}, **ep.to_dict(),
                          "tool_counts": dict(ep.tool_counts), "reward": float(env.get_reward())}
                f.write(json.dumps(_json_safe(record), default=str) + "\n")
                summary["episodes"] += 1
                summary["turns"] += ep.num_turns
                summary["tool_calls"] += ep.num_tool_calls
                summary["reward"] += record["reward"]
            f.flush()  # this batch's transcripts are readable now
            _progress(summary, start // args.batch_size + 1, batches, len(rows), time.perf_counter() - started)
    n = max(summary["episodes"], 1)
    print(f"wrote {summary['episodes']} episodes to {args.out}: mean turns {summary['turns'] / n:.2f}, "
          f"mean tool calls {summary['tool_calls'] / n:.2f}, mean reward {summary['reward'] / n:.3f}")
    return 0


def _progress(summary: dict[str, Any], batch: int, batches: int, total: int, seconds: float) -> None:
    done = summary["episodes"]
    eta = seconds / done * (total - done) if done else 0.0
    print(f"[rlfw rollout] batch {batch}/{batches}: {done}/{total} episodes in {seconds:.0f} s (about {eta:.0f} s "
          f"left), mean reward {summary['reward'] / max(done, 1):.3f}", file=sys.stderr, flush=True)


SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "rollout": (_add_rollout_arguments, run_rollout),
}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="rlfw", description="RL fine-tuning of tool-using LLM agents.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=(run.__doc__ or "").strip().splitlines()[0])
        add_arguments(p)
        p.set_defaults(_run=run)
    args = parser.parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
