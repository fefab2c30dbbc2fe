"""Running parsed tool calls: concurrently, with a per-call timeout, every failure turned into an observation.

Calls run on a pool of reusable daemon worker threads, one call per free worker (starting a thread per call cost
about a millisecond each, a visible share of a fast rollout turn). A hung tool keeps its worker and is abandoned
after the timeout: the pool starts another worker for later calls, the step goes on, and the interpreter can still
exit (a ``ThreadPoolExecutor`` would block both once its pool is full or at exit).
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlfw.tools.parsers import ParseError, ToolCall

METRIC_KEYS = ("calls", "failures", "parse_errors", "unknown_tool", "bad_arguments", "exceptions", "timeouts", "truncated")


@dataclass
class ToolOutcome:
    """What the model sees for one call (``observation``) and how it went (``kind``: "ok" or a METRIC_KEYS name)."""

    name: str
    observation: str
    kind: str = "ok"
    truncated: bool = False

    @property
    def failed(self) -> bool:
        return self.kind != "ok"


class _Running:
    """One submitted call; ``done`` is set when it returned (``result``) or raised (``error``)."""

    def __init__(self, fn: Callable, arguments: dict[str, Any]):
        self.fn, self.arguments = fn, arguments
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            value = self.fn(**self.arguments)
            self.result = asyncio.run(value) if inspect.isawaitable(value) else value
        except BaseException as e:  # contained: reported to the model, never raised into the rollout
            self.error = e
        finally:
            self.done.set()


class _WorkerPool:
    """Daemon threads that take calls from a queue. ``submit`` first makes sure each call has a free worker, so
    calls never wait behind one another (or behind a hung tool) and all of a turn's calls run concurrently."""

    def __init__(self):
        self._jobs: queue.SimpleQueue[_Running] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, jobs: list[_Running]) -> None:
        with self._lock:
            missing = len(jobs) - self._idle
            self._idle -= len(jobs) - max(missing, 0)
        for _ in range(max(missing, 0)):
            threading.Thread(target=self._work, daemon=True, name="rlfw-tool").start()
        for job in jobs:
            self._jobs.put(job)

    def _work(self) -> None:
        while True:
            self._jobs.get().run()
            with self._lock:
                self._idle += 1


_POOL = _WorkerPool()


class ToolExecutor:
    """Runs the tool calls of many rollouts at once and formats their outcomes as observation strings."""

    def __init__(self, timeout: float = 30.0, max_result_chars: int = 2000):
        if timeout <= 0 or max_result_chars <= 0:
            raise ValueError("tool timeout and max_result_chars must be positive")
        self.timeout = timeout
        self.max_result_chars = max_result_chars

    def run(self, jobs: list[tuple[dict[str, Callable], ToolCall | ParseError]]) -> list[ToolOutcome]:
        """``jobs``: (that rollout's tool dict, parsed call or parse error) pairs. One outcome per job, in order."""
        outcomes: list[ToolOutcome | None] = [None] * len(jobs)
        running: dict[int, tuple[str, _Running]] = {}
        for i, (tools, call) in enumerate(jobs):
            outcome = self._check(tools, call)
            if outcome is not None:
                outcomes[i] = outcome
            else:
                running[i] = (call.name, _Running(tools[call.name], call.arguments))
        _POOL.submit([job for _, job in running.values()])
        deadline = time.monotonic() + self.timeout  # all calls start together, so one deadline bounds the turn
        for i, (name, job) in running.items():
            job.done.wait(max(0.0, deadline - time.monotonic()))
            outcomes[i] = self._outcome(name, job)
        return outcomes

    def _check(self, tools: dict[str, Callable], call: ToolCall | ParseError) -> ToolOutcome | None:
        """The error outcome of a call that cannot run, or None when it can."""
        if isinstance(call, ParseError):
            return ToolOutcome("error", f"Error: {call.message}.", "parse_errors")
        fn = tools.get(call.name)
        if fn is None:
            valid = ", ".join(sorted(tools)) or "(none)"
            return ToolOutcome(call.name, f"Error: unknown tool {call.name!r}. Valid tools: {valid}.", "unknown_tool")
        try:
            inspect.signature(fn).bind(**call.arguments)
        except TypeError as e:
            return ToolOutcome(call.name, f"Error: bad arguments for tool {call.name!r}: {e}.", "bad_arguments")
        except ValueError:  # no introspectable signature (some builtins): let the call itself decide
            pass
        return None

    def _outcome(self, name: str, job: _Running) -> ToolOutcome:
        if not job.done.is_set():
            return ToolOutcome(name, f"Error: tool {name!r} exceeded the {self.timeout:g} s timeout.", "timeouts")
        if job.error is not None:
            err = job.error
            return ToolOutcome(name, f"Error: tool {name!r} raised {type(err).__name__}: {err}", "exceptions")
        text = str(job.result)
        if len(text) <= self.max_result_chars:
            return ToolOutcome(name, text)
        cut = len(text) - self.max_result_chars
        return ToolOutcome(name, f"{text[: self.max_result_chars]}... [truncated {cut} chars]", truncated=True)


def count_outcomes(outcomes: list[ToolOutcome]) -> Counter:
    """Metric counts (keys of METRIC_KEYS) for a list of outcomes."""
    counts = Counter({k: 0 for k in METRIC_KEYS})
    for o in outcomes:
        counts["calls"] += 1
        counts["failures"] += o.failed
        counts["truncated"] += o.truncated
        if o.failed:
            counts[o.kind] += 1
    return counts
