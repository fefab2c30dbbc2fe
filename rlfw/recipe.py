"""What ``recipes/train.py`` runs: parse the config, load tokenizer/data/rewards, build RLTrainer (which loads the
model only after its start-up checks), train (resuming if asked), save.

    accelerate launch recipes/train.py --config configs/quickstart.yaml [--key value ...]

The YAML is one flat mapping over ScriptArguments, RLConfig and TRL's ModelConfig; command-line flags override
it; a key that none of them knows is an error. A run stopped by SIGTERM exits normally after its checkpoint
(rlfw.preemption), without the final save.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from rlfw.config import RLConfig
from rlfw.rewards import load_reward_func

logger = logging.getLogger(__name__)


@dataclass
class ScriptArguments:
    """Data and rewards of a run (model and training settings live in ModelConfig and RLConfig)."""

    dataset: str = field(
        default="envs.arithmetic",
        metadata={"help": "A module with build_dataset(n, seed, split) (e.g. envs.calculator), a local dataset "
                  "directory or .json/.jsonl file, or a hub dataset id."},
    )
    dataset_size: int = field(default=512, metadata={"help": "Training rows to build (module datasets)."})
    eval_size: int = field(default=0, metadata={"help": "Held-out rows for eval (module datasets); 0 = none."})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of generated datasets."})
    dataset_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Options of a module's build_dataset (a dict, or JSON on the command line)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub/local dataset."})
    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={"help": "Reward functions: built-in names or dotted paths ('my_pkg.rewards:f'). With an "
                  "environment, its get_reward() joins them (so none may be needed)."},
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Replace the tokenizer's chat template: a template rlfw ships ('hermes': ChatML with "
                  "<tool_call> tools, for chat models whose template has none) or the path of a Jinja file. Prompts, "
                  "tool results and saved checkpoints all use it. None = the model's own template."},
    )


def parse_args(argv: list[str] | None = None):
    """(ScriptArguments, RLConfig, ModelConfig) from ``--config file.yaml`` plus command-line overrides.

    A YAML key or flag that none of the three dataclasses knows is an error (with the closest known names).
    """
    from trl import ModelConfig, TrlParser

    parser = TrlParser((ScriptArguments, RLConfig, ModelConfig))
    parser.error = _bad_value  # a ValueError naming the key, instead of argparse's usage dump and exit
    parser.allow_abbrev = False  # `--learning_r 1e-6` is a typo, not a way to spell learning_rate
    *parsed, from_file, from_command_line = parser.parse_args_and_config(
        args=argv, return_remaining_strings=True, separate_remaining_strings=True)
    flags = [(item, "config file") for item in from_file[::2]]  # from_file: ["--key", "value", ...]
    flags += [(item, "command line") for item in from_command_line if item.startswith("-")]
    if flags or from_command_line:
        known = [action.dest for action in parser._actions if action.dest != "help"]
        raise ValueError(_unknown_keys_message(flags or [(" ".join(from_command_line), "command line")], known))
    script_args, config, model_args = parsed
    return script_args, config, model_args


def _bad_value(message: str):
    raise ValueError(f"Invalid config: {message.rstrip('.')}. Fix the value in the YAML file or on the command line.")


def _unknown_keys_message(unknown: list[tuple[str, str]], known: list[str]) -> str:
    import difflib

    parts = []
    for key, where in unknown:
        key = key.lstrip("-")
        close = difflib.get_close_matches(key, known, n=1)
        parts.append(f"{key!r} ({where}" + (f"; did you mean {close[0]!r}?)" if close else ")"))
    return ("Unknown config key(s): " + ", ".join(parts) + ". Every key must be a field of ScriptArguments, "
            "RLConfig (GRPOConfig) or ModelConfig; see the README's config reference. Fix or remove it.")


def load_datasets(args: ScriptArguments):
    """(train, eval or None) for the configured source."""
    source = args.dataset
    if Path(source).exists():
        from datasets import load_dataset, load_from_disk

        if Path(source).is_dir():
            return load_from_disk(source), None
        return load_dataset("json", data_files=source, split="train"), None
    try:
        module = importlib.import_module(source)
    except ImportError:
        module = None
    if module is not None and hasattr(module, "build_dataset"):
        kwargs = dataset_kwargs(args)
        train = module.build_dataset(args.dataset_size, seed=args.dataset_seed, split="train", **kwargs)
        evaluation = (module.build_dataset(args.eval_size, seed=args.dataset_seed, split="test", **kwargs)
                      if args.eval_size else None)
        return train, evaluation
    from datasets import load_dataset

    return load_dataset(source, split=args.dataset_split), None


def dataset_kwargs(args: ScriptArguments) -> dict:
    """``dataset_kwargs`` as a dict (the command line passes JSON)."""
    import json

    value = args.dataset_kwargs
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"dataset_kwargs must be a JSON object; got {value!r} ({err.msg})") from None
    return dict(value or {})


def load_tokenizer(model_args, chat_template: str | None = None):
    """The model's tokenizer, with ``chat_template`` (a shipped name or a Jinja file) replacing its own if given."""
    from transformers import AutoTokenizer

    from rlfw.tools.templates import use_chat_template

    path = model_args.model_name_or_path
    if path is None:
        raise ValueError("model_name_or_path is required (a hub id or a local path; `python -m rlfw.assets --out "
                         "assets/tiny` builds a tiny local one).")
    tokenizer = use_chat_template(AutoTokenizer.from_pretrained(path, revision=model_args.model_revision),
                                  chat_template)
    if tokenizer.chat_template is None:
        raise ValueError(f"The tokenizer of {path!r} has no chat template; rlfw trains on conversational prompts. "
                         "Set tokenizer.chat_template (and save it) or use an instruct/chat model.")
    return tokenizer


