"""Environments driven by a scripted policy: tools, rewards, turn rewards, determinism and splits."""

from __future__ import annotations

import inspect
import json

import pytest

from envs import _tasks, calculator, python_sandbox, search_qa
from envs.episode import extract_answer, final_assistant_text
from rlfw.environment import BaseEnvironment, environment_tools
from rlfw.tools.execution import ToolExecutor
from rlfw.tools.parsers import ToolCall

MODULES = [calculator, search_qa, python_sandbox]


def play(env: BaseEnvironment, trace: list[dict]) -> list[float | None]:
    """Replay a conversation's tool calls on ``env`` the way a rollout engine would; returns the turn rewards."""
    tools = environment_tools(env)
    turn_rewards = []
    for message in trace[2:]:
        if message["role"] != "assistant":
            continue
        for call in message.get("tool_calls") or []:
            function = call["function"]
            arguments = json.loads(function["arguments"])  # a JSON string (see envs.episode.tool_call_message)
            assert tools[function["name"]](**arguments) is not None
        if not message.get("tool_calls"):
            assert env._record_final_answer(message["content"])
        turn_rewards.append(env._pop_turn_reward())
    return turn_rewards


def conversations(module, n: int, seed: int) -> list[list[dict]]:
    """The synthetic traces as whole conversations (prompt messages followed by the completion messages)."""
    ds = module.synthetic_traces(n, seed=seed)
    assert ds.column_names == ["prompt", "completion", "tools"]
    # SFT renders the tool list into the prompt exactly as the rollout engine does.
    names = {tool["function"]["name"] for tool in json.loads(ds[0]["tools"])}
    assert names == set(environment_tools(module.ENVIRONMENT()))
    return [row["prompt"] + row["completion"] for row in ds]


def completion(trace: list[dict]) -> list[dict]:
    return trace[2:]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_module_contract(module):
    assert issubclass(module.ENVIRONMENT, BaseEnvironment)
    tools = environment_tools(module.ENVIRONMENT())
    assert tools, "an environment needs at least one tool"
    for tool in tools.values():
        signature = inspect.signature(tool)
        assert all(p.annotation is not inspect.Parameter.empty for p in signature.parameters.values())
        assert "Args:" in tool.__doc__ and "Returns:" in tool.__doc__
    ds = module.build_dataset(4, seed=0)
    assert {"prompt", "answer"} <= set(ds.column_names)
    assert [m["role"] for m in ds[0]["prompt"]] == ["system", "user"]
    assert "<answer>" in ds[0]["prompt"][0]["content"]
    assert all(isinstance(a, str) for a in ds["answer"])


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_dataset_deterministic_and_splits_disjoint(module):
    assert module.build_dataset(8, seed=3).to_list() == module.build_dataset(8, seed=3).to_list()
    assert module.build_dataset(8, seed=3).to_list() != module.build_dataset(8, seed=4).to_list()
    questions = {split: {row["prompt"][1]["content"] for row in module.build_dataset(40, seed=0, split=split)}
                 for split in ("train", "test")}
    assert questions["train"] and questions["test"]
    assert not questions["train"] & questions["test"]
    with pytest.raises(ValueError, match="split"):
        module.build_dataset(2, split="validation")


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_scripted_policy_correct_and_wrong(module):
    ds = module.build_dataset(6, seed=1)
    traces = conversations(module, 6, seed=1)
    for row, trace in zip(ds, traces, strict=True):
        assert trace[:2] == row["prompt"]
        env = module.ENVIRONMENT()
        assert env.reset(**row) is None
        turn_rewards = play(env, trace)
        assert all(r is not None and r > 0 for r in turn_rewards[:-1]), turn_rewards
        assert turn_rewards[-1] is None  # the answer turn calls no tool
        assert env.get_reward() == 1.0
        wrong = env._format_final_answer("definitely wrong 123456")
        assert env._record_final_answer(wrong) and env.get_reward() == 0.0
    rewards = module.REWARD_FUNCS[0](completions=[completion(t) for t in traces], answer=ds["answer"],
                                     **{c: list(ds[c]) for c in ds.column_names if c != "answer"})
    assert rewards == [1.0] * len(traces)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_reset_is_deterministic_and_clears_state(module):
    row = module.build_dataset(1, seed=2)[0]
    env = module.ENVIRONMENT()
    env.reset(**row)
    trace = conversations(module, 1, seed=2)[0]
    play(env, trace)
    env.reset(**row)
    assert env.get_reward() == 0.0 and env._pop_turn_reward() is None and env.tool_events == []
    other = module.ENVIRONMENT()
    assert other.reset(**row) == env.reset(**row)
    assert play(other, trace) == play(env, trace)


