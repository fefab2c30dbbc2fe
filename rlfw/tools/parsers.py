"""Tool-call parsers, one per chat-template family.

A parser turns the text of one assistant turn into ``ParsedTurn(content, calls, errors)`` and never raises: a
malformed call becomes a ``ParseError`` that the rollout engine reports back to the model as an error observation,
while the sampled tokens stay untouched. Families:

- ``rlfw``: ``<call>{"name": ..., "arguments": {...}}</call>`` (the local template of ``rlfw.assets``)
- ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (Qwen2.5/3, Hermes)
- ``llama3``: Llama 3.1 JSON calls ``{"name": ..., "parameters": {...}}``, optionally after ``<|python_tag|>``,
  several separated by ``;``
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ParseError:
    message: str
    raw: str


@dataclass
class ParsedTurn:
    content: str
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[ParseError] = field(default_factory=list)

    @property
    def has_calls(self) -> bool:
        """Whether the turn attempted any tool call (valid or not): such a turn is not a final answer."""
        return bool(self.calls or self.errors)


def _call_from_json(raw: str, argument_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | ParseError:
    """Decode one JSON call body; every way it can be wrong becomes a ParseError naming the problem."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return ParseError(f"malformed JSON in tool call ({e.msg} at char {e.pos})", raw)
    return _call_from_object(obj, raw, argument_keys)


def _call_from_object(obj: Any, raw: str, argument_keys: tuple[str, ...]) -> ToolCall | ParseError:
    if not isinstance(obj, dict):
        return ParseError(f"tool call must be a JSON object, got {type(obj).__name__}", raw)
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ParseError('tool call is missing a "name" string', raw)
    key = next((k for k in argument_keys if k in obj), None)
    arguments = obj.get(key, {}) if key else {}
    if isinstance(arguments, str):  # OpenAI style: arguments serialised as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return ParseError(f'"{key}" of tool call {name!r} is a string that is not valid JSON', raw)
    if not isinstance(arguments, dict):
        return ParseError(f'"{key}" of tool call {name!r} must be a JSON object, got {type(arguments).__name__}', raw)
    return ToolCall(name, arguments)


class TaggedJSONParser:
    """Calls are JSON objects between an open and a close tag; text outside the tags is the content."""

    def __init__(self, name: str, open_tag: str, close_tag: str, markers: tuple[str, ...]):
        self.name, self.open_tag, self.close_tag, self.markers = name, open_tag, close_tag, markers
        self._pattern = re.compile(re.escape(open_tag) + r"(.*?)(?:" + re.escape(close_tag) + r"|$)", re.DOTALL)

    def matches(self, chat_template: str) -> bool:
        return any(m in chat_template for m in self.markers)

    def parse(self, text: str) -> ParsedTurn:
        calls, errors, pieces, last = [], [], [], 0
        for m in self._pattern.finditer(text):
            pieces.append(text[last : m.start()])
            last = m.end()
            body = m.group(1)
            if not m.group(0).endswith(self.close_tag):
                errors.append(ParseError(f"unterminated tool call: {self.open_tag} without {self.close_tag}", body))
                continue
            parsed = _call_from_json(body.strip())
            (calls if isinstance(parsed, ToolCall) else errors).append(parsed)
        pieces.append(text[last:])
        return ParsedTurn("".join(pieces).strip(), calls, errors)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Llama3JSONParser:
    """Llama 3.1 JSON tool calling: the whole turn is one or more JSON calls (``;``-separated)."""

    name = "llama3"
    python_tag = "<|python_tag|>"
    markers = ("<|python_tag|>", "<|eom_id|>")

    def matches(self, chat_template: str) -> bool:
        return any(m in chat_template for m in self.markers)

    def parse(self, text: str) -> ParsedTurn:
        tagged = self.python_tag in text
        head, _, body = text.partition(self.python_tag) if tagged else ("", "", text)
        stripped = body.strip()
        # Plain prose is content; only a turn that opens like a call is parsed as calls.
        if not tagged and not re.match(r'\{\s*"name"', stripped):
            return ParsedTurn(text.strip())
        calls, errors = [], []
        decoder, pos = json.JSONDecoder(), 0
        while pos < len(stripped):
            try:
                obj, end = decoder.raw_decode(stripped, pos)
            except json.JSONDecodeError as e:
                errors.append(ParseError(f"malformed JSON in tool call ({e.msg} at char {e.pos})", stripped[pos:]))
                break
            parsed = _call_from_object(obj, stripped[pos:end], ("parameters", "arguments"))
            (calls if isinstance(parsed, ToolCall) else errors).append(parsed)
            pos = end
            while pos < len(stripped) and stripped[pos] in " \t\n;":
                pos += 1
        return ParsedTurn(head.strip(), calls, errors)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
