"""Calculator environment: arithmetic word problems solved with a ``calculate`` tool.

Problems are short stories of 1-3 operations on small integers (deterministic for a seed). The tool parses the
expression with ``ast`` and evaluates only numbers, ``+ - * / // % **``, unary signs and parentheses; it never calls
``eval``. Reward: 1.0 when the final ``<answer>`` equals the ground truth numerically, else 0.0. Turn reward: 0.1 for
a turn whose calculate calls all succeeded, 0.0 for a turn with a failed call, None for a turn without calls.

A flaky tool on request: rows with a ``tool_failure_rate`` column (``build_dataset(tool_failure_rate=...)``) make each
calculate call fail with that probability ("the calculator is busy; call it again"), drawn from a process-wide
generator (``seed_tool_failures``), so episodes of one prompt are unlucky independently of what the policy did.
"""

from __future__ import annotations

import ast
import math
import operator
import random
import re
from typing import Any

from datasets import Dataset

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
from rlfw.tools.execution import ToolExecutor
from rlfw.tools.parsers import ToolCall

TOOL_SUCCESS_REWARD = 0.1
MAX_EXPONENT = 64
MAX_ABS_VALUE = 10**30
MAX_EXPRESSION_CHARS = 200
BUSY_MESSAGE = "the calculator is busy; call it again"

# Short on purpose: with the small local tokenizer every prompt token costs training time on CPU.
SYSTEM_PROMPT = "Compute the answer with the calculate tool, then reply <answer>NUMBER</answer>."

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def evaluate(expression: str) -> int | float:
    """Evaluate an arithmetic expression safely. Raises ValueError with a readable message for anything else."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"invalid expression: {exc.msg}") from None
    return _eval_node(tree.body)


def _eval_node(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval_node(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large (limit {MAX_EXPONENT})")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("result is too large") from None
        if isinstance(value, complex) or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError("result is not a finite real number")
        if abs(value) > MAX_ABS_VALUE:
            raise ValueError("result is too large")
        return value
    if isinstance(node, ast.Name):
        raise ValueError(f"unknown name {node.id!r}: only numbers and operators are allowed")
    if isinstance(node, ast.Call):
        raise ValueError("function calls are not allowed")
    if isinstance(node, ast.Attribute):
        raise ValueError("attribute access is not allowed")
    raise ValueError(f"unsupported syntax: {type(node).__name__}")


class CalculatorBusy(RuntimeError):
    """A flaky calculate call: nothing was wrong with it, and the same call may succeed next time."""


_FAILURES = random.Random(0)


def seed_tool_failures(seed: int) -> None:
    """Reseed the draws of flaky calls (rows with ``tool_failure_rate``) in this process."""
    _FAILURES.seed(f"calculator-failures-{seed}")


def format_number(value: int | float) -> str:
    """Integers print without a decimal point; other floats with up to 6 significant decimals."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def numbers_equal(predicted: str | None, gold: str) -> bool:
    if predicted is None:
        return False
    try:
        return math.isclose(float(predicted.replace(",", "")), float(gold), rel_tol=1e-6, abs_tol=1e-6)
    except ValueError:
        return False


