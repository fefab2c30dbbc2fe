"""Run untrusted Python code in a separate, resource-limited process.

Layers, each of which is enough to stop the common escapes on its own where the host allows it:

- resource limits set first thing in the child's interpreter (not in a ``preexec_fn``, which can deadlock when
  tool calls of several rollouts run in threads): ``RLIMIT_CPU`` (CPU seconds), ``RLIMIT_AS`` (address space),
  ``RLIMIT_FSIZE`` (largest file it may write, which also bounds stdout/stderr because they go to files) and
  ``RLIMIT_NPROC`` (process count);
- a wall-clock timeout that kills the child's whole process group (it starts in a new session);
- Linux namespaces via ``unshare --net --pid --fork --kill-child`` when the host permits it (probed once): no network
  interface but a downed loopback, and every process of the run dies with the namespace's init;
- when the parent runs as root, the child drops to ``nobody`` so ``RLIMIT_NPROC`` and file permissions apply
  (root ignores both), provided that user can run the interpreter;
- an audit hook (PEP 578) installed before the user code runs that refuses sockets, new processes, ``ctypes``,
  writes, renames and deletes outside the private working directory, and reads of other processes' ``/proc`` files;
- a private temporary working directory, deleted afterwards, and a scrubbed environment (only PATH, LANG, HOME,
  TMPDIR; nothing from the parent's environment).

The audit hook is a tripwire, not a security boundary: code that can corrupt interpreter memory can bypass it. The
namespaces, the unprivileged user and the resource limits are what hold against such code.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time

NOBODY = "nobody"
REFUSAL_MARKER = "PermissionError: sandbox:"
CPU_ACCOUNTING_SLACK_S = 0.1  # rusage can report slightly less CPU time than the kernel's limit check counted
UNSHARE_ARGS = ["--net", "--pid", "--fork", "--kill-child"]

# Runs in the child before the user's code: optional privilege drop, then the audit hook, then the code itself.
BOOTSTRAP = r'''
import os, sys, resource
root, uid, main = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cpu, memory, fsize, nproc = (int(x) for x in sys.argv[4:8])
for limit, value in ((resource.RLIMIT_CPU, (cpu, cpu)), (resource.RLIMIT_AS, (memory, memory)),
                     (resource.RLIMIT_FSIZE, (fsize, fsize)), (resource.RLIMIT_NPROC, (nproc, nproc)),
                     (resource.RLIMIT_CORE, (0, 0))):
    resource.setrlimit(limit, value)
if uid >= 0 and os.geteuid() == 0:
    try:
        os.setgroups([]); os.setgid(uid); os.setuid(uid)
    except OSError:
        pass
root = os.path.realpath(root)
own_proc = ("/proc/self/", "/proc/thread-self/", os.path.realpath("/proc/self") + "/")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.replace": (0, 1),
               "os.link": (0, 1), "os.symlink": (0, 1), "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,),
               "os.utime": (0,), "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.move": (1,)}
REFUSED = ("socket.", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "os.kill",
           "os.killpg", "subprocess.", "ctypes.", "pty.", "os.startfile", "sys.remote_exec")

def _resolve(path, dir_fd=None):
    if isinstance(path, int):
        return None
    path = os.fsdecode(path)
    if not os.path.isabs(path):
        base = os.readlink(f"/proc/self/fd/{dir_fd}") if isinstance(dir_fd, int) else os.getcwd()
        path = os.path.join(base, path)
    return os.path.realpath(path)

def _inside(path):
    return path is None or path == root or path.startswith(root + os.sep)

def _hook(event, args):
    if event.startswith(REFUSED):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path = _resolve(args[0])
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
        writes = bool(flags & WRITE_FLAGS) or any(c in mode for c in "wax+")
        if writes and not _inside(path):
            raise PermissionError(f"sandbox: writing {path} (outside the working directory) is not allowed")
        if path and path.startswith("/proc/") and not path.startswith(own_proc) and path.count("/") > 2:
            raise PermissionError(f"sandbox: reading {path} is not allowed")
    elif event in PATH_EVENTS:
        dir_fd = args[-1] if args and isinstance(args[-1], int) and event in ("os.remove", "os.rmdir") else None
        for i in PATH_EVENTS[event]:
            if i < len(args) and isinstance(args[i], (str, bytes, os.PathLike)) and not _inside(_resolve(args[i], dir_fd)):
                raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")

sys.addaudithook(_hook)
sys.argv = [main]
sys.path.insert(0, root)
with open(main, encoding="utf-8") as f:
    source = f.read()
namespace = {"__name__": "__main__", "__file__": main, "__builtins__": __builtins__}
try:
    exec(compile(source, main, "exec"), namespace)
except SystemExit:
    raise
except BaseException as exc:
    import traceback
    traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
'''


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one run. Units: seconds, megabytes, bytes, processes."""

    wall_seconds: float = 5.0
    cpu_seconds: int = 2
    memory_mb: int = 512
    file_size_bytes: int = 8 * 1024 * 1024
    max_processes: int = 32
    max_output_chars: int = 4000


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What a run produced. ``killed_reason`` is None for a normal exit, else why the process was stopped."""

    stdout: str
    stderr: str
    returncode: int
    timed_out: bool
    killed_reason: str | None
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed_reason is None

    @property
    def refused(self) -> bool:
        """Whether the audit hook refused an operation (the error may have been caught by the code)."""
        return REFUSAL_MARKER in self.stderr


@functools.cache
def namespace_prefix() -> tuple[str, ...]:
    """The ``unshare`` command prefix that works on this host, or () when namespaces are unavailable."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    candidates = [[exe, *UNSHARE_ARGS]]
    if os.geteuid() != 0:
        candidates.append([exe, "--user", "--map-root-user", *UNSHARE_ARGS])
    for prefix in candidates:
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, env=_child_env("/tmp"))
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return tuple(prefix)
    return ()


