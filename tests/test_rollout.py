"""Rollout engine with a scripted backend and the real local tokenizer: token fidelity, stops, faults, batching."""

import math
import time

import pytest
import torch

from rlfw.assets import build_assets, load_tokenizer
from rlfw.rollout import HFBackend, RolloutEngine, require_vllm


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def tok(assets):
    return load_tokenizer(assets)


def call(name, **arguments):
    import json

    return f'<call>{json.dumps({"name": name, "arguments": arguments})}</call><|end|>'


class ScriptedBackend:
    """Plays a fixed list of turn texts per rollout; a rollout is recognised by its prompt ids."""

    def __init__(self, tok, scripts):
        self.tok, self.scripts, self.batches, self.prompts = tok, scripts, [], {}

    def register(self, prompt_ids, script):
        self.prompts[tuple(prompt_ids)] = script

    def generate(self, prompts, max_new_tokens):
        self.batches.append(len(prompts))
        out = []
        for ids in prompts:
            key = next(k for k in self.prompts if tuple(ids[: len(k)]) == k)
            script, turn = self.prompts[key], ids[len(key):].count(self.tok.convert_tokens_to_ids("<|assistant|>"))
            new = self.tok.encode(script[min(turn, len(script) - 1)], add_special_tokens=False)
            out.append((new, [-0.25] * len(new)))
        return out


