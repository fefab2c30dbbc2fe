"""Run untrusted Python code in a bubblewrap sandbox: a program's own kernel namespaces, limits and identity.

Every program is treated as hostile. Per run, ``bwrap`` (bubblewrap) starts the interpreter with:

- new mount, PID, IPC, UTS, network, user and cgroup namespaces (``--unshare-all``); no further user namespaces
  inside (``--disable-userns``); ``--die-with-parent`` and ``--new-session`` (no terminal to inject input into);
- a root that is an empty read-only tmpfs holding read-only binds of ``/usr`` (and the interpreter's prefix when it
  lives elsewhere) and nothing else of the host: no ``/tmp``, ``/dev/shm``, ``/home``, ``/etc``, sockets; a fresh
  ``/proc`` of its own PID namespace, a minimal ``/dev``, and a private size-limited tmpfs as working directory
  (``/sandbox``, also ``/tmp``), so its files vanish with its mount namespace;
- an environment cleared and rebuilt from an allow-list (PATH, HOME, TMPDIR, LANG, PYTHONIOENCODING);
- a distinct unprivileged uid per run: when the parent is root, bwrap itself runs as a uid drawn from a pool no
  account uses, so even the kernel's view of the run is unprivileged; otherwise the parent's uid, mapped to that
  per-run uid inside;
- ``setrlimit`` for CPU seconds, address space, file size, open files and processes, set by a small bootstrap
  before the program runs; and where the host allows it a cgroup (``envs._cgroup``) bounding the memory and
  process count of all of the run's processes together;
- a seccomp filter (``envs._seccomp``) refusing the system calls that widen the kernel's attack surface or would
  let the program trace the sandbox's PID 1.

The parent never touches the run's filesystem: the program goes in through a memfd, stdout/stderr come back through
pipes it holds, read without blocking up to a byte cap and a wall-clock deadline, after which the run is killed.
When bwrap's PID 1 dies, the kernel kills every process of the namespace, so nothing of a run outlives it. A failure
on the parent's side becomes ``SandboxResult.error``, never an exception.

Without bwrap, or where it cannot create namespaces, :func:`check_sandbox` raises :class:`SandboxUnavailable` naming
the fix. ``RLFW_UNSAFE_NO_SANDBOX=1`` runs code without isolation (trusted code only), loudly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from envs import _cgroup, _seccomp
from envs._supervise import Collected, collect_output

UNSAFE_ENV = "RLFW_UNSAFE_NO_SANDBOX"
CPU_ACCOUNTING_SLACK_S = 0.1  # rusage can report slightly less CPU time than the kernel's limit check counted
MEMORY_ERROR_EXIT = 247  # the bootstrap's exit status for an uncaught MemoryError
FILE_SIZE_EXIT = 246  # ... and for an uncaught OSError EFBIG (Python ignores SIGXFSZ)
SIGNAL_EXIT_BASE = 128  # the bootstrap's PID 1 exits 128 + N when the program is killed by signal N
SANDBOX_PROCESSES = 2  # bwrap's monitor and the bootstrap's PID 1, counted by the cgroup's process limit
UID_POOL = (1_500_000_000, 1_000_000)  # (first uid, size): far above any account or subordinate-uid range
WORKDIR = "/sandbox"
INTERPRETERS = ("/usr/bin/python3", "/usr/local/bin/python3")  # tried after our own base interpreter
CHILD_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORKDIR, "TMPDIR": WORKDIR, "LANG": "C.UTF-8",
             "PYTHONIOENCODING": "utf-8"}
# Waits for the parent to move it into the run's cgroup (a line on its stdin), then becomes bwrap.
CGROUP_GATE = 'read -r _ && exec "$@"'

# Runs in the sandbox before the program (see the file); passed as text, so it needs nothing on the sandbox's path.
BOOTSTRAP = (Path(__file__).parent / "_bootstrap.py").read_text()


class SandboxUnavailable(RuntimeError):
    """This host cannot run the sandbox; the message says what to install or change."""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one run. Units: seconds, megabytes, bytes, processes, characters."""

    wall_seconds: float = 5.0
    cpu_seconds: int = 2
    memory_mb: int = 512  # per process (address space) and, with a cgroup, for all of the run's processes together
    file_size_bytes: int = 8 * 1024 * 1024
    max_processes: int = 32
    max_open_files: int = 256
    disk_mb: int = 64  # the private working directory's tmpfs
    max_output_bytes: int = 1024 * 1024  # stdout + stderr; the run is stopped when it writes more
    max_output_chars: int = 4000  # per stream, in the result


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What a run produced. ``killed_reason`` is None for a normal exit, else why the process was stopped.

    ``error`` is set when the sandbox itself failed (the run says nothing about the code): score it as unscorable.
    """

    stdout: str
    stderr: str
    returncode: int
    timed_out: bool
    killed_reason: str | None
    duration_s: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed_reason is None and self.error is None


@dataclasses.dataclass(frozen=True)
class Backend:
    """How this host runs the sandbox: bwrap's path and the interpreter inside (bwrap None: unsafe mode)."""

    bwrap: str | None
    python: str
    cgroups: bool


