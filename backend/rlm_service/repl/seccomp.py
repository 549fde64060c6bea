"""The worker's seccomp filter, a classic BPF program assembled here. Standard library only.

A deny-list: the calls generated code has no business making, and the arguments that would let it reach
another process. Assembled by hand rather than with libseccomp, which would add a system library to the
image and a Python binding to depend on; tests/test_sandbox.py checks the syscall numbers against
libseccomp's tables and every rule against the kernel.

The first rule that matches decides:
- another architecture than ours: the process is killed; on x86_64, the x32 ABI: refused;
- `DENIED`: always refused (`socket` too when networking is off);
- `socketpair` when networking is off: only a Unix stream or seqpacket pair (a datagram socket can send to
  any named Unix socket of the host);
- `clone3` looks unimplemented (libc falls back to `clone`, whose flags a filter can read); `clone` with
  namespace flags is refused;
- signals (`kill`, `tgkill`, `rt_sigqueueinfo`, `rt_tgsigqueueinfo`): never to a protected pid (the server,
  the zygote), never to another process group (-1 is everyone). With `strict_signals` (a worker that
  shares the server's uid where Landlock does not scope signals) only to the worker's own process or
  group: any other pid could be a thread of the server, and `kill` with a thread id stops the whole server;
- `pidfd_open` of a protected pid is refused, and with `strict_signals` of any pid but the worker's own
  (`pidfd_send_signal` and `pidfd_getfd` always are);
- `fcntl` `F_SETOWN`/`F_SETOWN_EX` and `ioctl` `FIOSETOWN`/`SIOCSPGRP`, which name the process the kernel
  signals when a descriptor is ready (SIGIO by default, deadly): the kernel sends it itself, past the rules on
  the signal calls above, to any process of the same uid;
- calls that act on a process named by pid (`prlimit64`, `sched_set*`, `migrate_pages`, `move_pages`,
  `setpriority`, `ioprio_set`) may act only on the worker itself, or its group: a process of the same uid
  could otherwise lower the server's limits or priority.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from .syscalls import ARCH, AUDIT_ARCH, PR_SET_SECCOMP, SECCOMP_MODE_FILTER, SYSCALLS, prctl

DENIED = (
    # other processes' memory, files and descriptors
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    "pidfd_send_signal",
    "process_madvise",
    "process_mrelease",
    "tkill",
    # kernel interfaces with a history of exploits, or that bypass the file rules
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "bpf",
    "userfaultfd",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "open_by_handle_at",
    "name_to_handle_at",
    "fanotify_init",
    "modify_ldt",
    "uselib",
    "lookup_dcookie",
    # namespaces and mounts
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    # leaving the process group that is killed with the run
    "setsid",
    "setpgid",
    # memory outside the address-space limit
    "memfd_create",
    "memfd_secret",
    # System V IPC and POSIX message queues: objects of the host's IPC namespace that outlive the process (a
    # run's shared memory stays in RAM, counted nowhere, after the run), and that reach other processes' objects
    "shmget",
    "shmat",
    "shmdt",
    "shmctl",
    "msgget",
    "msgsnd",
    "msgrcv",
    "msgctl",
    "semget",
    "semop",
    "semtimedop",
    "semctl",
    "mq_open",
    "mq_unlink",
    "mq_timedsend",
    "mq_timedreceive",
    "mq_notify",
    "mq_getsetattr",
    # the machine's state (all need capabilities the worker does not have)
    "quotactl",
    "quotactl_fd",
    "swapon",
    "swapoff",
    "reboot",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "acct",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "sethostname",
    "setdomainname",
    "syslog",
    "vhangup",
    "iopl",
    "ioperm",
)
SIGNALS = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")
ON_SELF_ONLY = (
    "prlimit64",
    "sched_setaffinity",
    "sched_setscheduler",
    "sched_setparam",
    "sched_setattr",
    "migrate_pages",
    "move_pages",
)
SIGNAL_OWNERS = {"fcntl": (8, 15), "ioctl": (0x8901, 0x8902)}
"""The commands that set a descriptor's owner, by call: F_SETOWN, F_SETOWN_EX; FIOSETOWN, SIOCSPGRP."""
_NAMESPACE_FLAGS = 0x7E020000
_PRIO_USER, _IOPRIO_WHO_USER = 2, 3
_AF_UNIX = 1
_SOCK_DATAGRAM_BITS = 0b1010
"""Set in the socket types that are not connection-oriented (SOCK_DGRAM 2, SOCK_RAW 3, SOCK_PACKET 10); clear in
SOCK_STREAM (1) and SOCK_SEQPACKET (5). The flags above the type's four bits (SOCK_NONBLOCK, SOCK_CLOEXEC) are
not among them."""

