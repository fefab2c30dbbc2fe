"""Hostile programs against the sandbox: every attack asserts containment by evidence on the host side.

Evidence: a canary path the program tries to create must not exist, a secret set in the parent's environment or
files must not appear in any output, no process of the run may be left in the host's process table, and the parent
returns within its deadline. Attacks follow what a model's code can do with the standard library alone.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
import uuid

import pytest

from envs import _cgroup, _seccomp
from envs.sandbox import SandboxLimits, check_sandbox, run_code

FAST = SandboxLimits(wall_seconds=3.0, cpu_seconds=1, memory_mb=256)
SECRET = "rlfw-canary-" + uuid.uuid4().hex
DEADLINE_SLACK_S = 3.0  # kill grace and teardown on a loaded 2-core machine


@pytest.fixture(autouse=True)
def secret_in_parent(monkeypatch):
    """A secret in the parent's environment (like an API key) that no program may ever see."""
    monkeypatch.setenv("RLFW_TEST_API_KEY", SECRET)


@pytest.fixture
def open_dir():
    """A host directory any uid may write to and traverse (like /tmp): only the sandbox can keep a program out."""
    path = tempfile.mkdtemp(prefix="rlfw-open-", dir="/tmp")
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def leaked(result) -> bool:
    return SECRET in result.stdout or SECRET in result.stderr


def host_processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def timed(code: str, limits: SandboxLimits = FAST, stdin: str = ""):
    start = time.monotonic()
    result = run_code(code, limits, stdin=stdin)
    elapsed = time.monotonic() - start
    assert elapsed < limits.wall_seconds + DEADLINE_SLACK_S, (elapsed, result)
    assert result.error is None, result
    return result


# ---- secrets and host files ----

READ_EVERYTHING = """
import glob, os
paths = ["/proc/self/environ", "/proc/1/environ", "/etc/shadow", "/etc/passwd", "/root/.bashrc", {secret_file!r}]
paths += glob.glob("/proc/*/environ") + glob.glob("/proc/*/cmdline")
for p in paths:
    try:
        print(p, open(p, "rb").read())
    except OSError as e:
        print(p, "denied", e)
print(dict(os.environ))
"""


def test_parent_environment_and_host_files_never_reach_the_output(open_dir):
    secret_file = os.path.join(open_dir, "secret.txt")
    with open(secret_file, "w") as f:
        f.write(SECRET)
    os.chmod(secret_file, 0o644)  # readable by any local user: only the sandbox's view of the filesystem hides it
    result = timed(READ_EVERYTHING.format(secret_file=str(secret_file)))
    assert not leaked(result) and "RLFW_TEST_API_KEY" not in result.stdout
    shadow = open("/etc/shadow").read().split(":")[1] if os.path.exists("/etc/shadow") else None
    if shadow and len(shadow) > 3:
        assert shadow not in result.stdout


@pytest.mark.parametrize("target", ["/proc/self/environ", "/etc/shadow", "/proc/1/environ"])
def test_replacing_output_files_with_symlinks_leaks_nothing(target):
    # The parent once re-read .stdout/.stderr by path; a program swapped them for symlinks to the parent's secrets.
    code = (f"import os\nfor name in ('.stdout', '.stderr', 'out', 'err'):\n"
            f"    try:\n        os.remove(name)\n    except OSError:\n        pass\n"
            f"    os.symlink({target!r}, name)\nprint('done')")
    result = timed(code)
    assert result.stdout == "done\n" and not leaked(result)


def test_fifo_and_directory_in_place_of_outputs_do_not_hang_the_parent():
    code = ("import os\nfor name in ('.stdout', '.stderr', 'main.py.out'):\n"
            "    try:\n        os.mkfifo(name)\n    except OSError:\n        os.mkdir(name)\n"
            "os.mkdir('.stdin')\nos.remove('main.py')\nos.mkfifo('main.py')\nprint('planted')")
    result = timed(code)
    assert result.ok and result.stdout == "planted\n"


# ---- the parent's pipes and deadline ----