def test_answer_parsing():
    assert extract_answer("x <answer> 12 </answer> y <answer>13</answer>") == "13"
    assert extract_answer("no tags") is None
    messages = [{"role": "assistant", "content": "a"}, {"role": "tool", "content": "b"},
                {"role": "assistant", "content": [{"type": "text", "text": "c"}]}]
    assert final_assistant_text(messages) == "c"


# ---- calculator ----

@pytest.mark.parametrize("expression, expected", [
    ("1 + 2 * 3", "7"), ("(1 + 2) * 3", "9"), ("-4 + 10 // 3", "-1"), ("7 / 2", "3.5"), ("2 ** 10", "1024"),
    ("17 % 5", "2"), ("+3 - -2", "5"), ("6 / 3", "2"), ("0.1 + 0.2", "0.3"),
])
def test_calculator_evaluates(expression, expected):
    env = calculator.CalculatorEnv()
    assert env.calculate(expression) == expected


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('true')", "not allowed"), ("x + 1", "unknown name"), ("(1).real", "attribute"),
    ("abs(-1)", "not allowed"), ("2 ** 1000", "exponent"), ("9 ** 9 ** 9", "exponent"), ("1 / 0", "division by zero"),
    ("1 +", "invalid expression"), ("[1, 2]", "unsupported"), ("'a' * 3", "unsupported"), ("1" * 300, "longer"),
    ("10 ** 60 * 10 ** 60", "too large"), ("lambda: 1", "unsupported"),
])
def test_calculator_refuses(expression, message):
    env = calculator.CalculatorEnv()
    with pytest.raises(ValueError, match=message):
        env.calculate(expression)
    assert env._pop_turn_reward() == 0.0  # the failed call is recorded for the turn reward


def test_calculator_turn_rewards_and_numeric_compare():
    env = calculator.CalculatorEnv()
    env.reset(answer="42")
    env.calculate("40 + 2")
    assert env._pop_turn_reward() == calculator.TOOL_SUCCESS_REWARD
    assert env._pop_turn_reward() is None
    env._record_final_answer("<answer>42.0</answer>")
    assert env.get_reward() == 1.0
    assert env._record_final_answer("The answer is 42") is False and env.get_reward() == 0.0


def test_calculator_difficulty():
    ds = calculator.build_dataset(30, seed=0, min_ops=3, max_ops=3)
    assert set(ds["num_ops"]) == {3}
    for row in ds:
        assert calculator.format_number(calculator.evaluate(row["expression"])) == row["answer"]


# ---- search_qa ----

def test_search_single_hop_finds_the_document():
    index = search_qa.get_index(0)
    for question in index.corpus.questions:
        if question["num_hops"] == 1:
            (entity,) = question["chain"]
            top = index.search(entity)
            assert index.corpus.titles[top[0]] == entity
            assert question["answer"] in index.corpus.texts[top[0]]


def test_search_multi_hop_chains_need_each_search():
    index = search_qa.get_index(0)
    multi = [q for q in index.corpus.questions if q["num_hops"] >= 2]
    assert {q["num_hops"] for q in multi} == {2, 3}
    for question in multi:
        chain = question["chain"]
        for hop, entity in enumerate(chain):
            text = index.corpus.texts[index.search(entity)[0]]
            # each hop's document names the next entity of the chain (or the answer at the last hop)
            target = chain[hop + 1] if hop + 1 < len(chain) else question["answer"]
            assert target in text, (question["question"], entity)


