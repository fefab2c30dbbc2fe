"""Tool-call parsers: every family, malformed input becomes errors (never raises), template detection."""

import random

import pytest

from rlfw.tools import PARSERS, ParsedTurn, ToolCall, detect_parser, get_parser

QWEN_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>\n"
    'For each function call, return a json object within <tool_call></tool_call> XML tags:\n<tool_call>\n'
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n{%- endif %}'
)
LLAMA31_TEMPLATE = (
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{{- '<|python_tag|>' + tool_call.name }}"
    '{{- \'{"name": "\' + tool_call.name + \'", "parameters": \' }}{{- tool_call.arguments | tojson }}'
    "{{- '<|eom_id|>' }}"
)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from rlfw.assets import build_tokenizer

    return build_tokenizer(seed=0)


class _Tok:
    def __init__(self, template):
        self.chat_template = template


def test_rlfw_parses_calls_and_keeps_content():
    text = 'Let me add.<call>{"name": "add", "arguments": {"a": 1, "b": 2}}</call><call>{"name": "neg", "arguments": {"x": 3}}</call>'
    turn = PARSERS["rlfw"].parse(text)
    assert turn.content == "Let me add."
    assert turn.calls == [ToolCall("add", {"a": 1, "b": 2}), ToolCall("neg", {"x": 3})]
    assert turn.errors == [] and turn.has_calls


def test_rlfw_plain_answer_has_no_calls():
    turn = PARSERS["rlfw"].parse("The answer is <answer>4</answer>")
    assert turn == ParsedTurn("The answer is <answer>4</answer>") and not turn.has_calls


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('{"name": "add", "arguments": {"a": 1', "malformed JSON"),
        ('{"arguments": {"a": 1}}', '"name"'),
        ('{"name": 7, "arguments": {}}', '"name"'),
        ('{"name": "add", "arguments": [1, 2]}', "must be a JSON object"),
        ('{"name": "add", "arguments": "{not json"}', "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_rlfw_malformed_calls_become_errors(body, needle):
    turn = PARSERS["rlfw"].parse(f"x<call>{body}</call>")
    assert turn.calls == [] and len(turn.errors) == 1
    assert needle in turn.errors[0].message and turn.has_calls


def test_unterminated_call_is_an_error_and_valid_calls_survive():
    turn = PARSERS["rlfw"].parse('<call>{"name": "a", "arguments": {}}</call> then <call>{"name": "b"')
    assert turn.calls == [ToolCall("a", {})]
    assert "unterminated" in turn.errors[0].message


def test_arguments_as_json_string_are_decoded():
    turn = PARSERS["rlfw"].parse('<call>{"name": "add", "arguments": "{\\"a\\": 1}"}</call>')
    assert turn.calls == [ToolCall("add", {"a": 1})]


def test_hermes_family():
    text = 'Thinking.\n<tool_call>\n{"name": "search", "arguments": {"query": "paris"}}\n</tool_call>\n<tool_call>\n{"name": "x", "arguments": 3}\n</tool_call>'
    turn = PARSERS["hermes"].parse(text)
    assert turn.content == "Thinking."
    assert turn.calls == [ToolCall("search", {"query": "paris"})]
    assert len(turn.errors) == 1


def test_llama3_family():
    p = PARSERS["llama3"]
    assert p.parse('<|python_tag|>{"name": "f", "parameters": {"x": 1}}').calls == [ToolCall("f", {"x": 1})]
    two = p.parse('{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}')
    assert [c.name for c in two.calls] == ["f", "g"]
    assert p.parse("Paris is the capital.") == ParsedTurn("Paris is the capital.")
    bad = p.parse('<|python_tag|>{"name": "f", "parameters": {')
    assert bad.calls == [] and "malformed JSON" in bad.errors[0].message
    assert p.parse('{"name": "f", "parameters": 5}').errors


def test_parsers_never_raise_on_random_text():
    rng = random.Random(0)
    alphabet = ['{', '}', '"', ':', ',', '[', ']', 'name', 'arguments', 'parameters', '<call>', '</call>', '<tool_call>',
                '</tool_call>', '<|python_tag|>', ';', ' ', 'a', '1', '\\', 'null']
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        for parser in PARSERS.values():
            turn = parser.parse(text)
            assert isinstance(turn, ParsedTurn)
            assert all(isinstance(c.arguments, dict) for c in turn.calls)


def test_detect_from_templates(tiny_tokenizer):
    assert detect_parser(tiny_tokenizer).name == "rlfw"
    assert detect_parser(_Tok(QWEN_TEMPLATE)).name == "hermes"
    assert detect_parser(_Tok(LLAMA31_TEMPLATE)).name == "llama3"
    assert detect_parser(_Tok({"default": "x", "tool_use": QWEN_TEMPLATE})).name == "hermes"
    assert detect_parser(_Tok(QWEN_TEMPLATE), "llama3").name == "llama3"


def test_detect_unknown_template_and_unknown_name_explain_the_fix():
    # The message names the YAML key and both flags, and (the template renders no tools) the template fix.
    with pytest.raises(ValueError, match=r"`tool_parser: <name>`.*--tool_parser.*--parser.*`chat_template: hermes`"):
        detect_parser(_Tok("{{ messages }}"))
    with pytest.raises(ValueError, match="Known"):
        get_parser("nope")


def test_registry_is_extensible(monkeypatch):
    class Bang:
        name = "bang"

        def matches(self, template):
            return "!!" in template

        def parse(self, text):
            return ParsedTurn(text)

    monkeypatch.setitem(PARSERS, "bang", Bang())
    assert detect_parser(_Tok("!! template")).name == "bang"
    assert get_parser("bang").parse("x").content == "x"