_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_LD_W_ABS, _JMP_JA, _JMP_JEQ, _JMP_JGE, _JMP_JSET, _RET_K = 0x20, 0x05, 0x15, 0x35, 0x45, 0x06
_NR, _ARCH_OFFSET = 0, 4


def _arg(index: int) -> int:
    """Offset of the low 32 bits of argument `index` in seccomp_data (both our architectures are little-endian)."""
    return 16 + 8 * index


def _errno(code: int) -> int:
    return 0x00050000 | code


class _Program:
    """A BPF program with symbolic jump targets, resolved when it is assembled."""

    def __init__(self) -> None:
        self.code: list[tuple[int, int, str | None, str | None]] = []
        self.labels: dict[str, int] = {}
        self._fresh = 0

    def label(self) -> str:
        self._fresh += 1
        return f"L{self._fresh}"

    def place(self, label: str) -> None:
        self.labels[label] = len(self.code)

    def load(self, offset: int) -> None:
        self.code.append((_LD_W_ABS, offset, None, None))

    def ret(self, value: int) -> None:
        self.code.append((_RET_K, value, None, None))

    def jump(self, op: int, k: int, true: str | None = None, false: str | None = None) -> None:
        """A conditional jump; a target of None is the next instruction."""
        self.code.append((op, k & 0xFFFFFFFF, true, false))

    def goto(self, label: str) -> None:
        self.code.append((_JMP_JA, 0, label, None))

    def assemble(self) -> bytes:
        out = []
        for index, (op, k, true, false) in enumerate(self.code):
            jt, jf = (0 if target is None else self.labels[target] - index - 1 for target in (true, false))
            if op == _JMP_JA:  # unconditional: the offset travels in k
                k, jt, jf = jt, 0, 0
            if not (0 <= jt <= 255 and 0 <= jf <= 255):
                raise ValueError("a seccomp jump out of range")
            out.append(struct.pack("=HBBI", op, jt, jf, k))
        return b"".join(out)

    def when_syscall(self, nr: int) -> str:
        """Start a block for syscall `nr`; returns the label to place after the block (the next rule).
        The block must end by returning, on every path; the accumulator then still holds the number."""
        after = self.label()
        self.jump(_JMP_JEQ, nr, None, after)
        return after

    def allow_or(self, reply: int, allowed: str, denied: str) -> None:
        """The block's two endings: `allowed` returns ALLOW, `denied` returns `reply`."""
        self.place(allowed)
        self.ret(_RET_ALLOW)
        self.place(denied)
        self.ret(reply)


