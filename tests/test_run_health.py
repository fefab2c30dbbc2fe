"""Fail early, warn loudly: start-up checks of the tool template, non-final turns, the zero-signal warning."""

from __future__ import annotations

import logging

import pytest
import torch

from rlfw.assets import build_tokenizer
from rlfw.monitor import ZeroSignalMonitor
from rlfw.rollout import RolloutEngine

# ChatML without tools (as SmolLM2's own template): tools= is ignored, and no parser can be detected from it.
CHATML_NO_TOOLS = ("{% for m in messages %}<|system|>{{ m.role }}\n{{ m.content }}<|end|>{% endfor %}"
                   "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(seed=0)


class Scripted:
    """Plays the given turn texts in order, the same for every rollout."""

    def __init__(self, tok, texts):
        self.tok, self.texts, self.turn = tok, texts, 0

    def generate(self, prompts, max_new_tokens):
        ids = self.tok.encode(self.texts[min(self.turn, len(self.texts) - 1)], add_special_tokens=False)
        self.turn += 1
        return [(ids, [-0.1] * len(ids)) for _ in prompts]


class AnswerEnv:
    """Final only with an <answer>: a turn without a call or an answer is a non-final turn."""

    def reset(self, **row):
        self.final = None

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: first number
            b: second number
        """
        return a + b

    def _record_final_answer(self, text: str) -> bool:
        self.final = text
        return "<answer>" in text

    def get_reward(self) -> float:
        return float(self.final is not None and "<answer>" in self.final)


ROW = {"prompt": [{"role": "user", "content": "What is 1 plus 2?"}]}
TURNS = ["Let me think.<|end|>", "<answer>3</answer><|end|>"]


def _episode(tok, **options):
    engine = RolloutEngine(tok, Scripted(tok, TURNS), max_turns=3, max_completion_length=200, **options)
    return engine.run([ROW], [AnswerEnv()])[0]


def test_non_final_turn_continue_is_the_default(tok):
    ep = _episode(tok)
    assert [m["role"] for m in ep.messages[-2:]] == ["assistant", "assistant"] and not ep.truncated


def test_non_final_turn_remind_adds_a_user_turn(tok):
    ep = _episode(tok, non_final_turn="remind", format_reminder="Answer in <answer> tags.")
    roles = [m["role"] for m in ep.messages]
    assert roles[-3:] == ["assistant", "user", "assistant"] and ep.messages[-2]["content"] == "Answer in <answer> tags."
    env_text = tok.decode([t for t, m in zip(ep.completion_ids, ep.env_mask, strict=True) if m == 0])
    assert env_text == "<|user|>Answer in <answer> tags.<|end|><|assistant|>"  # the template's own rendering
    assert ep.num_turns == 2 and not ep.truncated


def test_non_final_turn_end_stops_the_episode_truncated(tok):
    ep = _episode(tok, non_final_turn="end")
    assert ep.num_turns == 1 and ep.truncated and sum(ep.env_mask) == len(ep.env_mask)


def test_non_final_turn_is_validated(tok):
    from rlfw.config import RLConfig

    with pytest.raises(ValueError, match="non_final_turn"):
        RolloutEngine(tok, Scripted(tok, TURNS), max_turns=2, max_completion_length=8, non_final_turn="nag")
    with pytest.raises(ValueError, match="non_final_turn='nag' is not valid"):
        RLConfig(output_dir="/tmp/unused", non_final_turn="nag", report_to="none")
    with pytest.raises(ValueError, match="zero_signal_patience"):
        RLConfig(output_dir="/tmp/unused", zero_signal_patience=-1, report_to="none")


def test_tool_template_check_names_the_config_keys(tok, caplog):
    from rlfw import preflight

    no_tools = build_tokenizer(seed=0)
    no_tools.chat_template = CHATML_NO_TOOLS
    with pytest.raises(ValueError, match=r"`tool_parser: <name>`.*`chat_template: hermes`"):
        preflight.check_tool_template(no_tools, None)
    with pytest.raises(ValueError, match=r"tool_parser='xml' is not a known tool-call parser; set `tool_parser:`"):
        preflight.check_tool_template(no_tools, "xml")
    with caplog.at_level(logging.WARNING, logger="rlfw.preflight"):
        preflight.check_tool_template(no_tools, "rlfw")  # a parser, but the model never sees the tools
    assert "ignores tools=" in caplog.text and "chat_template: hermes" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlfw.preflight"):
        preflight.check_tool_template(tok, None)  # rlfw's own template renders tools: silent
    assert caplog.text == ""


def test_chat_template_by_name_or_file(tmp_path, tok):
    from rlfw.tools import detect_parser
    from rlfw.tools.templates import CHAT_TEMPLATES, renders_tools, use_chat_template

    hermes = build_tokenizer(seed=0)
    use_chat_template(hermes, "hermes")
    assert renders_tools(hermes) and detect_parser(hermes).name == "hermes" and hermes.response_template
    path = tmp_path / "mine.jinja"
    path.write_text(CHAT_TEMPLATES["hermes"].read_text())
    mine = use_chat_template(build_tokenizer(seed=0), str(path))
    assert mine.chat_template == hermes.chat_template
    with pytest.raises(ValueError, match="chat_template='nope'.*hermes"):
        use_chat_template(build_tokenizer(seed=0), "nope")


def test_zero_signal_monitor_warns_after_patience_and_at_the_end(caplog):
    monitor = ZeroSignalMonitor(patience=3)
    zeros, keep = torch.zeros(4), torch.ones(4, dtype=torch.bool)
    with caplog.at_level(logging.WARNING, logger="rlfw.monitor"):
        assert [monitor.update(zeros, keep) for _ in range(2)] == [1, 2]
        assert "No learning signal" not in caplog.text
        assert monitor.update(zeros, keep) == 3
        assert "No learning signal for 3 generation batches in a row" in caplog.text
        assert monitor.update(torch.zeros(4, 2), keep) == 4  # (N, K) advantages too
        monitor.finish()
    assert "No generation batch of this run had a learning signal" in caplog.text
    assert monitor.update(torch.tensor([0.5, -0.5, 0.0, 0.0]), keep) == 0
    assert monitor.update(torch.tensor([0.5, -0.5, 0.0, 0.0]), torch.tensor([False, False, True, True])) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlfw.monitor"):
        monitor.finish()  # some batch had a signal: no end-of-run warning
    assert caplog.text == ""


def test_zero_signal_streak_is_logged_by_the_trainer(make_config, tiny_assets, tokenizer, dataset):
    from rlfw.trainer import RLTrainer

    def constant(completions, **kwargs):
        return [1.0] * len(completions)

    trainer = RLTrainer(model=tiny_assets, reward_funcs=[constant], args=make_config(zero_signal_patience=2),
                        train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    streaks = [h["advantages/zero_signal_streak"] for h in trainer.state.log_history
               if "advantages/zero_signal_streak" in h]
    assert streaks == [1.0, 2.0]
