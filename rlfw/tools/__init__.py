"""Tool-call parsing per chat-template family, and tool execution for the rollout engine.

``PARSERS`` is the registry (name -> parser). A parser has ``name``, ``matches(chat_template) -> bool`` (used by
``detect_parser``) and ``parse(text) -> ParsedTurn``, which never raises. Add your own family with
``PARSERS["mine"] = MyParser()``; registration order is the detection order. Chat templates rlfw ships (``hermes``:
tools for ChatML models that have none) are in ``rlfw.tools.templates``.
"""

from __future__ import annotations

from typing import Any, Protocol

from rlfw.tools.execution import ToolExecutor, ToolOutcome
from rlfw.tools.parsers import Llama3JSONParser, ParsedTurn, ParseError, TaggedJSONParser, ToolCall


class ToolCallParser(Protocol):
    name: str

    def matches(self, chat_template: str) -> bool: ...

    def parse(self, text: str) -> ParsedTurn: ...


PARSERS: dict[str, ToolCallParser] = {
    "rlfw": TaggedJSONParser("rlfw", "<call>", "</call>", markers=("<call>",)),
    "hermes": TaggedJSONParser("hermes", "<tool_call>", "</tool_call>", markers=("<tool_call>",)),
    "llama3": Llama3JSONParser(),
}


def _template_text(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: search them all
        return "\n".join(str(t) for t in template.values())
    return template or ""


def get_parser(name: str | ToolCallParser) -> ToolCallParser:
    """A parser by registry name (a parser instance is returned as is)."""
    if not isinstance(name, str):
        return name
    if name not in PARSERS:
        raise ValueError(f"Unknown tool-call parser {name!r}. Known: {sorted(PARSERS)}; register yours in rlfw.tools.PARSERS.")
    return PARSERS[name]


def detect_parser(tokenizer: Any, name: str | ToolCallParser | None = None) -> ToolCallParser:
    """The parser for ``tokenizer``'s chat template, or the one named explicitly."""
    if name is not None:
        return get_parser(name)
    template = _template_text(tokenizer)
    for parser in PARSERS.values():
        if parser.matches(template):
            return parser
    raise ValueError(parser_error(tokenizer))


def parser_error(tokenizer: Any) -> str:
    """Why no parser was detected and how to choose one, naming the config key and the flags."""
    from rlfw.tools.templates import CHAT_TEMPLATES, renders_tools

    message = ("Could not tell the tool-call format from the tokenizer's chat template. Set `tool_parser: <name>` in "
               f"the YAML config with one of {sorted(PARSERS)} (`--tool_parser` for recipes/train.py, `--parser` for "
               "`rlfw rollout`), or register a parser for this template in rlfw.tools.PARSERS.")
    if not renders_tools(tokenizer):
        message += (" The template does not render tools either (rendering with and without tools= gives the same "
                    "text), so the model would never see them: set `chat_template: hermes` (ChatML with <tool_call> "
                    "calls; its parser is detected) or the path of a Jinja template that renders tools "
                    f"(`--chat-template` for `rlfw rollout`; shipped: {sorted(CHAT_TEMPLATES)}).")
    return message


__all__ = [
    "PARSERS",
    "ParseError",
    "ParsedTurn",
    "ToolCall",
    "ToolCallParser",
    "ToolExecutor",
    "ToolOutcome",
    "detect_parser",
    "get_parser",
    "parser_error",
]
