"""Templates of small programming tasks for the Python sandbox environment.

Each template takes a parameter and returns (function name, description, reference solution, reference callable,
input generator). Unit tests are ``assert name(args) == expected`` with expected values computed by the trusted
reference callable in this process; a test checks that every reference solution passes its own tests.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

Template = Callable[[Any], tuple[str, str, str, Callable, Callable[[random.Random], tuple]]]


def _ints(rng: random.Random, lo: int = -9, hi: int = 20, size: tuple[int, int] = (0, 6)) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(*size))]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdeilmnorst") for _ in range(rng.randint(1, 7)))


def _sentence(rng: random.Random) -> str:
    return " ".join(_word(rng) for _ in range(rng.randint(1, 5)))


TEMPLATES: dict[str, tuple[Template, list]] = {
    "add_k": (lambda k: ("add_k", f"returns its argument x plus {k}", f"def add_k(x):\n    return x + {k}",
                         lambda x: x + k, lambda r: (r.randint(-50, 50),)), [1, 3, 7, 10, 25]),
    "multiply": (lambda _: ("multiply", "returns the product of a and b", "def multiply(a, b):\n    return a * b",
                            lambda a, b: a * b, lambda r: (r.randint(-12, 12), r.randint(-12, 12))), [None]),
    "power": (lambda k: ("power", f"returns x raised to the power {k}", f"def power(x):\n    return x ** {k}",
                         lambda x: x**k, lambda r: (r.randint(-6, 6),)), [2, 3, 4]),
    "scale_list": (lambda k: ("scale_list", f"returns a new list with every element of xs multiplied by {k}",
                              f"def scale_list(xs):\n    return [x * {k} for x in xs]",
                              lambda xs: [x * k for x in xs], lambda r: (_ints(r),)), [2, 3, 5, -1]),
    "sum_list": (lambda _: ("sum_list", "returns the sum of the numbers in the list xs",
                            "def sum_list(xs):\n    return sum(xs)", sum, lambda r: (_ints(r),)), [None]),
    "max_of": (lambda _: ("max_of", "returns the largest number in the non-empty list xs",
                          "def max_of(xs):\n    return max(xs)", max, lambda r: (_ints(r, size=(1, 6)),)), [None]),
    "count_greater": (lambda k: ("count_greater", f"returns how many numbers in the list xs are greater than {k}",
                                 f"def count_greater(xs):\n    return sum(1 for x in xs if x > {k})",
                                 lambda xs: sum(1 for x in xs if x > k), lambda r: (_ints(r),)), [0, 5, 10]),
    "filter_even": (lambda _: ("filter_even", "returns the even numbers of the list xs, in order",
                               "def filter_even(xs):\n    return [x for x in xs if x % 2 == 0]",
                               lambda xs: [x for x in xs if x % 2 == 0], lambda r: (_ints(r),)), [None]),
    "first_n": (lambda k: ("first_n", f"returns the first {k} elements of the list xs (all of them if fewer)",
                           f"def first_n(xs):\n    return xs[:{k}]", lambda xs: xs[:k], lambda r: (_ints(r),)),
                [1, 2, 3]),
    "dedupe": (lambda _: ("dedupe", "returns the list xs without repeated elements, keeping first occurrences",
                          "def dedupe(xs):\n    out = []\n    for x in xs:\n        if x not in out:\n"
                          "            out.append(x)\n    return out",
                          lambda xs: list(dict.fromkeys(xs)), lambda r: (_ints(r, 0, 5, (0, 8)),)), [None]),
    "running_sum": (lambda _: ("running_sum", "returns the list of running totals of the list xs",
                               "def running_sum(xs):\n    out, total = [], 0\n    for x in xs:\n        total += x\n"
                               "        out.append(total)\n    return out",
                               lambda xs: [sum(xs[: i + 1]) for i in range(len(xs))], lambda r: (_ints(r),)), [None]),
    "reverse_string": (lambda _: ("reverse_string", "returns the string s reversed",
                                  "def reverse_string(s):\n    return s[::-1]", lambda s: s[::-1],
                                  lambda r: (_word(r),)), [None]),
    "is_palindrome": (lambda _: ("is_palindrome", "returns True if the string s reads the same backwards",
                                 "def is_palindrome(s):\n    return s == s[::-1]", lambda s: s == s[::-1],
                                 lambda r: (r.choice([_word(r), "abba", "level", "racecar"]),)), [None]),
    "count_char": (lambda c: ("count_char", f"returns how many times the character {c!r} occurs in the string s",
                              f"def count_char(s):\n    return s.count({c!r})", lambda s: s.count(c),
                              lambda r: (_sentence(r),)), ["a", "e", "o", "s"]),
    "repeat_string": (lambda k: ("repeat_string", f"returns the string s repeated {k} times",
                                 f"def repeat_string(s):\n    return s * {k}", lambda s: s * k,
                                 lambda r: (_word(r),)), [2, 3]),
    "capitalize_words": (lambda _: ("capitalize_words", "returns the string s with each word capitalized "
                                    "(words are separated by single spaces)",
                                    "def capitalize_words(s):\n    return ' '.join(w.capitalize() for w in s.split(' '))",
                                    lambda s: " ".join(w.capitalize() for w in s.split(" ")),
                                    lambda r: (_sentence(r),)), [None]),
    "word_count": (lambda _: ("word_count", "returns the number of words in the string s",
                              "def word_count(s):\n    return len(s.split())", lambda s: len(s.split()),
                              lambda r: (_sentence(r),)), [None]),
    "count_vowels": (lambda _: ("count_vowels", "returns the number of vowels (a, e, i, o, u) in the string s",
                                "def count_vowels(s):\n    return sum(1 for c in s if c in 'aeiou')",
                                lambda s: sum(1 for c in s if c in "aeiou"), lambda r: (_sentence(r),)), [None]),
    "join_with": (lambda sep: ("join_with", f"returns the strings of the list words joined with {sep!r}",
                               f"def join_with(words):\n    return {sep!r}.join(words)", lambda w: sep.join(w),
                               lambda r: ([_word(r) for _ in range(r.randint(0, 4))],)), ["-", ", ", "+"]),
    "factorial": (lambda _: ("factorial", "returns n factorial for a non-negative integer n",
                             "def factorial(n):\n    out = 1\n    for i in range(2, n + 1):\n        out *= i\n"
                             "    return out", math.factorial, lambda r: (r.randint(0, 10),)), [None]),
    "fibonacci": (lambda _: ("fibonacci", "returns the n-th Fibonacci number, with fibonacci(0) == 0 and "
                             "fibonacci(1) == 1",
                             "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
                             "    return a", lambda n: _fib(n), lambda r: (r.randint(0, 20),)), [None]),
    "is_prime": (lambda _: ("is_prime", "returns True if the integer n is a prime number",
                            "def is_prime(n):\n    if n < 2:\n        return False\n"
                            "    return all(n % d for d in range(2, int(n ** 0.5) + 1))",
                            lambda n: n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1)),
                            lambda r: (r.randint(-3, 60),)), [None]),
    "sum_digits": (lambda _: ("sum_digits", "returns the sum of the decimal digits of the non-negative integer n",
                              "def sum_digits(n):\n    return sum(int(c) for c in str(n))",
                              lambda n: sum(int(c) for c in str(n)), lambda r: (r.randint(0, 99999),)), [None]),
    "clamp": (lambda b: ("clamp", f"returns x limited to the range [{b[0]}, {b[1]}]",
                         f"def clamp(x):\n    return max({b[0]}, min({b[1]}, x))", lambda x: max(b[0], min(b[1], x)),
                         lambda r: (r.randint(-30, 30),)), [(0, 10), (-5, 5)]),
    "gcd": (lambda _: ("gcd", "returns the greatest common divisor of the positive integers a and b",
                       "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a", math.gcd,
                       lambda r: (r.randint(1, 60), r.randint(1, 60))), [None]),
}


def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def make_task(template: str, param: Any, num_tests: int = 5) -> dict[str, Any]:
    """The task for one template and parameter: description, entry point, reference solution and tests."""
    name, what, solution, reference, inputs = TEMPLATES[template][0](param)
    rng = random.Random(f"tests-{template}-{param!r}")
    tests, seen = [], set()
    for _ in range(20 * num_tests):
        args = inputs(rng)
        call = f"{name}({', '.join(repr(a) for a in args)})"
        if call not in seen:
            seen.add(call)
            tests.append(f"assert {call} == {reference(*args)!r}")
        if len(tests) == num_tests:
            break
    return {"task": template, "entry_point": name, "description": f"Write a Python function `{name}` that {what}.",
            "solution": solution, "tests": tests}


def all_tasks() -> list[dict[str, Any]]:
    return [make_task(t, p) for t, (_, params) in TEMPLATES.items() for p in params]