class CalcEnv:
    def __init__(self):
        self.turns = 0

    def reset(self, **row):
        self.turns = 0
        return row.get("suffix")

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: first number
            b: second number
        """
        return a + b

    def fail(self, x: str) -> str:
        """Always raises.

        Args:
            x: anything
        """
        raise RuntimeError(f"boom {x}")

    def hang(self, seconds: float) -> str:
        """Sleeps.

        Args:
            seconds: how long
        """
        time.sleep(seconds)
        return "woke"

    def big(self, n: int) -> str:
        """A long string.

        Args:
            n: length
        """
        return "x" * n

    def get_reward(self) -> float:
        return 1.0

    def _pop_turn_reward(self):
        self.turns += 1
        return float(self.turns)


def run(tok, scripts, max_turns=8, max_completion_length=1024, env_cls=CalcEnv, **kw):
    backend = ScriptedBackend(tok, scripts)
    engine = RolloutEngine(tok, backend, max_turns=max_turns, max_completion_length=max_completion_length, **kw)
    rows = [{"prompt": [{"role": "user", "content": f"task {i}"}]} for i in range(len(scripts))]
    envs = [env_cls() for _ in rows]
    for row, env, script in zip(rows, envs, scripts, strict=True):
        backend.register(engine.start(row, env).prompt_ids, script)
    return engine.run(rows, envs), backend, engine


def test_token_fidelity_over_five_turns(tok):
    scripts = [[call("add", a=i, b=t) for t in range(4)] + [f"The answer is <answer>{i}</answer><|end|>"] for i in range(3)]
    episodes, backend, engine = run(tok, scripts)
    for ep, script in zip(episodes, scripts, strict=True):
        assert ep.num_turns == 5 and not ep.truncated and ep.num_tool_calls == 4
        expected, mask, turns = [], [], []
        for t, text in enumerate(script):
            sampled = tok.encode(text, add_special_tokens=False)
            expected += sampled
            mask += [1] * len(sampled)
            turns += [t] * len(sampled)
            if t < 4:
                suffix = tok.encode(f"<|tool|>{ep.messages[2 + 2 * t]['content']}<|end|><|assistant|>", add_special_tokens=False)
                assert engine.env_suffix_ids([ep.messages[2 + 2 * t]]) == suffix
                expected += suffix
                mask += [0] * len(suffix)
                turns += [-1] * len(suffix)
        assert ep.completion_ids == expected and ep.env_mask == mask and ep.turn_ids == turns
        assert ep.logprobs == [-0.25 if m else 0.0 for m in mask]
        rendered = tok.apply_chat_template(ep.messages, tools=list(_tools(CalcEnv())), tokenize=False)
        assert tok.decode(ep.prompt_ids + ep.completion_ids) == rendered
        starts = [i for i in range(len(turns)) if turns[i] >= 0 and (i == 0 or turns[i - 1] < 0)]
        assert ep.round_prefix_lens == starts and ep.round_prefix_lens[0] == 0
        assert ep.turn_rewards == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert backend.batches == [3, 3, 3, 3, 3]  # one backend call per turn for all active rollouts


def _tools(env):
    from rlfw.environment import environment_tools

    return environment_tools(env).values()


def test_batching_shrinks_as_rollouts_finish(tok):
    scripts = [["done<|end|>"], [call("add", a=1, b=2), "3<|end|>"], [call("add", a=1, b=2)] * 2 + ["3<|end|>"]]
    episodes, backend, _ = run(tok, scripts)
    assert backend.batches == [3, 2, 1]
    assert [ep.num_turns for ep in episodes] == [1, 2, 3]
    assert not any(ep.truncated for ep in episodes)


def test_max_turns_stops_and_marks_truncated(tok):
    (ep,), _, _ = run(tok, [[call("add", a=1, b=1)]], max_turns=3)
    assert ep.num_turns == 3 and ep.truncated and ep.num_tool_calls == 2  # the last turn's call is not run
    assert ep.env_mask[-1] == 1 and ep.completion_ids[-1] == tok.eos_token_id
    assert len(ep.round_prefix_lens) == 3


def test_budget_exhausted_mid_turn(tok):
    (ep,), _, _ = run(tok, [["a long answer that never ends " * 5]], max_completion_length=10)
    assert ep.truncated and len(ep.completion_ids) == 10 and ep.num_turns == 1


def test_tool_result_that_would_overflow_is_rolled_back(tok):
    first = tok.encode(call("big", n=400), add_special_tokens=False)
    (ep,), _, _ = run(tok, [[call("big", n=400), "x<|end|>"]], max_completion_length=len(first) + 50)
    assert ep.truncated and ep.completion_ids == first and set(ep.env_mask) == {1}
    assert ep.num_turns == 1 and ep.round_prefix_lens == [0]


def test_reset_observation_is_appended_to_last_user_message(tok):
    backend = ScriptedBackend(tok, [])
    engine = RolloutEngine(tok, backend, max_turns=2, max_completion_length=64)
    ep = engine.start({"prompt": [{"role": "user", "content": "Q"}], "suffix": " (use tools)"}, CalcEnv())
    assert ep.messages[-1]["content"] == "Q (use tools)"
    assert "Q (use tools)" in tok.decode(ep.prompt_ids) and "Tools:add, big, fail, hang" in tok.decode(ep.prompt_ids)


def _observation(tok, text, **kw):
    (ep,), _, _ = run(tok, [[text, "ok<|end|>"]], **kw)
    assert ep.num_turns == 2 and not ep.truncated  # the episode continues after the fault
    return ep.messages[2]["content"], ep.tool_counts


def test_malformed_json(tok):
    obs, counts = _observation(tok, '<call>{"name": "add", "arguments": {"a": 1</call><|end|>')
    assert obs.startswith("Error: malformed JSON") and counts["parse_errors"] == 1 and counts["failures"] == 1


def test_unknown_tool_lists_valid_tools(tok):
    obs, counts = _observation(tok, call("mul", a=1, b=2))
    assert "unknown tool 'mul'" in obs and "add, big, fail, hang" in obs and counts["unknown_tool"] == 1


@pytest.mark.parametrize(("args", "needle"), [({"a": 1}, "missing a required argument: 'b'"),
                                              ({"a": 1, "b": 2, "c": 3}, "unexpected keyword argument 'c'")])
def test_bad_arguments_say_which(tok, args, needle):
    obs, counts = _observation(tok, call("add", **args))
    assert obs.startswith("Error: bad arguments for tool 'add'") and needle in obs and counts["bad_arguments"] == 1


def test_tool_raising(tok):
    obs, counts = _observation(tok, call("fail", x="now"))
    assert obs == "Error: tool 'fail' raised RuntimeError: boom now" and counts["exceptions"] == 1


def test_hanging_tool_times_out(tok):
    start = time.monotonic()
    obs, counts = _observation(tok, call("hang", seconds=30), tool_timeout=0.3)
    assert time.monotonic() - start < 3
    assert obs == "Error: tool 'hang' exceeded the 0.3 s timeout." and counts["timeouts"] == 1


def test_huge_result_is_truncated_visibly(tok):
    obs, counts = _observation(tok, call("big", n=5000), max_tool_result_chars=100)
    assert obs == "x" * 100 + "... [truncated 4900 chars]" and counts["truncated"] == 1 and counts["failures"] == 0


def test_tools_of_all_rollouts_run_concurrently(tok):
    scripts = [[call("hang", seconds=0.4) + "", "ok<|end|>"] for _ in range(6)]
    start = time.monotonic()
    episodes, _, _ = run(tok, scripts)
    assert time.monotonic() - start < 1.5  # 6 x 0.4 s = 2.4 s if sequential
    assert all(ep.messages[2]["content"] == "woke" for ep in episodes)


def test_several_calls_in_one_turn(tok):
    text = call("add", a=1, b=2)[: -len("<|end|>")] + call("add", a=3, b=4)
    (ep,), _, _ = run(tok, [[text, "ok<|end|>"]])
    assert [m["content"] for m in ep.messages if m["role"] == "tool"] == ["3", "7"]
    assert ep.num_tool_calls == 2 and ep.tool_counts["calls"] == 2


class NoHooksEnv:
    def reset(self, **row):
        return None

    def get_reward(self):
        return 0.0


class NotFinalEnv(NoHooksEnv):
    def _record_final_answer(self, text):
        return "FINAL" in text


def test_turn_rewards_nan_without_hook(tok):
    (ep,), _, _ = run(tok, [["hello<|end|>"]], env_cls=NoHooksEnv)
    assert ep.num_turns == 1 and math.isnan(ep.turn_rewards[0])


def test_record_final_answer_hook_keeps_the_episode_going(tok):
    (ep,), _, _ = run(tok, [["thinking<|end|>", "FINAL<|end|>"]], env_cls=NotFinalEnv)
    assert ep.num_turns == 2 and not ep.truncated
    assert tok.decode(ep.completion_ids) == "thinking<|end|><|assistant|>FINAL<|end|>"


def test_hf_backend_samples_up_to_eos_with_logprobs(assets, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets)
    backend = HFBackend(model, tok, temperature=1.0)
    prompts = [tok.encode("What is 1 + 2?", add_special_tokens=False), [tok.convert_tokens_to_ids("<|user|>")]]
    torch.manual_seed(0)
    out = backend.generate(prompts, [5, 12])
    torch.manual_seed(0)
    assert backend.generate(prompts, [5, 12]) == out  # torch's global RNG drives sampling
    for (ids, lps), budget in zip(out, [5, 12], strict=True):
        assert 0 < len(ids) <= budget and len(lps) == len(ids) and all(lp <= 0 for lp in lps)
        assert tok.eos_token_id not in ids[:-1]


def test_hf_backend_samples_the_full_distribution_like_trl(assets, tok):
    """No silent top_k: transformers' own default (50) would truncate and renormalise the distribution, so
    evaluation and `rlfw rollout` would sample a different policy from the one TRL trains (top_k 0)."""
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig

    from rlfw.rollout.backends import sampling_defaults

    trl_args = GRPOConfig(output_dir="unused", use_cpu=True, bf16=False)
    assert sampling_defaults() == {k: getattr(trl_args, k)
                                   for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
    model = AutoModelForCausalLM.from_pretrained(assets).eval()
    for top_k in (None, 0):  # None (a config that never set it) means off too
        backend = HFBackend(model, tok, temperature=0.7, top_k=top_k)
        assert backend.sampling["top_k"] == 0 and backend.sampling["top_p"] == 1.0
        prompt = tok.encode("What is 1 + 2?", add_special_tokens=False)
        torch.manual_seed(0)
        (ids, lps), = backend.generate([prompt], 24)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1] / 0.7
        expected = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(lps), expected, atol=1e-4)  # the untruncated policy's log-probs
    assert HFBackend(model, tok, temperature=0.7, top_k=5).sampling["top_k"] == 5


def test_require_vllm_names_the_extra():
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'rlfw\[vllm\]'"):
            require_vllm()
    else:
        require_vllm()


def cli_rows(n, seed=0):
    return [{"prompt": [{"role": "user", "content": f"add {i} and {seed}"}], "answer": str(i + seed)} for i in range(n)]


def test_cli_rollout_writes_jsonl_transcripts(assets, tmp_path):
    import json

    from rlfw.cli import main

    out = tmp_path / "t.jsonl"
    assert main(["rollout", "--model", str(assets), "--env", "test_rollout:CalcEnv", "--dataset", "test_rollout:cli_rows",
                 "--num-episodes", "3", "--max-turns", "2", "--max-completion-length", "24", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3
    for r in records:
        assert len(r["completion_ids"]) == len(r["env_mask"]) == len(r["turn_ids"]) <= 24
        assert r["messages"][0]["role"] == "user" and r["reward"] == 1.0 and len(r["turn_rewards"]) == r["num_turns"]
