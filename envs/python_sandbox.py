"""Python sandbox environment: small programming tasks, a ``run_python`` tool, unit tests as the reward.

Tasks come from 25 templates with parameters (``envs._tasks``): list, string and number functions, each with 5
``assert`` unit tests. The tool runs code in a separate, resource-limited process without network
(``envs.sandbox``) and returns its output. The final answer is the code of the final assistant message: the content
of ``<answer>...</answer>`` (a ```python fence inside is allowed) or, without answer tags, the last ```python fenced
block. Reward: the fraction of the task's unit tests that pass when that code runs in the sandbox, NaN (unscorable)
when the sandbox itself failed. Turn reward: 1.0 for a turn whose run_python calls all exited cleanly, 0.0
otherwise, None for a turn without calls.

Every program is hostile until proven otherwise: the environment refuses to start without a working sandbox
(``envs.sandbox.check_sandbox``), and no tool call or scoring raises on what a program does.
"""

from __future__ import annotations

import math
import random
import re
import secrets
from typing import Any

from datasets import Dataset

from envs import _tasks
from envs.episode import (
    ANSWER_FORMAT,
    EpisodeEnvironment,
    check_split,
    conversation,
    extract_answer,
    reward_function,
    split_of,
    tool_call_message,
    traces_dataset,
)
from envs.sandbox import SandboxLimits, SandboxResult, check_sandbox, run_code

CLEAN_RUN_REWARD = 1.0
TOOL_LIMITS = SandboxLimits(wall_seconds=5.0, cpu_seconds=2, max_output_chars=2000)
TEST_LIMITS = SandboxLimits(wall_seconds=10.0, cpu_seconds=4, max_output_chars=20000)

SYSTEM_PROMPT = (
    "You write Python functions. You have one tool, run_python(code), which runs a Python program in a sandbox "
    "and returns its output; use it to test your code. When you are done, give the final function definition as "
    "<answer>CODE</answer>."
)

FENCE_RE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)

# Runs the candidate and then each test in one process. Each passing test prints a line with a nonce the harness
# reads from stdin before the candidate runs, so candidate code cannot print fake results without knowing it. The
# candidate's own output is swallowed so that it cannot push the result lines past the output limit.
HARNESS = """\
import contextlib, io, sys
def _run(nonce, source, tests):
    out = sys.stdout
    namespace = {{"__name__": "solution"}}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(source, "solution.py", "exec"), namespace)
    except BaseException as exc:
        print(f"solution failed: {{type(exc).__name__}}: {{exc}}", file=sys.stderr)
        return
    for i, test in enumerate(tests):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                exec(test, namespace)
        except BaseException:
            continue
        print(nonce, "PASS", i, file=out, flush=True)
_run(sys.stdin.readline().strip(), {source!r}, {tests!r})
"""


def extract_code(text: str | None) -> str | None:
    """The final code of a message: ``<answer>`` content (unfenced) or else the last ```python block."""
    if not text:
        return None
    answer = extract_answer(text)
    if answer is not None:
        fenced = FENCE_RE.findall(answer)
        return (fenced[-1] if fenced else answer).strip() or None
    fenced = FENCE_RE.findall(text)
    return fenced[-1].strip() if fenced else None


def run_tests(code: str | None, tests: list[str], limits: SandboxLimits = TEST_LIMITS) -> float:
    """Fraction of ``tests`` that pass against ``code`` in the sandbox (0.0 for no code or no tests; NaN when the
    sandbox failed, so the sample is unscorable rather than wrongly scored)."""
    if not code or not tests:
        return 0.0
    nonce = secrets.token_hex(16)
    result = run_code(HARNESS.format(source=code, tests=list(tests)), limits, stdin=nonce + "\n")
    if result.error:
        return math.nan
    passed = {line.split()[2] for line in result.stdout.splitlines()
              if line.startswith(nonce + " PASS ") and len(line.split()) == 3}
    return len(passed & {str(i) for i in range(len(tests))}) / len(tests)