def test_child_holding_the_output_pipe_does_not_hold_the_parent():
    # The main process exits at once; a detached grandchild keeps stdout/stderr open and sleeps.
    marker = "hold-" + uuid.uuid4().hex
    code = ("import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execv('/bin/sleep', ['sleep', '30', {marker!r}])\n    os._exit(0)\nprint('bye')")
    start = time.monotonic()
    result = timed(code)
    assert result.stdout == "bye\n" and time.monotonic() - start < 2.5
    assert host_processes_with(marker) == []


def test_closed_outputs_and_a_busy_loop_meet_the_deadline():
    code = "import os\nos.close(1)\nos.close(2)\nimport time\nwhile True:\n    time.sleep(0.01)"
    result = timed(code, SandboxLimits(wall_seconds=1.0, cpu_seconds=1))
    assert result.killed_reason == "timeout"


def test_floods_on_both_streams_and_binary_garbage_are_capped():
    code = ("import os\nwhile True:\n    os.write(1, os.urandom(65536))\n    os.write(2, b'\\xff\\xfe' * 30000)")
    result = timed(code, SandboxLimits(wall_seconds=3, cpu_seconds=2, max_output_chars=300))
    assert result.killed_reason == "output_limit"
    assert len(result.stdout) < 400 and len(result.stderr) < 400


def test_one_huge_line_without_newline_is_capped():
    result = timed("import sys\nsys.stdout.write('y' * 50_000_000)", SandboxLimits(wall_seconds=5, cpu_seconds=2,
                                                                                  max_output_chars=100))
    assert not result.ok and len(result.stdout) < 200


def test_invalid_text_in_the_program_and_its_output_does_not_raise():
    result = timed("print('\\udcff', '\\x00')\nimport sys\nsys.stdout.buffer.write(b'\\xc3\\x28\\n')")
    assert result.error is None
    assert run_code("\x00\udcff = 1", FAST).error is None


def test_programs_that_kill_everything_they_see_leave_the_parent_working():
    for code in ("import os, signal\nos.kill(-1, signal.SIGKILL)", "import os, signal\nos.kill(1, signal.SIGKILL)",
                 "import os, signal\nos.killpg(0, signal.SIGKILL)", "import os\nos.kill(os.getppid(), 9)"):
        result = timed(code)
        assert result.error is None, (code, result)


# ---- nothing survives a run ----

DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        import signal
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        os.execv(sys.executable, [sys.executable, "-c", "import time\\nwhile True: time.sleep(0.05)", {marker!r}])
    os._exit(0)