class _UidPool:
    """Distinct uids for concurrent runs of this process, drawn at random so that other processes rarely collide."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used: set[int] = set()

    def take(self) -> int:
        with self._lock:
            while True:
                uid = UID_POOL[0] + random.randrange(UID_POOL[1])
                if uid not in self._used:
                    self._used.add(uid)
                    return uid

    def give_back(self, uid: int) -> None:
        with self._lock:
            self._used.discard(uid)


_uids = _UidPool()
_backend_lock = threading.Lock()


def _bind_args(python: str) -> list[str]:
    """Read-only binds of what the interpreter needs: /usr, the merged-/usr links, and its prefix if elsewhere."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64"):
        path = f"/{name}"
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(python)))
    if prefix != "/" and not (prefix + "/").startswith("/usr/"):
        args += ["--ro-bind", prefix, prefix]
    return args


def _bwrap_command(backend: Backend, uid: int, limits: SandboxLimits, code_fd: int, info_fd: int,
                   stdin_fd: int, seccomp_fd: int | None) -> list[str]:
    env = [arg for key, value in CHILD_ENV.items() for arg in ("--setenv", key, value)]
    rlimits = [limits.cpu_seconds, limits.memory_mb * 1024 * 1024, limits.file_size_bytes, limits.max_open_files,
               limits.max_processes, MEMORY_ERROR_EXIT, FILE_SIZE_EXIT, stdin_fd]
    return [
        backend.bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
        "--as-pid-1",
        "--uid", str(uid), "--gid", str(uid), "--hostname", "sandbox", "--clearenv", *env,
        *_bind_args(backend.python), "--proc", "/proc", "--dev", "/dev",
        "--size", str(limits.disk_mb * 1024 * 1024), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
        "--size", str(limits.disk_mb * 1024 * 1024), "--tmpfs", WORKDIR, "--symlink", WORKDIR, "/tmp",
        "--file", str(code_fd), f"{WORKDIR}/main.py", "--chdir", WORKDIR, "--remount-ro", "/",
        "--info-fd", str(info_fd), *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),
        "--", backend.python, "-I", "-S", "-B", "-c", BOOTSTRAP, *map(str, rlimits),
    ]


def _unsafe_command(backend: Backend, limits: SandboxLimits) -> list[str]:
    # RLIMIT_NPROC counts all of this user's processes here, so the run keeps the parent's limit.
    rlimits = [limits.cpu_seconds, limits.memory_mb * 1024 * 1024, limits.file_size_bytes, limits.max_open_files,
               resource.getrlimit(resource.RLIMIT_NPROC)[0], MEMORY_ERROR_EXIT, FILE_SIZE_EXIT, -1]
    return [backend.python, "-I", "-S", "-B", "-c", BOOTSTRAP, *map(str, rlimits)]


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _probe(backend: Backend) -> str | None:
    """None if ``backend`` runs a program and returns its output, else what went wrong."""
    result = _run(backend, "print(6 * 7)", SandboxLimits(wall_seconds=20, cpu_seconds=5), "")
    if result.stdout == "42\n" and result.ok:
        return None
    return (result.error or result.stderr or f"exit status {result.returncode}").strip()[-500:]