def build_seccomp_filter(
    *, network: bool, protected_pids: list[int], strict_signals: bool = False, own_pid: int | None = None
) -> bytes:
    """The filter for a worker whose pid (and so process group) is `own_pid` (by default, this process)."""
    numbers = SYSCALLS[ARCH]
    own = os.getpid() if own_pid is None else own_pid
    eperm = _errno(errno.EPERM)
    program = _Program()
    program.load(_ARCH_OFFSET)
    program.jump(_JMP_JEQ, AUDIT_ARCH[ARCH], "arch ok")
    program.ret(_RET_KILL_PROCESS)
    program.place("arch ok")
    program.load(_NR)
    if ARCH == "x86_64":  # the x32 ABI has its own numbers; refuse it outright
        program.jump(_JMP_JGE, 0x40000000, None, "native")
        program.ret(eperm)
        program.place("native")
    denied = [name for name in DENIED if name in numbers] + ([] if network else ["socket"])
    for name in denied:
        after = program.when_syscall(numbers[name])
        program.ret(_errno(errno.EACCES) if name == "socket" else eperm)
        program.place(after)

    if not network:
        # A datagram pair could still send to any named Unix datagram socket of the host (sendto, or connect then
        # send: /dev/log, a service's socket). Stream and seqpacket pairs are connected to each other for good.
        after = program.when_syscall(numbers["socketpair"])
        allowed, refused = program.label(), program.label()
        program.load(_arg(0))
        program.jump(_JMP_JEQ, _AF_UNIX, None, refused)
        program.load(_arg(1))
        program.jump(_JMP_JSET, _SOCK_DATAGRAM_BITS, refused, allowed)
        program.allow_or(_errno(errno.EACCES), allowed, refused)
        program.place(after)

    after = program.when_syscall(numbers["clone3"])
    program.ret(_errno(errno.ENOSYS))
    program.place(after)
    after = program.when_syscall(numbers["clone"])
    program.load(_arg(0))
    allowed, refused = program.label(), program.label()
    program.jump(_JMP_JSET, _NAMESPACE_FLAGS, refused, allowed)
    program.allow_or(eperm, allowed, refused)
    program.place(after)

    for name in SIGNALS:
        after = program.when_syscall(numbers[name])
        program.load(_arg(0))
        allowed, refused = program.label(), program.label()
        if strict_signals:
            targets = [own] + ([0, -own] if name == "kill" else [])
            for target in targets:
                program.jump(_JMP_JEQ, target, allowed)
            program.goto(refused)
        else:
            for pid in protected_pids:
                program.jump(_JMP_JEQ, pid, refused)
            if name == "kill":  # a negative pid names a group: only our own
                program.jump(_JMP_JSET, 0x80000000, None, allowed)
                program.jump(_JMP_JEQ, -own, allowed, refused)
            else:
                program.goto(allowed)
        program.allow_or(eperm, allowed, refused)
        program.place(after)

    for name, commands in SIGNAL_OWNERS.items():
        after = program.when_syscall(numbers[name])
        allowed, refused = program.label(), program.label()
        program.load(_arg(1))
        for command in commands:
            program.jump(_JMP_JEQ, command, refused)
        program.goto(allowed)
        program.allow_or(eperm, allowed, refused)
        program.place(after)

    after = program.when_syscall(numbers["pidfd_open"])
    program.load(_arg(0))
    allowed, refused = program.label(), program.label()
    if strict_signals:
        program.jump(_JMP_JEQ, own, allowed, refused)
    else:
        for pid in protected_pids:
            program.jump(_JMP_JEQ, pid, refused)
        program.goto(allowed)
    program.allow_or(eperm, allowed, refused)
    program.place(after)

    for name, who, which_user in [
        *((name, 0, None) for name in ON_SELF_ONLY),
        ("setpriority", 1, _PRIO_USER),
        ("ioprio_set", 1, _IOPRIO_WHO_USER),
    ]:
        after = program.when_syscall(numbers[name])
        allowed, refused = program.label(), program.label()
        if which_user is not None:  # "every process of my uid" would include the server
            program.load(_arg(0))
            program.jump(_JMP_JEQ, which_user, refused)
        program.load(_arg(who))
        program.jump(_JMP_JEQ, 0, allowed)
        program.jump(_JMP_JEQ, own, allowed, refused)
        program.allow_or(eperm, allowed, refused)
        program.place(after)

    program.ret(_RET_ALLOW)
    return program.assemble()


def apply_seccomp(*, network: bool, protected_pids: list[int], strict_signals: bool = False) -> str:
    """Install the filter on this process (and so on everything it starts); returns its description."""
    program = build_seccomp_filter(network=network, protected_pids=protected_pids, strict_signals=strict_signals)
    count = len(program) // 8
    code = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("=HxxxxxxQ", count, ctypes.addressof(code))
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fbuf))
    details = ([] if network else ["no sockets"]) + (["signals to its own processes only"] if strict_signals else [])
    return "seccomp" + (f" ({', '.join(details)})" if details else "")
