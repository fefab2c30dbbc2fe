"""What the Python sandbox costs per call: wall time of ``run_code`` from call to result, start-up included.

    OMP_NUM_THREADS=1 python bench/sandbox.py [--calls 40] [--baseline REV] [--no-write]

Workloads: ``pass`` (pure start-up and teardown), a tool call printing a value, and one reward scoring (the
python_sandbox test harness on a task's reference solution, 5 tests). ``--baseline REV`` also times
``envs/sandbox.py`` as it was at git revision REV (loaded with ``git show``; same workloads, its own default
limits), calls alternating between the two after 3 discarded warm-up calls each, so both see the same machine load.
Reports median, 10th and 90th percentile per workload, in milliseconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _doc import ROOT, append_result, machine

sys.path.insert(0, str(ROOT))

from envs import _tasks, sandbox  # noqa: E402
from envs.python_sandbox import HARNESS  # noqa: E402

WARMUP = 3


def workloads() -> dict[str, tuple[str, str]]:
    task = _tasks.all_tasks()[0]
    nonce = secrets.token_hex(16)
    return {
        "start-up (`pass`)": ("pass", ""),
        "tool call (`print(sum(range(10)))`)": ("print(sum(range(10)))", ""),
        "reward scoring (harness, 5 tests)": (HARNESS.format(source=task["solution"], tests=task["tests"]),
                                              nonce + "\n"),
    }


def load_baseline(rev: str):
    """``envs/sandbox.py`` at git revision ``rev``, as a module of its own."""
    source = subprocess.run(["git", "show", f"{rev}:envs/sandbox.py"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="rlfw-bench-")) / "baseline_sandbox.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def time_call(module, code: str, stdin: str) -> float:
    start = time.perf_counter()
    result = module.run_code(code, module.SandboxLimits(), stdin=stdin)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{module.__name__}: the bench program failed: {result}")
    return elapsed * 1000


def measure(contenders: dict[str, object], calls: int) -> dict[tuple[str, str], list[float]]:
    times: dict[tuple[str, str], list[float]] = {}
    for workload, (code, stdin) in workloads().items():
        for name, module in contenders.items():
            for _ in range(WARMUP):
                time_call(module, code, stdin)
            times[(name, workload)] = []
        for i in range(calls):
            order = list(contenders.items()) if i % 2 == 0 else list(reversed(contenders.items()))
            for name, module in order:
                times[(name, workload)].append(time_call(module, code, stdin))
    return times


def table(times: dict[tuple[str, str], list[float]]) -> str:
    rows = ["| sandbox | workload | median ms | p10 ms | p90 ms |", "|---|---|---|---|---|"]
    for (name, workload), values in times.items():
        deciles = statistics.quantiles(values, n=10)
        rows.append(f"| {name} | {workload} | {statistics.median(values):.1f} | {deciles[0]:.1f} | "
                    f"{deciles[-1]:.1f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--baseline", default=None, help="git revision whose envs/sandbox.py to time as well")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to docs/benchmarks.md")
    args = parser.parse_args()
    backend = sandbox.check_sandbox()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    contenders = {f"bubblewrap ({commit})": sandbox}
    if args.baseline:
        contenders[f"previous ({args.baseline})"] = load_baseline(args.baseline)
    times = measure(contenders, args.calls)
    body = (f"Machine: {machine()}. Commit {commit}. {args.calls} calls per workload and sandbox. Sandbox: "
            f"bwrap {backend.bwrap}, interpreter {backend.python}, per-run cgroup "
            f"{'yes' if backend.cgroups else 'no'}.\n\n{table(times)}")
    print(body)
    if not args.no_write:
        append_result("Python sandbox start-up", "Wall time of one `envs.sandbox.run_code` call, from call to "
                      "result (process start, isolation set-up, run, teardown). See bench/sandbox.py.", body)


if __name__ == "__main__":
    main()