@functools.cache
def _find_backend() -> Backend:
    if os.environ.get(UNSAFE_ENV) == "1":
        warnings.warn(f"{UNSAFE_ENV}=1: model-written code runs WITHOUT a sandbox, as this user, with this machine's "
                      "files and network. Use only with trusted code.", RuntimeWarning, stacklevel=3)
        print(f"WARNING: {UNSAFE_ENV}=1, code runs unsandboxed", file=sys.stderr)
        return Backend(None, sys.executable, False)
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(
            "envs.sandbox needs bubblewrap to run model-written code: install it (Debian/Ubuntu: "
            "`apt-get install bubblewrap`; Fedora: `dnf install bubblewrap`), or, for trusted code only, set "
            f"{UNSAFE_ENV}=1.")
    cgroups = bool(_cgroup.parents())
    candidates = [os.path.realpath(getattr(sys, "_base_executable", sys.executable)), *INTERPRETERS]
    errors = []
    for python in dict.fromkeys(p for p in candidates if os.path.exists(p)):
        backend = Backend(bwrap, python, cgroups)
        error = _probe(backend)
        if error is None:
            return backend
        errors.append(f"{python}: {error}")
    raise SandboxUnavailable(
        "bubblewrap cannot start a sandbox here:\n  " + "\n  ".join(errors) + "\nIt needs unprivileged user "
        "namespaces (sysctl kernel.unprivileged_userns_clone=1; on Ubuntu 24.04+ also "
        "kernel.apparmor_restrict_unprivileged_userns=0; in Docker run with --security-opt seccomp=unconfined "
        "--security-opt apparmor=unconfined --security-opt systempaths=unconfined) and a Python interpreter "
        f"that any user can read (as root: one of {', '.join(INTERPRETERS)}). For trusted code only, set "
        f"{UNSAFE_ENV}=1.")


def check_sandbox() -> Backend:
    """The sandbox this host provides, probed once; raises :class:`SandboxUnavailable` with the fix if none."""
    with _backend_lock:
        return _find_backend()


def run_code(code: str, limits: SandboxLimits | None = None, stdin: str = "") -> SandboxResult:
    """Run ``code`` as a fresh Python program in the sandbox and return what it printed and how it ended."""
    return _run(check_sandbox(), code, limits or SandboxLimits(), stdin)


def _run(backend: Backend, code: str, limits: SandboxLimits, stdin: str) -> SandboxResult:
    start = time.monotonic()
    try:
        if backend.bwrap is None:
            return _run_unsafe(backend, code, limits, stdin, start)
        return _run_bwrap(backend, code, limits, stdin, start)
    except Exception as err:  # noqa: BLE001 - a failing sandbox must not stop training; the caller scores it None
        return SandboxResult("", "", -1, False, None, time.monotonic() - start,
                             error=f"sandbox failed: {type(err).__name__}: {err}")


def _run_bwrap(backend: Backend, code: str, limits: SandboxLimits, stdin: str, start: float) -> SandboxResult:
    uid = _uids.take()  # inside the run; outside too when we are root (otherwise bwrap maps it to our uid)
    fds: list[int] = []
    cgroup = proc = None
    try:
        code_fd = _memfd("main.py", code.encode("utf-8", "surrogatepass"))
        stdin_fd = _memfd("stdin", stdin.encode("utf-8", "surrogatepass"))
        fds += [code_fd, stdin_fd]
        info_r, info_w = os.pipe()
        fds += [info_r, info_w]
        program = _seccomp.filter_program()
        seccomp_fd = _memfd("seccomp", program) if program else None
        fds += [seccomp_fd] if seccomp_fd is not None else []
        cmd = _bwrap_command(backend, uid, limits, code_fd, info_w, stdin_fd, seccomp_fd)
        gate = subprocess.DEVNULL
        if backend.cgroups:
            cgroup = _cgroup.RunCgroup(limits.memory_mb * 1024 * 1024, limits.max_processes + SANDBOX_PROCESSES)
            gate, gate_w = os.pipe()
            fds += [gate, gate_w]
            cmd = ["/bin/sh", "-c", CGROUP_GATE, "sh", *cmd]
        passed = [fd for fd in (code_fd, info_w, stdin_fd, seccomp_fd) if fd is not None]
        proc, out_r, err_r = _spawn(cmd, gate, passed, uid if os.geteuid() == 0 else None, None)
        fds += [out_r, err_r]
        if cgroup is not None:
            cgroup.add(proc.pid)
            os.write(gate_w, b"go\n")
        os.close(info_w)
        fds.remove(info_w)
        seen = collect_output(proc, out_r, err_r, info_r, limits.max_output_chars, limits.max_output_bytes,
                              start + limits.wall_seconds)
        return _result(seen, limits, cgroup is not None and cgroup.memory_exhausted(), start)
    finally:
        _cleanup(proc, fds)
        if cgroup is not None:
            cgroup.close()
        _uids.give_back(uid)


