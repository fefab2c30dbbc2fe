"""Chat templates rlfw ships, choosing one by name or file, and checking what a template can render.

``CHAT_TEMPLATES`` is the registry (name -> Jinja file next to this module):

- ``hermes``: ChatML with Hermes/Qwen2.5-style tools (tool schemas in the system message, ``<tool_call>`` JSON
  calls, results in ``<tool_response>`` turns), prefix-preserving, for chat models whose own template has no tools
  (e.g. SmolLM2). Its parser is detected from it: ``hermes``.

``use_chat_template(tokenizer, "hermes")`` (or a path to a ``.jinja`` file) replaces the tokenizer's template; the
recipe does it for the config key ``chat_template``. Saving the tokenizer afterwards (checkpoints, the final model)
keeps the template, so evaluation and later runs render through the same one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CHAT_TEMPLATES: dict[str, Path] = {
    "hermes": Path(__file__).with_name("hermes.jinja"),
}

# transformers' response parser spec per template (tokenizer.response_template): lets TRL's own parse_response read
# tool calls too, so an environment also runs under plain GRPOTrainer(environment_factory=...).
RESPONSE_TEMPLATES: dict[str, dict[str, Any]] = {
    "hermes": {
        "defaults": {"role": "assistant"},
        "start_anchor": "<|im_start|>assistant\n",
        "fields": {
            "tool_calls": {"open": "<tool_call>", "close_pattern": r"</tool_call>\s*", "repeats": True,
                           "content": "json", "transform": {"type": "function", "function": "{content}"}},
            "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
        },
    },
}

# A tool no real template knows, to see whether (and how) a template renders tools.
PROBE_TOOL = {"type": "function", "function": {
    "name": "rlfw_probe_tool", "description": "Probe.",
    "parameters": {"type": "object", "properties": {"rlfw_probe_arg": {"type": "string"}}, "required": []}}}


def resolve_chat_template(spec: str | os.PathLike) -> tuple[str, str | None]:
    """(template text, registry name or None) for a registered name or a path to a Jinja file."""
    name = str(spec)
    if name in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name].read_text(encoding="utf-8"), name
    path = Path(name).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8"), None
    raise ValueError(f"chat_template={name!r} is neither a template rlfw ships ({sorted(CHAT_TEMPLATES)}) nor a Jinja "
                     "file. Set `chat_template: hermes` (tools for ChatML models) or the path of a .jinja file.")


def use_chat_template(tokenizer: Any, spec: str | os.PathLike | None) -> Any:
    """Replace ``tokenizer``'s chat template with ``spec`` (a registered name or a Jinja file); None keeps it."""
    if spec is None:
        return tokenizer
    text, name = resolve_chat_template(spec)
    tokenizer.chat_template = text
    if name in RESPONSE_TEMPLATES:
        tokenizer.response_template = RESPONSE_TEMPLATES[name]
    return tokenizer


def _render(tokenizer: Any, messages: list[dict], chat_template: str | None = None, **kwargs: Any) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template, **kwargs)


def renders_tools(tokenizer: Any, chat_template: str | None = None) -> bool:
    """Whether the template shows ``tools=`` to the model: rendering with and without a probe tool differs, and the
    tool's name appears (a template that ignores ``tools`` renders both the same)."""
    messages = [{"role": "user", "content": "hi"}]
    try:
        with_tools = _render(tokenizer, messages, chat_template, tools=[PROBE_TOOL], add_generation_prompt=True)
        without = _render(tokenizer, messages, chat_template, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot render tools at all does not render them
        return False
    return with_tools != without and "rlfw_probe_tool" in with_tools


def renders_tool_calls(tokenizer: Any, chat_template: str | None = None) -> bool:
    """Whether an assistant turn's ``tool_calls`` and a ``tool`` message's content appear in the rendering."""
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "rlfw_probe_tool", "arguments": {"rlfw_probe_arg": "x1"}}}]},
        {"role": "tool", "name": "rlfw_probe_tool", "content": "rlfw_probe_result"},
    ]
    try:
        text = _render(tokenizer, messages, chat_template)
    except Exception:  # noqa: BLE001 - rejecting the roles means not rendering them
        return False
    return all(s in text for s in ("rlfw_probe_tool", "rlfw_probe_arg", "rlfw_probe_result"))
