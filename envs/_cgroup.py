"""Per-run control groups for the sandbox: one memory limit and one process limit for all of a run's processes.

Resource limits (``setrlimit``) bound each process on its own, so a program with N children could use N times the
memory limit. A cgroup bounds their sum (tmpfs pages included, since they are charged to the writer's cgroup) and
lets the parent kill every process of a run at once. Used where the host lets this process create cgroups: cgroup v2
with the ``memory`` and ``pids`` controllers enabled for our cgroup's children, or cgroup v1 ``memory`` and ``pids``
hierarchies we may write to (typically as root). Detected once; without it the per-process limits still hold.
"""

from __future__ import annotations

import functools
import itertools
import os
import signal
import time

CGROUP_ROOT = "/sys/fs/cgroup"
REMOVE_TIMEOUT_S = 2.0
PREFIX = "rlfw-sandbox-"  # + parent pid + "-" + run number
_names = itertools.count()


def _own_paths() -> dict[str, str]:
    """Our cgroup path per v1 controller ("memory", "pids") and under "" for the v2 hierarchy."""
    paths: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                paths[name] = path
    return paths


def _remove_stale(path: str) -> None:
    """Remove empty run cgroups left by processes that died mid-run (named after their pid)."""
    try:
        names = os.listdir(path)
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        if name.startswith(PREFIX) and len(parts) == 4 and parts[2].isdigit() and not os.path.exists(f"/proc/{parts[2]}"):
            try:
                os.rmdir(os.path.join(path, name))
            except OSError:
                pass


def _writable_parent(path: str, required: tuple[str, ...]) -> str | None:
    """``path`` if a child cgroup created there has the ``required`` files (proof the controllers are on)."""
    _remove_stale(path)
    probe = os.path.join(path, f"rlfw-probe-{os.getpid()}")
    try:
        os.mkdir(probe)
    except OSError:
        return None
    try:
        return path if all(os.path.exists(os.path.join(probe, name)) for name in required) else None
    finally:
        os.rmdir(probe)


@functools.cache
def parents() -> tuple[str, ...]:
    """The directories to create a run's cgroups in: one (v2) or two (v1 memory, pids); () when unavailable."""
    try:
        own = _own_paths()
    except OSError:
        return ()
    if os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")) and "" in own:
        parent = _writable_parent(CGROUP_ROOT + own[""], ("memory.max", "pids.max"))
        return (parent,) if parent else ()
    found = []
    for controller, required in (("memory", "memory.limit_in_bytes"), ("pids", "pids.max")):
        if controller not in own:
            return ()
        parent = _writable_parent(os.path.join(CGROUP_ROOT, controller) + own[controller], (required,))
        if parent is None:
            return ()
        found.append(parent)
    return tuple(found)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


class RunCgroup:
    """The cgroup(s) of one run, created with its limits; ``close()`` kills what is left and removes them."""

    def __init__(self, memory_bytes: int, max_processes: int) -> None:
        name = f"{PREFIX}{os.getpid()}-{next(_names)}"
        self.dirs: list[str] = []
        try:
            for parent in parents():
                path = os.path.join(parent, name)
                os.mkdir(path)
                self.dirs.append(path)
                self._limit(path, memory_bytes, max_processes)
        except OSError:
            self.close()
            raise

    @staticmethod
    def _limit(path: str, memory_bytes: int, max_processes: int) -> None:
        if os.path.exists(os.path.join(path, "memory.max")):  # v2
            _write(os.path.join(path, "memory.max"), str(memory_bytes))
            if os.path.exists(os.path.join(path, "memory.swap.max")):
                _write(os.path.join(path, "memory.swap.max"), "0")
        elif os.path.exists(os.path.join(path, "memory.limit_in_bytes")):  # v1; memsw must stay >= the limit
            _write(os.path.join(path, "memory.limit_in_bytes"), str(memory_bytes))
            if os.path.exists(os.path.join(path, "memory.memsw.limit_in_bytes")):
                _write(os.path.join(path, "memory.memsw.limit_in_bytes"), str(memory_bytes))
        if os.path.exists(os.path.join(path, "pids.max")):
            _write(os.path.join(path, "pids.max"), str(max_processes))

    def add(self, pid: int) -> None:
        """Move process ``pid`` (which has not started the run yet) into the run's cgroups."""
        for path in self.dirs:
            _write(os.path.join(path, "cgroup.procs"), str(pid))

    def memory_exhausted(self) -> bool:
        """Whether the kernel's OOM killer stopped a process of the run for exceeding the memory limit."""
        for path in self.dirs:
            for name in ("memory.events", "memory.oom_control"):  # v2, v1: both have an "oom_kill N" line
                for line in _read(os.path.join(path, name)).splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and value.strip() not in ("", "0"):
                        return True
        return False

    def processes_exhausted(self) -> bool:
        """Whether a fork of the run was refused because the process limit was reached."""
        return any(line.split()[:1] == ["max"] and line.split()[1:] != ["0"]
                   for path in self.dirs for line in _read(os.path.join(path, "pids.events")).splitlines())

    def pids(self) -> list[int]:
        return sorted({int(p) for path in self.dirs for p in _read(os.path.join(path, "cgroup.procs")).split()})

    def close(self) -> bool:
        """Kill the run's remaining processes and remove its cgroups; False if one could not be removed in time."""
        deadline = time.monotonic() + REMOVE_TIMEOUT_S
        while self.dirs:
            kill = os.path.join(self.dirs[0], "cgroup.kill")
            try:
                if os.path.exists(kill):
                    _write(kill, "1")
            except OSError:
                pass
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                os.rmdir(self.dirs[-1])
                self.dirs.pop()
            except OSError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.01)
        return True