def _run_unsafe(backend: Backend, code: str, limits: SandboxLimits, stdin: str, start: float) -> SandboxResult:
    """No isolation (``RLFW_UNSAFE_NO_SANDBOX=1``): the same limits, pipes and deadline, in a temporary directory."""
    fds: list[int] = []
    proc = None
    workdir = tempfile.mkdtemp(prefix="rlfw-unsafe-")
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(code)
        stdin_fd = _memfd("stdin", stdin.encode("utf-8", "surrogatepass"))
        fds.append(stdin_fd)
        proc, out_r, err_r = _spawn(_unsafe_command(backend, limits), stdin_fd, [], None, workdir)
        fds += [out_r, err_r]

        def kill() -> None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass

        seen = collect_output(proc, out_r, err_r, None, limits.max_output_chars, limits.max_output_bytes,
                              start + limits.wall_seconds, kill)
        kill()  # the rest of its session
        return _result(seen, limits, False, start)
    finally:
        _cleanup(proc, fds)
        shutil.rmtree(workdir, ignore_errors=True)


def _spawn(cmd: list[str], stdin_fd: int | None, pass_fds: list[int], uid: int | None,
           cwd: str | None) -> tuple[subprocess.Popen, int, int]:
    """Start ``cmd`` (as ``uid`` if given) with stdin from ``stdin_fd`` and stdout/stderr into pipes we read."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    identity = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
    try:
        proc = subprocess.Popen(cmd, stdin=stdin_fd, stdout=out_w, stderr=err_w, pass_fds=pass_fds, cwd=cwd,
                                env=dict(CHILD_ENV, HOME="/", TMPDIR="/tmp") if cwd is None else
                                dict(CHILD_ENV, HOME=cwd, TMPDIR=cwd),
                                start_new_session=True, close_fds=True, **identity)
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    return proc, out_r, err_r


def _cleanup(proc: subprocess.Popen | None, fds: list[int]) -> None:
    if proc is not None and proc.returncode is None:
        try:
            proc.kill()
        except OSError:
            pass
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _result(seen: Collected, limits: SandboxLimits, memory_exhausted: bool, start: float) -> SandboxResult:
    if seen.status is None:
        return SandboxResult(seen.stdout, seen.stderr, -1, seen.timed_out, "timeout" if seen.timed_out else None,
                             time.monotonic() - start, error="sandbox failed: the run could not be reaped")
    code = os.waitstatus_to_exitcode(seen.status)
    if SIGNAL_EXIT_BASE < code < SIGNAL_EXIT_BASE + signal.NSIG:
        code = SIGNAL_EXIT_BASE - code  # death by signal N, as reported by the bootstrap's PID 1
    # SIGXCPU at the soft CPU limit; SIGKILL at the hard one (a second later) if the program ignored it.
    cpu_exhausted = (code == -signal.SIGXCPU or seen.cpu_seconds >= limits.cpu_seconds - CPU_ACCOUNTING_SLACK_S
                     or (code == -signal.SIGKILL and time.monotonic() - start >= limits.cpu_seconds))
    return SandboxResult(seen.stdout, seen.stderr, code, seen.timed_out,
                         _killed_reason(code, seen, cpu_exhausted, memory_exhausted), time.monotonic() - start)


def _killed_reason(code: int, seen: Collected, cpu_exhausted: bool, memory_exhausted: bool) -> str | None:
    """Why the run was stopped, from what the parent itself observed (exit status, rusage, cgroup, deadline)."""
    if seen.timed_out:
        return "timeout"
    if seen.output_limit:
        return "output_limit"
    if code == 0:
        return None
    if memory_exhausted or code == MEMORY_ERROR_EXIT:
        return "memory_limit"
    if cpu_exhausted:
        return "cpu_limit"
    if code in (-signal.SIGXFSZ, FILE_SIZE_EXIT):
        return "file_size_limit"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return None
