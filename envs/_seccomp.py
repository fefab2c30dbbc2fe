"""A small seccomp filter for the sandbox: refuse (EPERM) the system calls a Python program has no use for and that
widen the kernel's attack surface or let a program tamper with the sandbox's PID 1.

A deny list, not an allow list, so it stays small and needs no upkeep as Python and glibc change: process tracing
and memory access (``ptrace``, ``process_vm_*``), kernel keyrings, ``bpf``, ``perf_event_open``, ``userfaultfd``,
``io_uring``, module and kexec loading, every mount API, namespace changes, handle-based opens, swap, reboot,
accounting, quotas and the kernel log. Foreign system-call ABIs, whose numbers differ, are stopped: i386 calls kill
the process, x32 calls are refused. Built as classic BPF for bubblewrap's ``--seccomp FD``; on other architectures there is no filter.
"""

from __future__ import annotations

import platform
import struct

# struct seccomp_data: nr at offset 0, arch at offset 4
LD_W_ABS, JEQ_K, JGE_K, RET_K = 0x20, 0x15, 0x35, 0x06
RET_ALLOW, RET_KILL_PROCESS, RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
EPERM = 1
X32_SYSCALL_BIT = 0x40000000

DENIED = ("ptrace", "process_vm_readv", "process_vm_writev", "keyctl", "add_key", "request_key", "bpf",
          "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "kexec_load",
          "kexec_file_load", "init_module", "finit_module", "delete_module", "mount", "umount2", "pivot_root",
          "unshare", "setns", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
          "name_to_handle_at", "open_by_handle_at", "swapon", "swapoff", "reboot", "acct", "quotactl", "syslog")

# (audit arch, system call numbers) per machine, from the kernel's syscall tables.
ARCHES = {
    "x86_64": (0xC000003E, {
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "keyctl": 250, "add_key": 248,
        "request_key": 249, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "kexec_load": 246, "kexec_file_load": 320,
        "init_module": 175, "finit_module": 313, "delete_module": 176, "mount": 165, "umount2": 166,
        "pivot_root": 155, "unshare": 272, "setns": 308, "open_tree": 428, "move_mount": 429, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442, "name_to_handle_at": 303,
        "open_by_handle_at": 304, "swapon": 167, "swapoff": 168, "reboot": 169, "acct": 163, "quotactl": 179,
        "syslog": 103}),
    "aarch64": (0xC00000B7, {
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "keyctl": 219, "add_key": 217,
        "request_key": 218, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "kexec_load": 104, "kexec_file_load": 294,
        "init_module": 105, "finit_module": 273, "delete_module": 106, "mount": 40, "umount2": 39,
        "pivot_root": 41, "unshare": 97, "setns": 268, "open_tree": 428, "move_mount": 429, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442, "name_to_handle_at": 264,
        "open_by_handle_at": 265, "swapon": 224, "swapoff": 225, "reboot": 142, "acct": 89, "quotactl": 60,
        "syslog": 116}),
}


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def filter_program(machine: str | None = None) -> bytes | None:
    """The BPF program (struct sock_filter array) for ``machine`` (default: this one); None if unsupported."""
    machine = machine or platform.machine()
    if machine not in ARCHES:
        return None
    arch, numbers = ARCHES[machine]
    denied = sorted({numbers[name] for name in DENIED})
    checks = [(JGE_K, X32_SYSCALL_BIT)] if machine == "x86_64" else []
    checks += [(JEQ_K, nr) for nr in denied]
    program = [_insn(LD_W_ABS, 4), _insn(JEQ_K, arch, jt=1), _insn(RET_K, RET_KILL_PROCESS), _insn(LD_W_ABS, 0)]
    for i, (code, k) in enumerate(checks):
        program.append(_insn(code, k, jt=len(checks) - i))  # to the deny return, past the remaining checks + allow
    program += [_insn(RET_K, RET_ALLOW), _insn(RET_K, RET_ERRNO | EPERM)]
    return b"".join(program)
