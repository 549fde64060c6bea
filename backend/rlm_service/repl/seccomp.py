"""The worker's seccomp filter, a classic BPF program assembled here. Standard library only.

It refuses what generated code has no business doing: opening sockets (when networking is off),
tracing or reading other processes, io_uring, bpf, namespaces, keyrings, leaving the worker's process
group, and signalling the server, the zygote, everyone (-1) or another process group.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from .syscalls import ARCH, AUDIT_ARCH, PR_SET_SECCOMP, SECCOMP_MODE_FILTER, SYSCALLS, prctl

_RET_ALLOW = 0x7FFF0000
_RET_KILL = 0x80000000


def _errno(code: int) -> int:
    return 0x00050000 | code


def _stmt(code: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, 0, 0, k & 0xFFFFFFFF)


def _jump(code: int, k: int, jt: int, jf: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


_LD_NR = _stmt(0x20, 0)          # A = seccomp_data.nr
_LD_ARCH = _stmt(0x20, 4)        # A = seccomp_data.arch
_LD_ARG0 = _stmt(0x20, 16)       # A = low 32 bits of args[0]
_JEQ, _JGE, _JSET, _JA, _RET = 0x15, 0x35, 0x45, 0x05, 0x06


def _deny_if_arg0(nr: int, values: list[int], reply: int) -> list[bytes]:
    """If the syscall is `nr` and its first argument (32 bits) is one of `values`, return `reply`."""
    count = len(values)
    prog = [_jump(_JEQ, nr, 0, count + 3), _LD_ARG0]
    for index, value in enumerate(values):
        prog.append(_jump(_JEQ, value & 0xFFFFFFFF, count - index, 0))
    prog += [_stmt(_JA, 1), _stmt(_RET, reply), _LD_NR]
    return prog


def _kill_rule(nr: int, protected: list[int], own_group: int, reply: int) -> list[bytes]:
    """kill(): never a protected pid; to a process group (pid < 0) only our own, so never -1 (everyone)."""
    count = len(protected)
    prog = [_jump(_JEQ, nr, 0, count + 4), _LD_ARG0]
    for index, pid in enumerate(protected):
        prog.append(_jump(_JEQ, pid & 0xFFFFFFFF, count - index + 1, 0))   # a protected process: refused
    prog += [
        _jump(_JSET, 0x80000000, 0, 2),                       # pid >= 0: allowed
        _jump(_JEQ, -own_group & 0xFFFFFFFF, 1, 0),           # our own group: allowed
        _stmt(_RET, reply),
        _LD_NR,
    ]
    return prog


def build_seccomp_filter(*, network: bool, protected_pids: list[int]) -> bytes:
    numbers = SYSCALLS[ARCH]
    eperm = _errno(errno.EPERM)
    prog: list[bytes] = [_LD_ARCH, _jump(_JEQ, AUDIT_ARCH[ARCH], 1, 0), _stmt(_RET, _RET_KILL), _LD_NR]
    if ARCH == "x86_64":  # the x32 ABI has its own numbers; refuse it outright
        prog += [_jump(_JGE, 0x40000000, 0, 1), _stmt(_RET, eperm)]
    denied = ["ptrace", "process_vm_readv", "process_vm_writev", "io_uring_setup", "io_uring_enter",
              "io_uring_register", "bpf", "userfaultfd", "perf_event_open", "keyctl", "add_key",
              "request_key", "unshare", "setns", "mount", "setsid", "setpgid", "tkill",
              "pidfd_send_signal"]
    if not network:
        denied.append("socket")
    for name in denied:
        reply = _errno(errno.EACCES) if name == "socket" else eperm
        prog += [_jump(_JEQ, numbers[name], 0, 1), _stmt(_RET, reply)]
    # clone3 hides its flags in memory: make libc fall back to clone(), whose flags we can read.
    prog += [_jump(_JEQ, numbers["clone3"], 0, 1), _stmt(_RET, _errno(errno.ENOSYS))]
    namespaces = 0x7E020000
    prog += [_jump(_JEQ, numbers["clone"], 0, 4), _LD_ARG0, _jump(_JSET, namespaces, 0, 1),
             _stmt(_RET, eperm), _LD_NR]
    prog += _kill_rule(numbers["kill"], protected_pids, os.getpid(), eperm)
    if protected_pids:
        prog += _deny_if_arg0(numbers["tgkill"], protected_pids, eperm)
        prog += _deny_if_arg0(numbers["pidfd_open"], protected_pids, eperm)
    prog.append(_stmt(_RET, _RET_ALLOW))
    return b"".join(prog)


def apply_seccomp(*, network: bool, protected_pids: list[int]) -> str:
    """Install the filter on this process (and so on everything it starts); returns its description."""
    program = build_seccomp_filter(network=network, protected_pids=protected_pids)
    count = len(program) // 8
    code = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("=HxxxxxxQ", count, ctypes.addressof(code))
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fbuf))
    return "seccomp" + ("" if network else " (no sockets)")
