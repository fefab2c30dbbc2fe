"""Start-up checks of what a run is given (dataset, reward functions, tokenizer), before any model loads.

Each finds a problem that would otherwise surface at the first training step, after the model (and vLLM) loaded,
as a KeyError or TypeError deep inside TRL, or never (a template that hides the tools from the model); the message
says what is missing and how to fix it, naming the config key.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

from rlfw.rollout.rollout_func import PER_COMPLETION_KEYS

logger = logging.getLogger(__name__)

# Keyword arguments TRL passes to every reward function besides the dataset columns.
TRL_REWARD_ARGUMENTS = frozenset({"prompts", "completions", "completion_ids", "trainer_state", "log_extra",
                                  "log_metric"})
# ... and, with a multi-turn environment, the environments and rlfw's per-completion rollout fields.
MULTI_TURN_REWARD_ARGUMENTS = frozenset({"environments", *PER_COMPLETION_KEYS})


def required_arguments(func: Callable) -> list[str]:
    """Names of the parameters ``func`` cannot be called without (no default, not ``*args``/``**kwargs``)."""
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: nothing to check
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in kinds and p.default is inspect.Parameter.empty]


def check_reward_arguments(reward_funcs: Iterable[Any], columns: Iterable[str] | None, multi_turn: bool) -> None:
    """Every argument a reward function requires is a dataset column or something TRL/rlfw passes."""
    if columns is None:  # an iterable dataset: columns unknown until the first row
        return
    columns = sorted(columns)
    passed = set(columns) - {"prompt", "completion", "completion_ids"}  # TRL passes these under other names
    supplied = TRL_REWARD_ARGUMENTS | (MULTI_TURN_REWARD_ARGUMENTS if multi_turn else frozenset()) | passed
    for func in reward_funcs:
        if not callable(func) or isinstance(func, type) or hasattr(func, "forward"):  # reward models: tensors
            continue
        missing = [name for name in required_arguments(func) if name not in supplied]
        if not missing:
            continue
        name = getattr(func, "__name__", type(func).__name__)
        hint = (" (it is passed only with a multi-turn environment: set `environment:`)"
                if set(missing) & MULTI_TURN_REWARD_ARGUMENTS else "")
        raise ValueError(
            f"reward function {name!r} needs {missing}{hint}, which train_dataset does not have as a column "
            f"(columns: {columns}). Add the column to the dataset, or give the parameter a default value."
        )


def check_prompt_column(columns: Iterable[str] | None) -> None:
    if columns is not None and "prompt" not in set(columns):
        raise ValueError(
            f"train_dataset has no 'prompt' column (columns: {sorted(columns)}). Rename the column that holds the "
            "task to 'prompt' (a string, or a list of chat messages)."
        )


def check_chat_template(processing_class: Any, train_dataset: Any, multi_turn: bool) -> None:
    """Conversational prompts and tool environments are rendered with the tokenizer's chat template."""
    if processing_class is None or getattr(processing_class, "chat_template", None) is not None:
        return
    first = _first_row(train_dataset)
    conversational = first is not None and isinstance(first.get("prompt"), list)
    if conversational or multi_turn:
        reason = "runs a multi-turn tool environment" if multi_turn else "has conversational prompts (chat messages)"
        raise ValueError(
            f"The tokenizer has no chat template, but this run {reason}. Use a chat/instruct model's tokenizer, or "
            "set tokenizer.chat_template to a Jinja template (and save it with tokenizer.save_pretrained) before "
            "training; plain-string prompts need none."
        )


def check_tool_template(processing_class: Any, tool_parser: Any = None) -> None:
    """A multi-turn run needs a tool-call parser (named by ``tool_parser`` or detected from the template), and a
    template that shows the tools to the model; the first is an error, the second a warning (a prompt may describe
    the tools itself)."""
    from rlfw.tools import PARSERS, detect_parser
    from rlfw.tools.templates import CHAT_TEMPLATES, renders_tools

    if isinstance(tool_parser, str) and tool_parser not in PARSERS:
        raise ValueError(f"tool_parser={tool_parser!r} is not a known tool-call parser; set `tool_parser:` to one of "
                         f"{sorted(PARSERS)}, or leave it unset to detect it from the chat template.")
    detect_parser(processing_class, tool_parser)  # ValueError naming tool_parser and chat_template
    if not renders_tools(processing_class):
        logger.warning(
            "The chat template ignores tools= (rendering with and without tools gives the same text): the model is "
            "never shown the environment's tools, so it can only call them if the prompt describes them. Set "
            "`chat_template: hermes` (ChatML models; shipped: %s) or the path of a Jinja template that renders tools.",
            sorted(CHAT_TEMPLATES))


def check_inputs(reward_funcs: Iterable[Any], train_dataset: Any, processing_class: Any, multi_turn: bool,
                 tool_parser: Any = None) -> None:
    """All start-up checks of RLTrainer's inputs (see the module docstring)."""
    columns = getattr(train_dataset, "column_names", None) if train_dataset is not None else None
    check_prompt_column(columns)
    check_reward_arguments(reward_funcs, columns, multi_turn)
    check_chat_template(processing_class, train_dataset, multi_turn)
    if multi_turn and processing_class is not None and getattr(processing_class, "chat_template", None) is not None:
        check_tool_template(processing_class, tool_parser)


def _first_row(dataset: Any) -> dict | None:
    if dataset is None or getattr(dataset, "column_names", None) is None:
        return None
    try:
        return dict(dataset[0]) if len(dataset) else None
    except (TypeError, IndexError, KeyError):
        return None