def model_init_kwargs(model_args, config: RLConfig) -> dict:
    """How TRL loads the model from ``model_name_or_path`` (ModelConfig's settings; the YAML's model_init_kwargs win).

    RLTrainer is given the path, not a loaded model, so its start-up checks run before any model loads.
    """
    kwargs = {"revision": model_args.model_revision, "dtype": model_args.dtype}
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return {**kwargs, **(config.model_init_kwargs or {})}


def resume_checkpoint(value, output_dir: str) -> str | None:
    """The checkpoint ``resume_from_checkpoint`` names: true/latest = the newest complete one (None: start fresh)."""
    from rlfw import checkpoint

    if value is None or value is False or str(value).lower() in ("", "false", "none"):
        return None
    if value is True or str(value).lower() in ("true", "latest"):
        found = checkpoint.latest_checkpoint(output_dir)
        if found is None:
            logger.warning("resume_from_checkpoint=true but %s has no complete checkpoint yet: starting fresh.",
                           output_dir)
        return found
    reason = checkpoint.incomplete_reason(value)
    if reason is not None:
        raise ValueError(f"resume_from_checkpoint={value!r} cannot be resumed from: {reason}. Set "
                         "resume_from_checkpoint: true to pick the newest complete checkpoint in output_dir.")
    return str(value)


def main(argv: list[str] | None = None):
    from trl import get_peft_config, get_quantization_config

    from rlfw.trainer import RLTrainer

    script_args, config, model_args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    resume = resume_checkpoint(config.resume_from_checkpoint, config.output_dir)
    train_dataset, eval_dataset = load_datasets(script_args)
    reward_funcs = [load_reward_func(name) for name in script_args.reward_funcs]
    if not reward_funcs and not config.environment:
        raise ValueError("No reward: set reward_funcs (e.g. [exact_match] or 'my_pkg.rewards:score'), or an "
                         "environment whose get_reward() scores episodes.")
    tokenizer = load_tokenizer(model_args, script_args.chat_template)
    config.model_init_kwargs = model_init_kwargs(model_args, config)
    trainer = RLTrainer(
        model=model_args.model_name_or_path,  # loaded by TRL after RLTrainer's start-up checks
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    trainer.train(resume_from_checkpoint=resume)
    if trainer.preempted:  # a checkpoint was saved; the final model is for a finished run only
        return trainer
    trainer.save_model(config.output_dir)
    trainer.save_state()  # trainer_state.json with the full log history
    return trainer