def format_result(result: SandboxResult) -> str:
    """What the model sees after run_python: output, errors and how the run ended."""
    if result.error:
        return f"[sandbox error: {result.error}]"
    parts = [result.stdout.rstrip()] if result.stdout.strip() else []
    if result.stderr.strip():
        parts.append("stderr:\n" + result.stderr.rstrip())
    if result.killed_reason:
        parts.append(f"[stopped: {result.killed_reason}]")
    elif result.returncode != 0:
        parts.append(f"[exit code {result.returncode}]")
    return "\n".join(parts) or "(no output)"


def _tasks_for(n: int, seed: int, split: str) -> list[dict[str, Any]]:
    """``n`` tasks of ``split`` in a seeded order; the split's pool repeats when n exceeds it."""
    check_split(split)
    pool = [t for t in _tasks.all_tasks() if split_of(t["description"]) == split]
    random.Random(f"python-sandbox-{seed}-{split}").shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]


def build_dataset(n: int, seed: int = 0, split: str = "train") -> Dataset:
    """Columns: prompt, answer (reference solution), tests (assert statements), entry_point, task (template)."""
    return Dataset.from_list([
        {"prompt": conversation(SYSTEM_PROMPT, t["description"]), "answer": t["solution"], "tests": t["tests"],
         "entry_point": t["entry_point"], "task": t["task"]}
        for t in _tasks_for(n, seed, split)
    ])


def synthetic_traces(n: int, seed: int = 0, split: str = "train") -> Dataset:
    """Ideal conversations: run the reference solution on the first test's call, then answer with it (columns prompt, completion)."""
    traces = []
    for t in _tasks_for(n, seed, split):
        call = t["tests"][0].removeprefix("assert ").rsplit(" == ", 1)[0]
        program = f"{t['solution']}\nprint({call})"
        traces.append([
            *conversation(SYSTEM_PROMPT, t["description"]),
            tool_call_message("run_python", {"code": program}),
            {"role": "tool", "name": "run_python", "content": format_result(run_code(program, TOOL_LIMITS))},
            {"role": "assistant", "content": ANSWER_FORMAT.format(t["solution"])},
        ])
    return traces_dataset(traces, ENVIRONMENT)


class PythonSandboxEnv(EpisodeEnvironment):
    """Programming tasks with a sandboxed Python interpreter as the tool."""

    def __init__(self) -> None:
        check_sandbox()  # refuse to start (SandboxUnavailable, naming the fix) where code cannot be contained
        super().__init__()

    def _clear(self, row: dict[str, Any]) -> None:
        super()._clear(row)
        self.tests = list(row.get("tests") or [])

    def run_python(self, code: str) -> str:
        """Run a Python program in a sandbox and return what it printed.

        Args:
            code: A complete Python program; use print() to see values.

        Returns:
            The program's standard output and errors, truncated if long.
        """
        result = run_code(str(code), TOOL_LIMITS)
        self._record({"tool": "run_python", "ok": result.ok, "killed_reason": result.killed_reason,
                      "error": result.error})
        return format_result(result)

    def _has_answer(self, text: str) -> bool:
        return extract_code(text) is not None

    def _score(self, final_text: str) -> float:
        try:
            return run_tests(extract_code(final_text), self.tests)
        except Exception:  # noqa: BLE001 - hostile answers must not stop training: unscorable instead
            return math.nan

    def _score_turn(self, events: list[dict[str, Any]]) -> float:
        if any(e.get("error") for e in events):
            return math.nan  # the sandbox failed, the turn says nothing about the policy
        return CLEAN_RUN_REWARD if all(e["ok"] for e in events) else 0.0


python_tests_passed = reward_function(
    "python_tests_passed", lambda text, row: run_tests(extract_code(text), row["tests"]))

ENVIRONMENT = PythonSandboxEnv
REWARD_FUNCS = [python_tests_passed]