# One story step per operation: (operator, sentence template). {n} is the operand.
_STEPS = [
    ("+", "Then {name} gets {n} more."),
    ("-", "Then {name} gives away {n}."),
    ("*", "Then the number of {item} becomes {n} times as large."),
    ("//", "Then {name} shares them equally among {n} friends and keeps one share."),
]
_NAMES = ["Ana", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lena", "Milo", "Nora"]
_ITEMS = ["apples", "coins", "marbles", "stickers", "books", "shells", "cards", "pencils"]


def make_problem(rng: random.Random, num_ops: int, max_operand: int = 12) -> dict[str, Any]:
    """One word problem with ``num_ops`` operations; the value stays a non-negative integer at every step."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(2, 3 * max_operand)
    expression, precedence = str(value), 3
    sentences = [f"{name} has {value} {item}."]
    for _ in range(num_ops):
        op, template = rng.choice(_STEPS)
        if op == "-":
            n = rng.randint(1, max(1, value))
        elif op == "//":
            divisors = [d for d in range(2, max_operand + 1) if value % d == 0]
            if not divisors:
                op, template = _STEPS[0]
            n = rng.choice(divisors) if divisors else rng.randint(1, max_operand)
        else:
            n = rng.randint(2, max_operand)
        op_precedence = 1 if op in "+-" else 2
        # The new operation applies to everything so far, and all our operators are left-associative.
        left = f"({expression})" if precedence < op_precedence else expression
        expression, precedence = f"{left} {op} {n}", op_precedence
        value = evaluate(expression)
        sentences.append(template.format(name=name, n=n, item=item))
    sentences.append(f"How many {item} does {name} have now?")
    return {"question": " ".join(sentences), "expression": expression, "answer": format_number(value),
            "num_ops": num_ops}


def _problems(n: int, seed: int, split: str, min_ops: int, max_ops: int, max_operand: int = 12,
              style: str = "word") -> list[dict[str, Any]]:
    """``n`` distinct problems of ``split``, told apart and split by the question the model sees in ``style``: one
    expression asked in two stories is one problem in the expression style, so it never lands in both splits."""
    check_split(split)
    rng = random.Random(f"calculator-{seed}-{split}")
    problems, seen = [], set()
    for _ in range(200 * n + 1000):
        if len(problems) == n:
            return problems
        problem = make_problem(rng, rng.randint(min_ops, max_ops), max_operand)
        key = _question(problem, style)
        if key not in seen and split_of(key) == split:
            seen.add(key)
            problems.append(problem)
    raise ValueError(f"could not generate {n} distinct {split} problems; lower n or widen min_ops/max_ops")


def _question(problem: dict[str, Any], style: str) -> str:
    """The user's question: the word problem, or (style "expression") the quoted expression to compute.

    The expression is quoted so that it tokenizes exactly as inside the tool call's JSON string: a number after a
    space ("Compute 13") and after a quote ('"13') can split into different tokens, which a small model cannot
    learn to copy reliably.
    """
    if style not in ("word", "expression"):
        raise ValueError(f"style={style!r} is not valid; use 'word' or 'expression'")
    return problem["question"] if style == "word" else f'Compute "{problem["expression"]}".'


def build_dataset(n: int, seed: int = 0, split: str = "train", min_ops: int = 1, max_ops: int = 3,
                  style: str = "word", max_operand: int = 12, tool_failure_rate: float = 0.0) -> Dataset:
    """Columns: prompt (system + user messages), answer (str), expression (str), num_ops (int).

    ``style="expression"`` asks for the bare expression ("Compute 13 + 4 * 2.") instead of a word problem;
    ``max_operand`` bounds the operands (the starting value is at most three times that); ``tool_failure_rate`` > 0
    adds that column: each calculate call of those episodes fails at random with this probability.
    """
    _check_rate("tool_failure_rate", tool_failure_rate, below_one=True)
    rows = _problems(n, seed, split, min_ops, max_ops, max_operand, style)
    flaky = {"tool_failure_rate": float(tool_failure_rate)} if tool_failure_rate > 0 else {}
    return Dataset.from_list([
        {"prompt": conversation(SYSTEM_PROMPT, _question(p, style)), "answer": p["answer"], "expression": p["expression"],
         "num_ops": p["num_ops"], **flaky}
        for p in rows
    ])


def _check_rate(name: str, value: float, below_one: bool = False) -> None:
    if not (0.0 <= value < 1.0 if below_one else 0.0 <= value <= 1.0):
        raise ValueError(f"{name}={value} must be in [0, 1{')' if below_one else ']'}")


def synthetic_traces(n: int, seed: int = 0, split: str = "train", min_ops: int = 1, max_ops: int = 3,
                     style: str = "word", direct_fraction: float = 0.0, bad_call_fraction: float = 0.0,
                     max_operand: int = 12, guess_answers: bool = False, tool_failure_rate: float = 0.0,
                     loop_fraction: float = 0.0) -> Dataset:
    """Conversations (system, user, tool call, tool result, final answer) for an SFT warm start.

    Returned as TRL's conversational prompt-completion format: columns prompt (system, user) and completion.
    Two options make an imperfect demonstrator, a policy RL can improve on:

    - ``direct_fraction`` of the traces answer at once without the tool (right only for memorised questions);
    - ``bad_call_fraction`` of the remaining traces call the tool with a wrong argument name (``expr``), get the
      error observation, and then answer without a result.

    Those tool-less answers are right (a demonstrator that knows the answer) unless ``guess_answers``: then they are
    the expression's first number, the guess of a policy that skips the tool (wrong but for rare cases), so the
    warm start does not learn to answer without the tool as if it could compute.

    ``tool_failure_rate``: each call of a tool-using trace is busy with this probability (at most twice in a row)
    and retried, as a flaky calculator needs. ``loop_fraction`` of the tool-using traces call the tool four times
    and never answer (the demonstrator of an agent that collects tool rewards without submitting).
    """
    for name, value in (("direct_fraction", direct_fraction), ("bad_call_fraction", bad_call_fraction),
                        ("loop_fraction", loop_fraction)):
        _check_rate(name, value)
    _check_rate("tool_failure_rate", tool_failure_rate, below_one=True)
    traces = []
    rng = random.Random(f"calculator-traces-{seed}")
    direct_answer = {"role": "assistant", "content": ""}
    executor = ToolExecutor()
    busy_observation = executor.run([({"calculate": _busy}, ToolCall("calculate", {"expression": "1"}))])[0].observation
    for p in _problems(n, seed, split, min_ops, max_ops, max_operand, style):
        guessed = re.match(r"\(*(\d+)", p["expression"]).group(1) if guess_answers else p["answer"]
        guess = {**direct_answer, "content": ANSWER_FORMAT.format(guessed)}
        if rng.random() < direct_fraction:
            traces.append([*conversation(SYSTEM_PROMPT, _question(p, style)), guess])
            continue
        if rng.random() < bad_call_fraction:
            bad_call = ToolCall("calculate", {"expr": p["expression"]})
            observation = executor.run([({"calculate": CalculatorEnv().calculate}, bad_call)])[0].observation
            traces.append([
                *conversation(SYSTEM_PROMPT, _question(p, style)),
                tool_call_message("calculate", bad_call.arguments),
                {"role": "tool", "name": "calculate", "content": observation},  # exactly what the engine shows
                guess,
            ])
            continue
        call = tool_call_message("calculate", {"expression": p["expression"]})
        result = {"role": "tool", "name": "calculate", "content": format_number(evaluate(p["expression"]))}
        if loop_fraction and rng.random() < loop_fraction:
            traces.append([*conversation(SYSTEM_PROMPT, _question(p, style)), *[call, result] * 3, call])
            continue
        retries = []
        while tool_failure_rate and len(retries) < 4 and rng.random() < tool_failure_rate:
            retries += [call, {"role": "tool", "name": "calculate", "content": busy_observation}]
        traces.append([
            *conversation(SYSTEM_PROMPT, _question(p, style)), *retries, call, result,
            {"role": "assistant", "content": ANSWER_FORMAT.format(p["answer"])},
        ])
    return traces_dataset(traces, ENVIRONMENT)


def _busy(expression: str) -> str:
    raise CalculatorBusy(BUSY_MESSAGE)


def score_final(final_text: str, gold: str) -> float:
    return 1.0 if numbers_equal(extract_answer(final_text), gold) else 0.0


class CalculatorEnv(EpisodeEnvironment):
    """Arithmetic word problems with a calculator tool."""

    def _clear(self, row: dict[str, Any]) -> None:
        super()._clear(row)
        self.answer = str(row.get("answer", ""))
        self.failure_rate = float(row.get("tool_failure_rate") or 0.0)

    def calculate(self, expression: str) -> str:
        """Evaluate an arithmetic expression.

        Args:
            expression: Arithmetic with numbers, + - * / // % ** and parentheses, for example "(3 + 4) * 2".

        Returns:
            The value of the expression.
        """
        if self.failure_rate and _FAILURES.random() < self.failure_rate:
            self._record({"tool": "calculate", "expression": expression, "ok": False, "busy": True})
            raise CalculatorBusy(BUSY_MESSAGE)
        try:
            result = format_number(evaluate(str(expression)))
        except ValueError as exc:
            self._record({"tool": "calculate", "expression": expression, "ok": False, "error": str(exc)})
            raise
        self._record({"tool": "calculate", "expression": expression, "ok": True, "result": result})
        return result

    def _score(self, final_text: str) -> float:
        return score_final(final_text, self.answer)

    def _score_turn(self, events: list[dict[str, Any]]) -> float:
        return TOOL_SUCCESS_REWARD if all(e["ok"] for e in events) else 0.0


calculator_correct = reward_function("calculator_correct", lambda text, row: score_final(text, row["answer"]))

ENVIRONMENT = CalculatorEnv
REWARD_FUNCS = [calculator_correct]