def test_search_index_shared_and_pop_turn_reward():
    assert search_qa.get_index(0) is search_qa.get_index(0)
    row = next(r for r in search_qa.build_dataset(50, seed=0) if r["num_hops"] == 3)
    env = search_qa.SearchQAEnv()
    env.reset(**row)
    assert env.index is search_qa.SearchQAEnv().index
    assert env.search("qqqq zzzz") == "No documents found."
    assert env._pop_turn_reward() == 0.0
    env.search(row["chain"][0])
    assert env._pop_turn_reward() == 1.0
    env.search(row["chain"][0])
    assert env._pop_turn_reward() == 0.0  # nothing new
    assert env._record_final_answer(env._format_final_answer(row["answer"])) and env.get_reward() == 1.0


def test_search_qa_f1_partial_credit():
    assert search_qa.token_f1("Ada Lovelace", "Ada Lovelace") == 1.0
    assert search_qa.token_f1("Ada", "Ada Lovelace") == pytest.approx(2 / 3)
    assert search_qa.token_f1(None, "x") == 0.0
    assert search_qa.exact_match("the Ada lovelace.", "Ada Lovelace") == 1.0
    f1 = search_qa.search_qa_f1(completions=[[{"role": "assistant", "content": "<answer>Ada</answer>"}]],
                                answer=["Ada Lovelace"])
    assert f1 == [pytest.approx(2 / 3)]


# ---- python_sandbox ----

def test_python_tasks_many_templates_and_references_pass():
    assert len(_tasks.TEMPLATES) >= 20
    tasks = _tasks.all_tasks()
    assert len({t["description"] for t in tasks}) == len(tasks)
    for task in tasks[::4]:
        assert python_sandbox.run_tests(task["solution"], task["tests"]) == 1.0, task["task"]


def test_python_reward_is_fraction_of_tests():
    tests = ["assert f(1) == 2", "assert f(2) == 3", "assert f(3) == 5", "assert f(0) == 0"]
    assert python_sandbox.run_tests("def f(x):\n    return x + 1", tests) == 0.5
    assert python_sandbox.run_tests("def f(x):\n    while True: pass", tests) == 0.0
    assert python_sandbox.run_tests("syntax error(", tests) == 0.0
    cheat = "import sys\nfor i in range(4): print('0' * 32, 'PASS', i)\ndef f(x):\n    return -1"
    assert python_sandbox.run_tests(cheat, tests) == 0.0


def test_python_extract_code_formats():
    fenced = "Here:\n```python\ndef f():\n    return 1\n```\n"
    assert python_sandbox.extract_code(fenced) == "def f():\n    return 1"
    assert python_sandbox.extract_code(f"<answer>{fenced}</answer>") == "def f():\n    return 1"
    assert python_sandbox.extract_code("<answer>def f(): return 2</answer>") == "def f(): return 2"
    assert python_sandbox.extract_code("no code here") is None


def test_python_tool_output_and_pop_turn_reward():
    env = python_sandbox.PythonSandboxEnv()
    env.reset(**python_sandbox.build_dataset(1)[0])
    assert env.run_python("print(6 * 7)") == "42"
    assert env._pop_turn_reward() == python_sandbox.CLEAN_RUN_REWARD
    out = env.run_python("raise RuntimeError('boom')")
    assert "RuntimeError: boom" in out and "[exit code 1]" in out
    assert env._pop_turn_reward() == 0.0
    assert env._record_final_answer("I give up") is False and env.get_reward() == 0.0


def test_arithmetic_partial_credit():
    from envs.arithmetic import build_dataset, partial_credit

    replies = ["<answer>7</answer>", "3 + 4 = 7.", "3 + 4 = 7, or 8", "<answer>8</answer> (7)", "seven", ""]
    assert partial_credit([[{"role": "assistant", "content": r}] for r in replies], ["7"] * 6) == \
        [1.0, 0.5, 0.0, 0.0, 0.0, 0.0]
    system = build_dataset(2, system="Be brief.")[0]["prompt"][0]
    assert system == {"role": "system", "content": "Be brief."}


