"""make_rollout_func under plain trl.GRPOTrainer with the tiny local model: garbage tool calls are survived and counted."""

import math

import pytest
from datasets import Dataset

from rlfw.assets import build_assets, load_tokenizer
from rlfw.rollout import HFBackend, make_rollout_func

GARBAGE = [
    '<call>{"name": "add", "arguments": {"a": 1</call><|end|>',  # malformed JSON
    '<call>{"name": "mul", "arguments": {}}</call><|end|>',  # unknown tool
    '<call>{"name": "add", "arguments": {"a": 1}}</call><|end|>',  # missing argument
    '<call>{"name": "add", "arguments": {"a": 2, "b": 3}}</call><|end|>',  # valid
]


class AddEnv:
    def __init__(self):
        self.result = None

    def reset(self, **row):
        self.result = None
        return None

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: first number
            b: second number
        """
        self.result = a + b
        return a + b

    def get_reward(self) -> float:
        return 1.0 if self.result == 5 else 0.0

    def _pop_turn_reward(self):
        return 0.5


class GarbageFirstBackend(HFBackend):
    """The first turn of every rollout is a scripted (mostly broken) tool call; later turns are sampled."""

    def generate(self, prompts, max_new_tokens):
        assistant = self.tokenizer.convert_tokens_to_ids("<|assistant|>")
        sampled = super().generate(prompts, max_new_tokens)
        out = []
        for i, (ids, (new, lps)) in enumerate(zip(prompts, sampled, strict=True)):
            if ids.count(assistant) == 1:  # only the generation prompt: this is turn 0
                new = self.tokenizer.encode(GARBAGE[i % len(GARBAGE)], add_special_tokens=False)
                lps = [0.0] * len(new)
            out.append((new, lps))
        return out


def test_rollout_func_trains_under_plain_grpo_trainer(tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    path = build_assets(tmp_path / "tiny", seed=0)
    tok = load_tokenizer(path)
    seen = {}

    def env_reward(completions, environments, num_turns, turn_rewards, truncated, **kwargs):
        seen.update(num_turns=list(num_turns), turn_rewards=list(turn_rewards), truncated=list(truncated))
        return [e.get_reward() for e in environments]

    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"add 2 and 3 ({i})"}]} for i in range(8)])
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
        dataloader_pin_memory=False, save_strategy="no", max_steps=2, num_generations=4,
        per_device_train_batch_size=4, max_completion_length=96, logging_steps=1, learning_rate=1e-4,
        disable_tqdm=True, seed=0,
    )
    rollout_func = make_rollout_func(AddEnv, max_turns=3, tool_timeout=5, backend=GarbageFirstBackend.from_trainer)
    trainer = GRPOTrainer(model=str(path), reward_funcs=[env_reward], args=args, train_dataset=dataset,
                          processing_class=tok, rollout_func=rollout_func)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "tools/calls" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert entry["tools/calls"] == 4 and entry["tools/failures"] == 3
        assert entry["tools/parse_errors"] == 1 and entry["tools/unknown_tool"] == 1
        assert entry["tools/bad_arguments"] == 1 and entry["tools/timeouts"] == 0
        assert 1 < entry["turns/mean"] <= 3 and entry["turns/max"] >= 2
    assert len(trainer.environments) == 4 and all(isinstance(e, AddEnv) for e in trainer.environments)
    assert all(len(r) == n for r, n in zip(seen["turn_rewards"], seen["num_turns"], strict=True))
    assert all(not math.isnan(r) for rs in seen["turn_rewards"] for r in rs)
    changed = any(not (p == before[n]).all() for n, p in trainer.model.named_parameters())
    assert changed


def test_unknown_backend_is_rejected_before_generation():
    with pytest.raises(ValueError, match=r"Unknown rollout backend 'tpu'; use one of \['hf', 'vllm'\]"):
        make_rollout_func(AddEnv, max_turns=2, backend="tpu")


@pytest.mark.gpu
def test_vllm_backend_colocate(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from trl import GRPOConfig, GRPOTrainer

    path = build_assets(tmp_path / "tiny", seed=0)
    tok = load_tokenizer(path)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"add 2 and 3 ({i})"}]} for i in range(8)])
    args = GRPOConfig(output_dir=str(tmp_path / "out"), use_vllm=True, vllm_mode="colocate", report_to="none",
                      save_strategy="no", max_steps=1, num_generations=4, per_device_train_batch_size=4,
                      max_completion_length=48, logging_steps=1, vllm_gpu_memory_utilization=0.2, bf16=False)
    rollout_func = make_rollout_func(AddEnv, max_turns=3, backend="vllm")
    trainer = GRPOTrainer(model=str(path), reward_funcs=[lambda environments, **kw: [e.get_reward() for e in environments]],
                          args=args, train_dataset=dataset, processing_class=tok, rollout_func=rollout_func)
    trainer.train()
    assert any("turns/mean" in entry for entry in trainer.state.log_history)
