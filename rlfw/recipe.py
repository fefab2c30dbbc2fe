"""What ``recipes/train.py`` runs: parse the config, load model/tokenizer/data/rewards, train, save.

    accelerate launch recipes/train.py --config configs/quickstart.yaml [--key value ...]

The YAML is one flat mapping over ScriptArguments, RLConfig and TRL's ModelConfig; command-line flags override
it; a key that none of them knows is an error.
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


def parse_args(argv: list[str] | None = None):
    """(ScriptArguments, RLConfig, ModelConfig) from ``--config file.yaml`` plus command-line overrides."""
    from trl import ModelConfig, TrlParser

    parser = TrlParser((ScriptArguments, RLConfig, ModelConfig))
    script_args, config, model_args = parser.parse_args_and_config(args=argv)
    return script_args, config, model_args


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


def load_model_and_tokenizer(model_args, config: RLConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_args.model_name_or_path
    if path is None:
        raise ValueError("model_name_or_path is required (a hub id or a local path; `python -m rlfw.assets --out "
                         "assets/tiny` builds a tiny local one).")
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision)
    if tokenizer.chat_template is None:
        raise ValueError(f"The tokenizer of {path!r} has no chat template; rlfw trains on conversational prompts. "
                         "Set tokenizer.chat_template (and save it) or use an instruct/chat model.")
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(__import__("torch"), model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, revision=model_args.model_revision, dtype=dtype)
    return model, tokenizer


def main(argv: list[str] | None = None):
    from transformers.trainer_utils import get_last_checkpoint
    from trl import get_peft_config

    from rlfw.trainer import RLTrainer

    script_args, config, model_args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train_dataset, eval_dataset = load_datasets(script_args)
    reward_funcs = [load_reward_func(name) for name in script_args.reward_funcs]
    if not reward_funcs and not config.environment:
        raise ValueError("No reward: set reward_funcs (e.g. [exact_match] or 'my_pkg.rewards:score'), or an "
                         "environment whose get_reward() scores episodes.")
    model, tokenizer = load_model_and_tokenizer(model_args, config)
    trainer = RLTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    resume = config.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "latest"):
        resume = True
    if resume is True and get_last_checkpoint(config.output_dir) is None:
        logger.warning("resume_from_checkpoint=true but %s has no checkpoint yet: starting fresh.", config.output_dir)
        resume = None
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    trainer.save_state()  # trainer_state.json with the full log history
    return trainer
