"""Retokenization drift on the real model: the share of sampled completions whose token ids change under decode +
re-encode (what a text-based multi-turn loop would train on instead of what was sampled).

    OMP_NUM_THREADS=1 python bench/retokenization.py [--completions 200 --max-new-tokens 48 --tools --no-write]

SmolLM2-135M-Instruct (``make real-model``) with rlfw's Hermes template on calculator prompts (``--tools``: with the
tool schemas in the system message, a 4x longer prompt), sampled as TRL trains (temperature 1, top_k 0, top_p 1).
Appends the figure to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import torch
from _doc import ROOT, append_result, machine

sys.path.insert(0, str(ROOT))

from envs.calculator import ENVIRONMENT, build_dataset  # noqa: E402
from rlfw.assets import REAL_MODEL_DIR, ensure_real_model, load_tokenizer  # noqa: E402
from rlfw.environment import environment_tools  # noqa: E402
from rlfw.fidelity import retokenization_drift, sample_completions  # noqa: E402
from rlfw.rollout import HFBackend  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--completions", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tools", action="store_true", help="list the calculator tool in the system message")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM
    from transformers.utils import get_json_schema

    path = ensure_real_model(ROOT / REAL_MODEL_DIR, ROOT / "assets/gguf")
    tokenizer = load_tokenizer(path, chat_template="hermes")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tools = [get_json_schema(f) for f in environment_tools(ENVIRONMENT()).values()] if args.tools else None
    rows = build_dataset(args.completions, seed=args.seed)
    prompts = []
    for prompt in rows["prompt"]:
        ids = tokenizer.apply_chat_template(prompt, tools=tools, add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        prompts.append(list(ids["input_ids"] if isinstance(ids, dict) else ids))
    torch.manual_seed(args.seed)
    backend = HFBackend(model, tokenizer)  # TRL's sampling defaults: temperature 1, top_k 0 (off), top_p 1
    start = time.perf_counter()
    completions = sample_completions(backend, prompts, args.max_new_tokens, args.batch_size)
    seconds = time.perf_counter() - start
    report = retokenization_drift(tokenizer, completions, backend.eos_ids)
    kinds = Counter(f"`{'|'.join(a)}` -> `{'|'.join(b)}`" for a, b in report.examples)
    lines = [f"Machine: {machine()}. {report.completions} completions of at most {args.max_new_tokens} tokens "
             f"({'tools listed' if args.tools else 'no tools listed'}), sampled in {seconds:.0f} s.", "",
             f"**{report.changed} of {report.completions} completions ({100 * report.fraction:.1f} %) change their "
             "token ids under decode + re-encode**; rlfw's engine trains on the sampled ids themselves "
             "(tests/test_real_model.py: policy ids exactly as sampled, env ids exactly as the template renders).",
             "", "Examples (sampled tokens around the first difference -> re-encoded):", ""]
    lines += [f"- {k}" for k, _ in kinds.most_common(6)]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        append_result("Retokenization drift on the real model",
                      "How often decode + re-encode changes sampled token ids (SmolLM2-135M-Instruct, Hermes "
                      "template, calculator prompts, TRL's sampling): the error a text-based loop would train on.",
                      body)


if __name__ == "__main__":
    main()
