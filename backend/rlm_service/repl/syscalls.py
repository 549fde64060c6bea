"""Linux system calls the sandbox needs that Python does not wrap, through ctypes. Standard library only."""

from __future__ import annotations

import ctypes
import os
import platform

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.prctl.restype = ctypes.c_int

PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
CAP_DAC_READ_SEARCH = 2

ARCH = platform.machine()
# Syscall numbers for the two architectures we ship on.
SYSCALLS = {
    "x86_64": dict(
        socket=41, ptrace=101, kill=62, tkill=200, tgkill=234, setsid=112, setpgid=109, capset=126,
        process_vm_readv=310, process_vm_writev=311, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427, pidfd_open=434, pidfd_send_signal=424, unshare=272, setns=308, mount=165,
        bpf=321, userfaultfd=323, perf_event_open=298, keyctl=250, add_key=248, request_key=249,
        clone=56, clone3=435, landlock_create_ruleset=444, landlock_add_rule=445,
        landlock_restrict_self=446,
    ),
    "aarch64": dict(
        socket=198, ptrace=117, kill=129, tkill=130, tgkill=131, setsid=157, setpgid=154, capset=91,
        process_vm_readv=270, process_vm_writev=271, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427, pidfd_open=434, pidfd_send_signal=424, unshare=97, setns=268, mount=40,
        bpf=280, userfaultfd=282, perf_event_open=241, keyctl=219, add_key=217, request_key=218,
        clone=220, clone3=435, landlock_create_ruleset=444, landlock_add_rule=445,
        landlock_restrict_self=446,
    ),
}
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}


def syscall(name: str, *args: object) -> int:
    number = SYSCALLS[ARCH][name]
    result = libc.syscall(number, *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return result


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> None:
    if libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(arg4),
                   ctypes.c_ulong(arg5)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
