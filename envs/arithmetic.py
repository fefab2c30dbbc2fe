"""arithmetic: single-turn arithmetic questions answered as ``<answer>N</answer>`` (no tools).

The smallest task that shows learning: configs/arithmetic/grpo.yaml warm-starts a small model on it with SFT, then RL
teaches it the rewarded answer format.
"""

from __future__ import annotations

import random
import re

from datasets import Dataset

from rlfw.rewards import answers_match, completion_text, exact_match, final_answer

SYSTEM = "Answer with the result in <answer></answer>."
REWARD_FUNCS = [exact_match]
NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def _problem(rng: random.Random, max_operand: int) -> tuple[str, int]:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    op = rng.choice("+-")
    return f"What is {a} {op} {b}?", a + b if op == "+" else a - b


def _problems(n: int, seed: int, split: str, max_operand: int, distinct: bool = True) -> list[tuple[str, int]]:
    """n problems (distinct unless told otherwise); train and test come from disjoint parts of the question space."""
    rng = random.Random(f"{seed}-{split}")
    out, seen = [], set()
    for _ in range(1000 * n + 10000):  # bounded: a too-small question space fails instead of looping
        if len(out) == n:
            return out
        question, answer = _problem(rng, max_operand)
        # Split by a stable hash of the question text so train/test never share a question.
        in_test = sum(question.encode()) % 5 == 0
        if (distinct and question in seen) or in_test != (split == "test"):
            continue
        seen.add(question)
        out.append((question, answer))
    if len(out) == n:
        return out
    raise ValueError(f"asked for {n} distinct {split} questions but max_operand={max_operand} allows only "
                     f"{len(out)}; raise max_operand or lower n.")


def build_dataset(n: int, seed: int = 0, split: str = "train", max_operand: int = 20, system: str = SYSTEM) -> Dataset:
    """Columns: prompt (chat messages), answer (string). ``system`` is the system message (the instruction)."""
    rows = _problems(n, seed, split, max_operand)
    return Dataset.from_dict({
        "prompt": [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q, _ in rows],
        "answer": [str(a) for _, a in rows],
    })


def synthetic_traces(n: int, seed: int = 0, max_operand: int = 20, untagged_fraction: float = 0.0) -> Dataset:
    """Conversations for supervised warm-start: columns prompt, completion (chat messages).

    ``untagged_fraction`` of the answers are written "The answer is N." without the ``<answer>`` tags the reward
    checks, so the warm-started policy sometimes answers in a form that scores 0 (what RL then learns to avoid).
    """
    rows = _problems(n, seed + 1000, "train", max_operand, distinct=False)
    rng = random.Random(f"arithmetic-traces-{seed}")
    answers = [f"The answer is {a}." if rng.random() < untagged_fraction else f"<answer>{a}</answer>" for _, a in rows]
    return Dataset.from_dict({
        "prompt": [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q, _ in rows],
        "completion": [[{"role": "assistant", "content": a}] for a in answers],
    })


def last_number(text: str) -> str | None:
    """The last number written in ``text``; None when there is none."""
    found = NUMBER_RE.findall(text)
    return found[-1] if found else None


def partial_credit(completions: list, answer: list, **kwargs) -> list[float]:
    """1.0 for the right result in ``<answer>`` tags; 0.5 for a reply without tags whose last number is the right
    result (right, but not in the asked-for format); 0.0 otherwise (a wrong tagged answer included).

    For a pretrained chat model that computes but ignores the format: the half credit gives RL a signal from the
    first step, the full credit rewards the format once the policy samples it.
    """
    scores = []
    for completion, gold in zip(completions, answer, strict=True):
        tagged = final_answer(completion)
        if tagged is not None:
            scores.append(float(answers_match(tagged, gold)))
        else:
            scores.append(0.5 * answers_match(last_number(completion_text(completion)), gold))
    return scores