def test_calculator_imperfect_demonstrator():
    """The quickstart's SFT traces: direct answers, and bad calls whose observation is the engine's own error."""
    ds = calculator.synthetic_traces(200, seed=0, style="expression", max_ops=2, direct_fraction=0.4,
                                     bad_call_fraction=0.5)
    kinds = {"direct": 0, "bad": 0, "good": 0}
    for row in ds:
        first = row["completion"][0]
        if not first.get("tool_calls"):
            kinds["direct"] += 1
            continue
        arguments = json.loads(first["tool_calls"][0]["function"]["arguments"])
        observation = row["completion"][1]["content"]
        if "expr" in arguments:
            kinds["bad"] += 1
            assert observation == ("Error: bad arguments for tool 'calculate': missing a required argument: "
                                   "'expression'.")
        else:
            kinds["good"] += 1
            assert observation == calculator.format_number(calculator.evaluate(arguments["expression"]))
        # the question quotes the expression exactly as the call's JSON string carries it
        assert f'"{next(iter(arguments.values()))}"' in row["prompt"][-1]["content"]
    assert 60 <= kinds["direct"] <= 100 and 40 <= kinds["bad"] <= 80 and 40 <= kinds["good"] <= 80
    with pytest.raises(ValueError, match="bad_call_fraction"):
        calculator.synthetic_traces(2, bad_call_fraction=1.5)


def test_calculator_expression_style_splits_by_what_the_model_sees():
    """In the expression style one expression can come from many stories; it must still sit in one split only."""
    seen = {split: {row["prompt"][1]["content"] for row in calculator.build_dataset(
        150, seed=0, split=split, style="expression", max_ops=1)} for split in ("train", "test")}
    assert len(seen["train"]) == len(seen["test"]) == 150  # distinct questions, not distinct stories
    assert not seen["train"] & seen["test"]


def test_calculator_flaky_tool_and_its_demonstrations():
    """tool_failure_rate: calls fail at random (reproducibly per seed), with the observation the traces show; the
    loop demonstrator calls four times and never answers."""
    rows = calculator.build_dataset(4, style="expression", max_ops=1, tool_failure_rate=0.4)
    assert rows[0]["tool_failure_rate"] == 0.4
    assert "tool_failure_rate" not in calculator.build_dataset(4, style="expression", max_ops=1).column_names
    with pytest.raises(ValueError, match="tool_failure_rate"):
        calculator.build_dataset(4, tool_failure_rate=1.0)

    executor = ToolExecutor()

    def outcomes(seed: int, row: dict) -> list[str]:
        calculator.seed_tool_failures(seed)
        env = calculator.CalculatorEnv()
        env.reset(**row)
        call = ToolCall("calculate", {"expression": row["expression"]})
        return [executor.run([({"calculate": env.calculate}, call)])[0].observation for _ in range(400)]

    first = outcomes(0, rows[0])
    busy = [o for o in first if o != rows[0]["answer"]]
    assert 0.3 < len(busy) / 400 < 0.5 and len(set(busy)) == 1 and calculator.BUSY_MESSAGE in busy[0]
    assert outcomes(0, rows[0]) == first and outcomes(1, rows[0]) != first  # the luck is the seed's
    assert set(outcomes(0, {**rows[0], "tool_failure_rate": 0.0})) == {rows[0]["answer"]}

    traces = calculator.synthetic_traces(300, style="expression", max_ops=1, tool_failure_rate=0.4, loop_fraction=0.2)
    retried = looped = 0
    for row in traces:
        completion = row["completion"]
        observations = [m["content"] for m in completion if m["role"] == "tool"]
        if busy[0] in observations:
            retried += 1
            assert observations[-1] != busy[0] and completion[-1]["content"].startswith("<answer>")
        if not completion[-1]["content"]:
            looped += 1
            assert len(observations) == 3 and completion[-1]["tool_calls"]  # a fourth call, no answer
    assert 60 < retried < 140 and 35 < looped < 85
