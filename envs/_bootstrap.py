"""The sandbox's bootstrap, run as ``python -I -S -B -c <this file's text> ARGS`` inside bubblewrap; never imported.

It becomes the run's PID 1: it forks the program, reaps every process until the program ends, then exits the same
way (128 + N for death by signal N), after which the kernel kills what is left of the namespace. In the program's
process it sets the resource limits, then runs ``main.py``, with exit statuses made unambiguous: ``sys.exit(256)``
must not read as success, and an uncaught ``MemoryError`` / ``EFBIG`` exits with a status of its own.

ARGS: cpu seconds, address-space bytes, file-size bytes, open files, processes, the MemoryError and EFBIG exit
statuses, and the descriptor holding the program's stdin (-1: fd 0 already is).
"""

import os
import resource
import sys

cpu, memory, fsize, nofile, nproc, memory_exit, file_size_exit, stdin_fd = (int(x) for x in sys.argv[1:9])
if stdin_fd >= 0:  # the program's stdin arrives as another descriptor when fd 0 was the parent's start signal
    os.dup2(stdin_fd, 0)
    os.close(stdin_fd)
program = os.fork()
if program:
    # PID 1 of the run: reap every process until the program ends, then end the same way; the kernel then kills what
    # is left of the namespace. Our parent (bwrap's monitor) reaps us, so no zombie is left to the host.
    while True:
        died, status = os.wait()
        if died == program:
            os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
# CPU: SIGXCPU at the soft limit tells the parent why; SIGKILL a second later if the program ignores it.
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NOFILE, nofile),
                     (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
main = os.path.abspath("main.py")
sys.argv = [main]
sys.path.insert(0, os.getcwd())
with open(main, "rb") as f:
    source = f.read()
namespace = {"__name__": "__main__", "__file__": main, "__builtins__": __builtins__}
try:
    exec(compile(source, main, "exec"), namespace)
except SystemExit as exc:
    code = exc.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    raise SystemExit(0 if not code else (code & 0xFF) or 1) from None  # sys.exit(256) must not read as success
except BaseException as exc:
    try:
        import traceback
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(memory_exit if isinstance(exc, MemoryError) else
                 file_size_exit if getattr(exc, "errno", None) == 27 else 1)  # 27: EFBIG