time.sleep(0.3)
print("daemon started", flush=True)
"""


@pytest.mark.parametrize("ending", ["exit", "timeout"])
def test_setsid_double_fork_daemon_dies_with_the_run(ending):
    marker = "daemon-" + uuid.uuid4().hex
    code = DAEMON.format(marker=marker) + ("\ntime.sleep(30)" if ending == "timeout" else "")
    result = timed(code, SandboxLimits(wall_seconds=2.0, cpu_seconds=1))
    assert "daemon started" in result.stdout
    assert result.timed_out == (ending == "timeout")
    assert host_processes_with(marker) == [], "a process of the run outlived it"


def test_no_process_of_a_root_run_uid_remains():
    if os.geteuid() != 0:
        pytest.skip("per-run uids are drawn only when the parent is root")
    marker = "uid-" + uuid.uuid4().hex
    result = timed(DAEMON.format(marker=marker) + "\nimport os\nprint(os.getuid())")
    uid = int(result.stdout.split()[-1])
    assert uid != 0
    owned = [e for e in os.listdir("/proc") if e.isdigit() and _uid_of(e) == uid]
    assert owned == []


def _uid_of(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def test_runs_share_no_files_or_state():
    plant = ("import os\nfor d in ('.', '/tmp', '/dev/shm', os.path.expanduser('~')):\n"
             "    try:\n        open(os.path.join(d, 'planted'), 'w').write('x')\n        print('wrote', d)\n"
             "    except OSError as e:\n        print('refused', d, e)\n")
    assert "wrote" in timed(plant).stdout
    look = ("import os\nprint([d for d in ('.', '/tmp', '/dev/shm', os.path.expanduser('~')) "
            "if os.path.exists(os.path.join(d, 'planted'))])")
    assert timed(look).stdout == "[]\n"


def test_two_concurrent_runs_cannot_reach_each_other():
    # Run A listens on an abstract unix socket and a file in /dev/shm; run B, at the same time, looks for both.
    name = "rlfw-" + uuid.uuid4().hex
    listener = (f"import socket, time\ns = socket.socket(socket.AF_UNIX)\ns.bind('\\0{name}')\ns.listen(1)\n"
                f"open('/dev/shm/{name}', 'w').write('x')\nprint('listening', flush=True)\ntime.sleep(2.5)")
    prober = (f"import os, socket, time\ntime.sleep(0.8)\ns = socket.socket(socket.AF_UNIX)\n"
              f"try:\n    s.connect('\\0{name}')\n    print('CONNECTED')\nexcept OSError as e:\n    print('no', e)\n"
              f"print(os.path.exists('/dev/shm/{name}'), len([p for p in os.listdir('/proc') if p.isdigit()]))")
    results = {}
    threads = [threading.Thread(target=lambda k=k, c=c: results.__setitem__(k, run_code(c, FAST)))
               for k, c in (("a", listener), ("b", prober))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "listening" in results["a"].stdout
    out = results["b"].stdout.split()
    assert "CONNECTED" not in out and out[-2] == "False" and int(out[-1]) <= 3


# ---- the host's filesystem, sockets and network ----

ESCAPES = {
    "open": "open(CANARY, 'w').write('x')",
    "dir_fd": "import os\nfd = os.open(os.path.dirname(CANARY), os.O_RDONLY)\n"
              "os.close(os.open(os.path.basename(CANARY), os.O_WRONLY | os.O_CREAT, dir_fd=fd))",
    "sqlite3": "import sqlite3\nsqlite3.connect(CANARY).execute('create table t (x)')",
    "mknod": "import os, stat\nos.mknod(CANARY, stat.S_IFREG | 0o644)",
    "mkfifo": "import os\nos.mkfifo(CANARY)",
    "_posixsubprocess": "import os\nfrom multiprocessing.util import spawnv_passfds\n"
                        "os.waitpid(spawnv_passfds(b'/bin/sh', ['/bin/sh', '-c', 'echo x > ' + CANARY], []), 0)",
    "subprocess": "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'echo x > ' + CANARY])",
    "multiprocessing_spawn": "import multiprocessing as mp\nif __name__ == '__main__':\n"
                             "    ctx = mp.get_context('spawn')\n    p = ctx.Process(target=open, args=(CANARY, 'w'))\n"
                             "    p.start()\n    p.join()",
    "subinterpreter": "import _xxsubinterpreters as s\ni = s.create()\n"
                      "s.run_string(i, f'open({CANARY!r}, \"w\").write(\"x\")')",
    "ctypes": "import ctypes\nlibc = ctypes.CDLL(None)\nlibc.creat(CANARY.encode(), 0o644)",
    "symlink_then_write": "import os\nos.symlink(CANARY, 'link')\nopen('link', 'w').write('x')",
    "hardlink": "import os\nos.link('main.py', CANARY)",
    "os_system": "import os\nos.system('touch ' + CANARY)",
}


@pytest.mark.parametrize("attack", sorted(ESCAPES))
def test_no_way_to_write_to_the_host(open_dir, attack):
    canary = os.path.join(open_dir, "canary")
    result = timed(f"CANARY = {canary!r}\n" + ESCAPES[attack])
    assert not os.path.lexists(canary), (attack, result)
    assert os.listdir(open_dir) == []


def test_host_unix_socket_is_unreachable(open_dir):
    path = os.path.join(open_dir, "host.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        os.chmod(path, 0o777)  # like a daemon's socket that any local user may use
        server.listen(1)
        server.settimeout(0.2)
        code = f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({path!r})\ns.sendall(b'leak')"
        result = timed(code)
        assert not result.ok
        with pytest.raises(TimeoutError):
            server.accept()


def test_no_network_interfaces_and_no_dns():
    code = ("import socket\nprint(socket.if_nameindex())\n"
            "try:\n    socket.getaddrinfo('pypi.org', 443)\n    print('RESOLVED')\nexcept OSError as e:\n    print('no dns')\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "try:\n    s.sendto(b'x', ('1.1.1.1', 53))\n    print('SENT')\nexcept OSError:\n    print('no route')")
    result = timed(code)
    assert "RESOLVED" not in result.stdout and "SENT" not in result.stdout and "no route" in result.stdout


def test_no_privilege_to_gain():
    code = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
print("unshare user", libc.unshare(CLONE_NEWUSER), "unshare mount", libc.unshare(CLONE_NEWNS))
try:
    os.setuid(0)
    print("SETUID OK")
except OSError:
    print("no setuid")
print("uid", os.getuid(), "caps", open("/proc/self/status").read().split("CapEff:")[1].split()[0])
print("suid binaries", [p for p in ("/usr/bin/su", "/usr/bin/sudo", "/usr/bin/mount") if os.path.exists(p)])
import subprocess
print(subprocess.run(["/usr/bin/su", "-c", "id"], capture_output=True, text=True, input="").returncode)
"""
    result = timed(code)
    assert "unshare user -1 unshare mount -1" in result.stdout
    assert "SETUID OK" not in result.stdout and "caps 0000000000000000" in result.stdout
    assert "uid 0 " not in result.stdout


