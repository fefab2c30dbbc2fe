"""The parent's side of a sandbox run: read its output pipes and wait for it, all under one deadline.

Nothing here blocks: the pipes are non-blocking, process exits are seen through pidfds, and one ``select`` loop
waits for whichever comes first. Output beyond ``max_bytes`` in total stops the run; bytes beyond what the result
keeps are counted and dropped, so a flood costs neither memory nor time. After a kill, a short grace period lets the
kernel finish tearing the namespace down; then the parent gives up waiting rather than hang.
"""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable

CHUNK = 65536
KILL_GRACE_S = 2.0  # after a kill (or the program's exit), how long to wait for the pipes to close
TRUNCATED = "\n...[truncated]"


@dataclasses.dataclass
class Collected:
    """What the parent saw of one run. ``status`` is the wait status, None if the process could not be reaped."""

    stdout: str
    stderr: str
    status: int | None
    cpu_seconds: float
    timed_out: bool
    output_limit: bool


def _text(data: bytes, limit: int) -> str:
    text = data.decode("utf-8", errors="replace")
    return text if len(text) <= limit else text[:limit] + TRUNCATED


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:  # already gone
        return None


class _Watch:
    """The run's file descriptors in one selector: stdout, stderr, bwrap's info pipe and the process pidfds."""

    def __init__(self, proc: subprocess.Popen, out_fd: int, err_fd: int, info_fd: int | None, keep: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.keep = keep
        self.data = {out_fd: bytearray(), err_fd: bytearray()}
        self.total = 0
        self.info = bytearray()
        self.owned: list[int] = []
        for fd in (out_fd, err_fd, info_fd):
            if fd is not None:
                os.set_blocking(fd, False)
                self.selector.register(fd, selectors.EVENT_READ, "info" if fd == info_fd else "output")
        self.proc_fd = self._own(_pidfd(proc.pid))
        self.init_fd: int | None = None
        if self.proc_fd is not None:
            self.selector.register(self.proc_fd, selectors.EVENT_READ, "exit")

    def _own(self, fd: int | None) -> int | None:
        if fd is not None:
            self.owned.append(fd)
        return fd

    def pending_output(self) -> bool:
        return any(key.data in ("output", "info") for key in self.selector.get_map().values())

    def step(self, timeout: float) -> bool:
        """Handle what is ready within ``timeout``; True if the main process has exited."""
        exited = self.proc_fd is None
        for key, _ in self.selector.select(max(timeout, 0.0)):
            if key.data == "exit":
                self.selector.unregister(key.fd)
                self.proc_fd = None
                exited = True
            elif key.data == "init":
                self.selector.unregister(key.fd)
            else:
                self._read(key.fd, key.data)
        return exited or self.proc_fd is None

    def _read(self, fd: int, kind: str) -> None:
        try:
            chunk = os.read(fd, CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.selector.unregister(fd)
            if kind == "info":
                self._parse_info()
            return
        if kind == "info":
            self.info += chunk[:4096 - len(self.info)]
            return
        self.total += len(chunk)
        buffer = self.data[fd]
        buffer += chunk[:max(0, self.keep - len(buffer))]

    def _parse_info(self) -> None:
        try:
            pid = json.loads(bytes(self.info)).get("child-pid")
        except (ValueError, AttributeError):
            return
        if isinstance(pid, int) and pid > 0:  # host pid of the namespace's PID 1
            self.init_fd = self._own(_pidfd(pid))
            if self.init_fd is not None:
                self.selector.register(self.init_fd, selectors.EVENT_READ, "init")

    def init_alive(self) -> bool:
        return self.init_fd is not None and self.init_fd in self.selector.get_map()

    def close(self) -> None:
        self.selector.close()
        for fd in self.owned:
            os.close(fd)


def collect_output(proc: subprocess.Popen, out_fd: int, err_fd: int, info_fd: int | None, max_chars: int,
                   max_bytes: int, deadline: float, kill: Callable[[], None] | None = None) -> Collected:
    """Read the run's output until it has exited and its pipes are closed, killing it at ``deadline`` or when it
    writes more than ``max_bytes``. ``kill`` (default: SIGKILL to ``proc`` and to the namespace's PID 1) stops the
    run."""
    watch = _Watch(proc, out_fd, err_fd, info_fd, keep=max_chars * 4 + 4)  # UTF-8: at most 4 bytes a character
    timed_out = output_limit = False
    give_up_at: float | None = None

    def stop() -> None:
        (kill or (lambda: _kill(proc.pid, watch.init_fd)))()

    try:
        exited = False
        while True:
            now = time.monotonic()
            if exited and not watch.pending_output() and not watch.init_alive():
                break
            if give_up_at is not None and now >= give_up_at:
                break
            if give_up_at is None and (now >= deadline or watch.total > max_bytes):
                timed_out, output_limit = now >= deadline, watch.total > max_bytes
                stop()
                give_up_at = now + KILL_GRACE_S
            elif give_up_at is None and exited:
                give_up_at = now + KILL_GRACE_S  # exited: the kernel is closing what is left
            until = give_up_at if give_up_at is not None else deadline
            exited = watch.step(min(until - now, 0.5)) or exited
        if not exited:
            stop()
        status, cpu = _reap(proc, wait=not watch.pending_output())
        out, err = (bytes(watch.data[fd]) for fd in (out_fd, err_fd))
        return Collected(_text(out, max_chars), _text(err, max_chars), status, cpu, timed_out, output_limit)
    finally:
        watch.close()


def _kill(pid: int, init_fd: int | None) -> None:
    """SIGKILL bwrap's PID 1 (through its pidfd: its pid may have been reused once it was reaped) and bwrap, our
    unreaped child; PID 1's death kills the rest of the namespace."""
    try:
        if init_fd is not None:
            signal.pidfd_send_signal(init_fd, signal.SIGKILL)
    except OSError:
        pass
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _reap(proc: subprocess.Popen, wait: bool) -> tuple[int | None, float]:
    """(wait status, CPU seconds of the process and its reaped descendants); (None, 0) if it will not die."""
    deadline = time.monotonic() + (KILL_GRACE_S if wait else 0.2)
    while True:
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:
            return None, 0.0
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return status, usage.ru_utime + usage.ru_stime
        if time.monotonic() >= deadline:
            return None, 0.0
        time.sleep(0.002)
