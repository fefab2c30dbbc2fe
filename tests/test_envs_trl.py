"""Each environment runs under plain TRL ``GRPOTrainer(environment_factory=...)`` with the tiny local model.

The random model almost never emits a valid tool call, so the first turn is scripted (``_generate_single_turn``
returns the token ids of a fixed call); tool execution, tool-result tokens, the post-tool turn, rewards and the
optimiser step are all TRL's own code.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from envs import calculator, python_sandbox, search_qa  # noqa: E402
from rlfw.assets import build_assets  # noqa: E402

SCRIPTED_CALLS = {
    "calculator": ("calculate", {"expression": "(2 + 3) * 4"}),
    "search_qa": ("search", {"query": "city country"}),
    "python_sandbox": ("run_python", {"code": "print(6 * 7)"}),
}
MODULES = {"calculator": calculator, "search_qa": search_qa, "python_sandbox": python_sandbox}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    torch.set_num_threads(1)
    path = build_assets(tmp_path_factory.mktemp("assets") / "tiny", seed=0)
    return str(path), AutoTokenizer.from_pretrained(str(path))


def scripted_trainer_class(first_turn_ids: list[int]):
    class ScriptedFirstTurn(GRPOTrainer):
        """Only the first turn (called with num_generations > 1) is scripted; post-tool turns are generated."""

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            if num_generations > 1:
                return [list(first_turn_ids) for _ in prompt_ids], None
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)

    return ScriptedFirstTurn


@pytest.mark.parametrize("name", list(MODULES))
def test_environment_runs_under_plain_trl(name, assets, tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    model_path, tokenizer = assets
    module = MODULES[name]
    tool, arguments = SCRIPTED_CALLS[name]
    call_text = f'<call>{json.dumps({"name": tool, "arguments": arguments})}</call>{tokenizer.eos_token}'
    first_turn = tokenizer.encode(call_text, add_special_tokens=False)
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        report_to="none", per_device_train_batch_size=4, num_generations=4, max_completion_length=48, max_steps=2,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", dataloader_num_workers=0,
        dataloader_pin_memory=False, disable_tqdm=True, seed=0, max_tool_calling_iterations=2,
    )
    trainer = scripted_trainer_class(first_turn)(
        model=model_path, reward_funcs=module.REWARD_FUNCS, args=args, train_dataset=module.build_dataset(8),
        processing_class=tokenizer, environment_factory=module.ENVIRONMENT,
    )
    trainer.train()

    assert trainer.state.global_step == 2
    logs = [entry for entry in trainer.state.log_history if "tools/call_frequency" in entry]
    assert len(logs) == 2
    assert all(entry["tools/call_frequency"] > 0 and entry["tools/failure_frequency"] == 0 for entry in logs)
    # The environment instances of the last batch ran the scripted call themselves.
    events = [e for env in trainer.environments for e in env.tool_events]
    assert events and all(e["tool"] == tool for e in events)
    if name == "calculator":
        assert all(e["result"] == "20" for e in events)
    if name == "python_sandbox":
        assert all(e["ok"] for e in events)
    # Both reward sources are columns: the completion-based reward function and the env's get_reward (which is
    # 0.0 here, since plain TRL never calls _record_final_answer; see docs/environments.md).
    assert f"rewards/{module.REWARD_FUNCS[0].__name__}/mean" in logs[-1]
    assert logs[-1][f"rewards/{module.ENVIRONMENT.__name__}/mean"] == 0.0


@pytest.mark.parametrize("name", list(MODULES))
def test_synthetic_traces_render_with_the_chat_template(name, assets):
    _, tokenizer = assets
    tool = SCRIPTED_CALLS[name][0]
    for row in MODULES[name].synthetic_traces(3, seed=0):
        text = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        assert f'<call>{{"name": "{tool}", "arguments": ' in text
        assert "<|tool|>" in text and text.rstrip().endswith("</answer><|end|>")