def test_kernel_attack_surface_and_tracing_pid_1_are_refused():
    if _seccomp.filter_program() is None:
        pytest.skip("no seccomp filter for this architecture")
    names = ("ptrace", "keyctl", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "mount", "setns")
    numbers = _seccomp.ARCHES[os.uname().machine][1]
    code = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nPTRACE_ATTACH = 16\n"
            "print('ptrace-pid1', libc.ptrace(PTRACE_ATTACH, 1, 0, 0), ctypes.get_errno())\n"
            + "".join(f"print({name!r}, libc.syscall({numbers[name]}, 0, 0, 0, 0, 0), ctypes.get_errno())\n"
                      for name in names))
    result = timed(code)
    lines = result.stdout.splitlines()
    assert len(lines) == len(names) + 1 and all(line.endswith(" -1 1") for line in lines), result  # EPERM


# ---- resources beyond one process ----

def test_disk_is_bounded():
    code = ("import os\nn = 0\ntry:\n    with open('big', 'wb') as f:\n        for _ in range(1000):\n"
            "            f.write(b'x' * 1024 * 1024)\n            n += 1\nexcept OSError as e:\n    print('stopped', e.errno)\n"
            "print(n)")
    limits = SandboxLimits(wall_seconds=5, cpu_seconds=3, disk_mb=16, file_size_bytes=512 * 1024 * 1024)
    result = timed(code, limits)
    assert int(result.stdout.split()[-1]) <= 16


def test_aggregate_memory_is_bounded_by_the_cgroup():
    if not check_sandbox().cgroups:
        pytest.skip("no cgroup on this host: memory is limited per process only (documented)")
    # Four processes each touch 150 MB under a 256 MB limit and keep it for 2 s: no two may keep it at the same time.
    # A process can report "held" and then be the one the OOM killer picks when a second one allocates, so what
    # counts is "kept": 150 MB held through the whole 2 s. Started through _posixsubprocess, which no audit hook sees.
    code = """
import os, sys
from multiprocessing.util import spawnv_passfds
hold = ("import time\\nblock = bytearray(150 * 1024 * 1024)\\nfor j in range(0, len(block), 4096):\\n"
        "    block[j] = 1\\nprint('held', flush=True)\\ntime.sleep(2)\\nprint('kept', flush=True)")
kids = [spawnv_passfds(os.fsencode(sys.executable), [sys.executable, "-c", hold], []) for _ in range(4)]
for pid in kids:
    os.waitpid(pid, 0)
"""
    result = timed(code, SandboxLimits(wall_seconds=5, cpu_seconds=3, memory_mb=256))
    assert result.stdout.count("kept") <= 1 and result.stdout.count("held") >= 1, result