@functools.cache
def interpreter() -> tuple[str, int]:
    """The Python executable for the child and the uid to drop to (-1: keep ours).

    As root we drop to ``nobody``, so we need an interpreter that user can start: ours if it can, else the
    system's ``python3`` (a virtual environment under a private home directory often is not reachable).
    """
    if os.geteuid() != 0:
        return sys.executable, -1
    try:
        uid = pwd.getpwnam(NOBODY).pw_uid
    except KeyError:
        return sys.executable, -1
    candidates = [sys.executable, shutil.which("python3", path=_child_env("/tmp")["PATH"])]
    for exe in filter(None, candidates):
        try:
            probe = subprocess.run(
                [exe, "-I", "-S", "-c", "pass"], capture_output=True, timeout=10, env=_child_env("/tmp"),
                user=uid, group=uid, extra_groups=[],
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return exe, uid
    return sys.executable, -1


def _child_env(workdir: str) -> dict[str, str]:
    """A minimal environment built from scratch; nothing of the parent's is passed on."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
            "PYTHONIOENCODING": "utf-8"}


def _count_processes(uid: int) -> int:
    """Processes (threads included, as RLIMIT_NPROC counts them) that ``uid`` already runs."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                continue
    return count


def _killed_reason(returncode: int, timed_out: bool, cpu_exhausted: bool, stderr: str) -> str | None:
    if timed_out:
        return "timeout"
    if returncode == 0:
        return None
    if cpu_exhausted:
        return "cpu_limit"
    signum = -returncode if returncode < 0 else 0
    if signum == signal.SIGXFSZ:
        return "file_size_limit"
    if signum > 0:
        return f"signal {signal.Signals(signum).name}"
    if "MemoryError" in stderr:
        return "memory_limit"
    if "File too large" in stderr:
        return "file_size_limit"
    return None


def _read(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    text = data.decode("utf-8", errors="replace")
    return text if len(text) <= limit else text[:limit] + "\n...[truncated]"


def run_code(code: str, limits: SandboxLimits | None = None, stdin: str = "") -> SandboxResult:
    """Run ``code`` as a fresh Python program in the sandbox and return what it printed and how it ended."""
    limits = limits or SandboxLimits()
    exe, uid = interpreter()
    workdir = tempfile.mkdtemp(prefix="rlfw-sandbox-")
    try:
        main = os.path.join(workdir, "main.py")
        with open(main, "w", encoding="utf-8") as f:
            f.write(code)
        if uid >= 0:
            os.chown(workdir, uid, uid)
            os.chown(main, uid, uid)
        # The child writes its output to files bounded by RLIMIT_FSIZE, so a print flood cannot fill our memory.
        out_path, err_path = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")
        nproc = _count_processes(uid if uid >= 0 else os.getuid()) + limits.max_processes
        limit_args = [limits.cpu_seconds, limits.memory_mb * 1024 * 1024, limits.file_size_bytes, nproc]
        cmd = [*namespace_prefix(), exe, "-I", "-S", "-B", "-c", BOOTSTRAP, workdir, str(uid), main,
               *map(str, limit_args)]
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                cmd, cwd=workdir, env=_child_env(workdir), stdin=subprocess.PIPE, stdout=out, stderr=err,
                start_new_session=True, close_fds=True,
            )
            timed_out, cpu_time = _wait(proc, stdin, limits.wall_seconds)
        duration = time.monotonic() - start
        stderr = _read(err_path, limits.max_output_chars)
        return SandboxResult(
            stdout=_read(out_path, limits.max_output_chars), stderr=stderr, returncode=proc.returncode,
            timed_out=timed_out, killed_reason=_killed_reason(proc.returncode, timed_out, cpu_time >= limits.cpu_seconds - CPU_ACCOUNTING_SLACK_S, stderr),
            duration_s=duration,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _wait(proc: subprocess.Popen, stdin: str, wall_seconds: float) -> tuple[bool, float]:
    """Feed stdin and wait up to ``wall_seconds``, killing the whole process group on timeout.

    Returns (timed_out, CPU seconds used by the child and its reaped descendants). ``wait4`` is used instead of
    ``Popen.wait`` because its rusage tells a CPU-limit kill apart from other deaths, also through ``unshare``
    (which cannot always re-raise SIGXCPU) and also when several sandboxes run concurrently.
    """
    try:
        proc.stdin.write(stdin.encode())
        proc.stdin.close()
    except OSError:
        pass
    deadline = time.monotonic() + wall_seconds
    timed_out = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if not timed_out and time.monotonic() >= deadline:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session, so its group is ours alone
        time.sleep(0.005)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return timed_out, usage.ru_utime + usage.ru_stime
