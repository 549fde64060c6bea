"""Linux system calls the sandbox needs that Python does not wrap, through ctypes. Standard library only."""

from __future__ import annotations

import ctypes
import os
import platform

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.prctl.restype = ctypes.c_int

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
CAP_DAC_READ_SEARCH = 2

ARCH = platform.machine()
# Syscall numbers for the two architectures we ship on (checked against libseccomp by tests/test_sandbox.py).
SYSCALLS = {
    "x86_64": dict(
        socket=41,
        ptrace=101,
        kill=62,
        tkill=200,
        tgkill=234,
        rt_sigqueueinfo=129,
        rt_tgsigqueueinfo=297,
        setsid=112,
        setpgid=109,
        capset=126,
        process_vm_readv=310,
        process_vm_writev=311,
        io_uring_setup=425,
        io_uring_enter=426,
        io_uring_register=427,
        pidfd_open=434,
        pidfd_send_signal=424,
        pidfd_getfd=438,
        process_madvise=440,
        process_mrelease=448,
        kcmp=312,
        unshare=272,
        setns=308,
        mount=165,
        umount2=166,
        pivot_root=155,
        chroot=161,
        open_tree=428,
        move_mount=429,
        fsopen=430,
        fsconfig=431,
        fsmount=432,
        fspick=433,
        mount_setattr=442,
        bpf=321,
        userfaultfd=323,
        perf_event_open=298,
        keyctl=250,
        add_key=248,
        request_key=249,
        clone=56,
        clone3=435,
        landlock_create_ruleset=444,
        landlock_add_rule=445,
        landlock_restrict_self=446,
        open_by_handle_at=304,
        name_to_handle_at=303,
        fanotify_init=300,
        quotactl=179,
        quotactl_fd=443,
        swapon=167,
        swapoff=168,
        reboot=169,
        kexec_load=246,
        kexec_file_load=320,
        init_module=175,
        finit_module=313,
        delete_module=176,
        acct=163,
        settimeofday=164,
        clock_settime=227,
        clock_adjtime=305,
        adjtimex=159,
        sethostname=170,
        setdomainname=171,
        syslog=103,
        vhangup=153,
        lookup_dcookie=212,
        memfd_create=319,
        memfd_secret=447,
        prlimit64=302,
        setpriority=141,
        sched_setaffinity=203,
        sched_setscheduler=144,
        sched_setparam=142,
        sched_setattr=314,
        ioprio_set=251,
        migrate_pages=256,
        move_pages=279,
        iopl=172,
        ioperm=173,
        modify_ldt=154,
        uselib=134,
    ),
    "aarch64": dict(
        socket=198,
        ptrace=117,
        kill=129,
        tkill=130,
        tgkill=131,
        rt_sigqueueinfo=138,
        rt_tgsigqueueinfo=240,
        setsid=157,
        setpgid=154,
        capset=91,
        process_vm_readv=270,
        process_vm_writev=271,
        io_uring_setup=425,
        io_uring_enter=426,
        io_uring_register=427,
        pidfd_open=434,
        pidfd_send_signal=424,
        pidfd_getfd=438,
        process_madvise=440,
        process_mrelease=448,
        kcmp=272,
        unshare=97,
        setns=268,
        mount=40,
        umount2=39,
        pivot_root=41,
        chroot=51,
        open_tree=428,
        move_mount=429,
        fsopen=430,
        fsconfig=431,
        fsmount=432,
        fspick=433,
        mount_setattr=442,
        bpf=280,
        userfaultfd=282,
        perf_event_open=241,
        keyctl=219,
        add_key=217,
        request_key=218,
        clone=220,
        clone3=435,
        landlock_create_ruleset=444,
        landlock_add_rule=445,
        landlock_restrict_self=446,
        open_by_handle_at=265,
        name_to_handle_at=264,
        fanotify_init=262,
        quotactl=60,
        quotactl_fd=443,
        swapon=224,
        swapoff=225,
        reboot=142,
        kexec_load=104,
        kexec_file_load=294,
        init_module=105,
        finit_module=273,
        delete_module=106,
        acct=89,
        settimeofday=170,
        clock_settime=112,
        clock_adjtime=266,
        adjtimex=171,
        sethostname=161,
        setdomainname=162,
        syslog=116,
        vhangup=58,
        lookup_dcookie=18,
        memfd_create=279,
        memfd_secret=447,
        prlimit64=261,
        setpriority=140,
        sched_setaffinity=122,
        sched_setscheduler=119,
        sched_setparam=118,
        sched_setattr=274,
        ioprio_set=30,
        migrate_pages=238,
        move_pages=239,
    ),
}
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}


def syscall(name: str, *args: object) -> int:
    number = SYSCALLS[ARCH][name]
    result: int = libc.syscall(number, *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return result


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> None:
    if libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