def test_aggregate_process_count_is_bounded():
    code = """
import os, time
n = 0
try:
    for _ in range(500):
        if os.fork() == 0:
            time.sleep(3)
            os._exit(0)
        n += 1
except OSError:
    pass
print(n)
"""
    result = timed(code, SandboxLimits(wall_seconds=2, cpu_seconds=1, max_processes=16))
    assert int(result.stdout.split()[-1]) <= 16


# ---- exit statuses the parent reports ----

def test_exit_status_256_is_not_success():
    result = timed("import sys\nsys.exit(256)")
    assert not result.ok and result.returncode != 0


def test_printing_memoryerror_is_not_a_memory_kill():
    result = timed("import sys\nprint('MemoryError')\nprint('MemoryError', file=sys.stderr)\nsys.exit(1)")
    assert result.killed_reason is None and result.returncode == 1


def test_self_raised_sigsegv_is_reported():
    result = timed("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\nprint('survived')")
    assert "survived" not in result.stdout
    assert not result.ok and result.killed_reason == "signal SIGSEGV"


def test_relative_paths_in_the_working_directory_work():
    result = timed("import os\nopen('a.txt', 'w').write('x')\nos.rename('a.txt', 'b.txt')\nos.remove('b.txt')\n"
                   "os.mkdir('d')\nos.rmdir('d')\nprint(os.listdir('.'))")
    assert result.ok and result.stdout == "['main.py']\n"


# ---- the parent stays responsive ----

def test_parent_stays_responsive_during_hostile_runs():
    hostile = ["while True: pass", "import os\nwhile True: os.fork()", "import time\ntime.sleep(60)",
               "while True: print('x' * 10000)"]
    threads = [threading.Thread(target=run_code, args=(code, FAST)) for code in hostile]
    for t in threads:
        t.start()
    start = time.monotonic()
    result = run_code("print('still here')", FAST)
    assert result.ok and result.stdout == "still here\n"
    assert time.monotonic() - start < 2.5
    for t in threads:
        t.join(FAST.wall_seconds + DEADLINE_SLACK_S)
        assert not t.is_alive()


def test_a_byte_by_byte_flood_ends_at_its_deadline():
    """One-byte writes on both pipes cannot stall the parent past the run's deadline. (The parent does wake for
    each write: it spent 1.2-1.9 s of CPU during this 2 s flood, measured; a known cost, not a containment failure.)"""
    start = time.monotonic()
    result = timed("import os\nwhile True:\n    os.write(1, b'x')\n    os.write(2, b'y')",
                   SandboxLimits(wall_seconds=2, cpu_seconds=2, max_output_bytes=10**9))
    assert result.killed_reason in ("timeout", "cpu_limit"), result.killed_reason
    assert time.monotonic() - start < 2 + 3.0  # the deadline held (start-up and kill included, loaded machine)


def test_no_descriptor_thread_or_child_leaks_in_the_parent():
    def counts():
        return len(os.listdir("/proc/self/fd")), threading.active_count()

    hostile = ["import os\nos.mkfifo('.stdout')", DAEMON.format(marker="leak-" + uuid.uuid4().hex),
               "while True: print('z' * 5000)", "import time\ntime.sleep(9)", "import os\nos.kill(-1, 9)"]
    run_code("pass", FAST)
    before = counts()
    for code in hostile * 2:
        run_code(code, SandboxLimits(wall_seconds=1.0, cpu_seconds=1))
    assert counts() == before
    assert _children_of_this_process() == []


def _children_of_this_process() -> list[str]:
    """Our child processes (alive or zombie) whose command is bwrap or the sandbox's interpreter."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and (comm == "bwrap" or comm.startswith("python")):
            found.append(f"{entry} {comm} {fields[0]}")
    return found


def test_cgroups_of_finished_runs_are_removed():
    for parent in _cgroup.parents():
        before = {d for d in os.listdir(parent) if d.startswith(f"rlfw-sandbox-{os.getpid()}-")}
        timed(DAEMON.format(marker="cg-" + uuid.uuid4().hex))
        after = {d for d in os.listdir(parent) if d.startswith(f"rlfw-sandbox-{os.getpid()}-")}
        assert after <= before
