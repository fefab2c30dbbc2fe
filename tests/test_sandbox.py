"""The process sandbox contains hostile code, and a normal run still works afterwards."""

from __future__ import annotations

import os
import socket
import time

import pytest

from envs.sandbox import SandboxLimits, check_sandbox, run_code

FAST = SandboxLimits(wall_seconds=3.0, cpu_seconds=1, memory_mb=256)


@pytest.fixture(autouse=True)
def normal_run_still_works():
    yield
    result = run_code("print(sum(range(10)))", FAST)
    assert result.ok and result.stdout == "45\n", result


def test_normal_run_returns_structured_result():
    result = run_code("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)", FAST)
    assert (result.stdout, result.stderr, result.returncode) == ("out\n", "err\n", 3)
    assert not result.timed_out and result.killed_reason is None and not result.ok


def test_infinite_loop_hits_the_cpu_limit():
    start = time.monotonic()
    result = run_code("while True:\n    pass", FAST)
    assert result.killed_reason == "cpu_limit" and not result.ok
    assert time.monotonic() - start < FAST.wall_seconds + 1


def test_sleeping_code_hits_the_wall_clock_timeout():
    result = run_code("import time\ntime.sleep(30)", SandboxLimits(wall_seconds=0.5, cpu_seconds=1))
    assert result.timed_out and result.killed_reason == "timeout"
    assert result.duration_s < 2


def test_fork_bomb_is_contained():
    bomb = "import os\nwhile True:\n    os.fork()"
    start = time.monotonic()
    result = run_code(bomb, FAST)
    assert not result.ok and time.monotonic() - start < FAST.wall_seconds + 2
    spawn = "import subprocess\nsubprocess.run(['sleep', '30'])"
    assert run_code(spawn, FAST).killed_reason == "timeout"
    multi = ("import multiprocessing as mp, time\nps = [mp.Process(target=time.sleep, args=(5,)) for _ in range(100)]\n"
             "[p.start() for p in ps]")
    assert not run_code(multi, FAST).ok


def test_memory_bomb_is_contained():
    result = run_code("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 1024 * 1024))", FAST)
    assert result.killed_reason == "memory_limit"


def test_output_flood_is_truncated():
    result = run_code("while True:\n    print('x' * 1000)", SandboxLimits(wall_seconds=3, cpu_seconds=1,
                                                                        max_output_chars=500))
    assert len(result.stdout) < 600 and result.stdout.endswith("[truncated]")
    assert not result.ok


def test_write_outside_the_working_directory_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for code in (f"open({str(target)!r}, 'w').write('x')",
                 f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
                 f"import os\nos.remove({str(victim)!r})",
                 f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
                 f"import shutil\nshutil.copyfile('main.py', {str(target)!r})"):
        result = run_code(code, FAST)
        assert not result.ok, (code, result)
    assert not target.exists() and victim.read_text() == "keep me"
    inside = run_code("open('note.txt', 'w').write('hi')\nprint(open('note.txt').read())", FAST)
    assert inside.ok and inside.stdout == "hi\n"


def test_network_connection_is_refused():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.2)
        port = listener.getsockname()[1]
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'leak')"
        result = run_code(code, FAST)
        assert not result.ok
        with pytest.raises(TimeoutError):
            listener.accept()


def test_parent_secret_is_not_visible(monkeypatch):
    monkeypatch.setenv("RLFW_SECRET", "hunter2")
    code = ("import os\nprint(os.environ.get('RLFW_SECRET'))\nprint(sorted(os.environ))\n"
            f"print(open('/proc/{os.getpid()}/environ', 'rb').read())")
    result = run_code(code, FAST)
    assert "hunter2" not in result.stdout + result.stderr
    assert result.stdout.startswith("None\n") and not result.ok
    assert "RLFW_SECRET" not in result.stdout


def test_working_directory_is_private_and_removed():
    result = run_code("import os\nopen('left.txt', 'w').write('x')\nprint(os.getcwd())", FAST)
    assert result.ok and result.stdout == "/sandbox\n"
    assert run_code("import os\nprint(os.listdir('.'))", FAST).stdout == "['main.py']\n"


def test_host_isolation_layers_reported():
    backend = check_sandbox()
    assert backend.bwrap is not None and os.path.exists(backend.python)
    uid = run_code("import os\nprint(os.getuid())", FAST).stdout.strip()
    assert uid.isdigit() and int(uid) != 0
