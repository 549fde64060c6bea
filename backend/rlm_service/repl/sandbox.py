"""The worker confines itself before it runs any generated code. Standard library only.

Layers, each applied when the kernel and the worker's privileges allow it (`apply` reports which):

- resource limits: address space, CPU time, processes and threads, file size, no core dumps;
- when started as root: a per-run unprivileged uid, with every capability dropped. Where the Python
  installation is not world-readable it keeps CAP_DAC_READ_SEARCH, but only once Landlock is in force
  to limit what it can read: without Landlock the capability goes too, and a worker that then cannot
  read the installation refuses to start, saying why;
- `no_new_privs`, and death when the server dies;
- Landlock: read-only access to the Python installation and system libraries, read-write access to the
  worker's own directory only, and (ABI 6+) no signals or abstract sockets outside the worker's own
  process tree;
- seccomp (`seccomp.py`): no `socket()` when networking is off, none of the calls in its deny-list, no
  leaving the worker's process group, no signal to the server or the zygote, and no signal beyond the
  worker's own processes when it shares the server's uid and Landlock does not scope signals.

None of it needs privileges: an unprivileged server gets every layer but the uid switch.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import signal
import stat
import struct
import sys
import time
from dataclasses import dataclass, field

from .seccomp import apply_seccomp
from .syscalls import (
    ARCH,
    CAP_DAC_READ_SEARCH,
    PR_CAP_AMBIENT,
    PR_CAP_AMBIENT_CLEAR_ALL,
    PR_CAPBSET_DROP,
    PR_SET_CHILD_SUBREAPER,
    PR_SET_DUMPABLE,
    PR_SET_KEEPCAPS,
    PR_SET_NO_NEW_PRIVS,
    PR_SET_PDEATHSIG,
    SYSCALLS,
    libc,
    prctl,
    syscall,
)


@dataclass
class SandboxOptions:
    memory_mb: int = 4096
    cpu_seconds: int = 3600
    processes: int = 8
    """Processes and threads the run's code may start, besides the worker and its channel thread."""
    max_file_bytes: int = 1024**3
    network: bool = False
    workdir: str = "."
    readable_files: list[str] = field(default_factory=list)
    uid: int | None = None
    protected_pids: list[int] = field(default_factory=list)
    """Processes no signal may reach: the server and the zygote."""
    landlock: bool = True


class SandboxError(Exception):
    """The worker cannot be confined as it must be; it does not start."""


@dataclass
class SandboxReport:
    """Which layers took effect, for the server's log and the security tests."""

    layers: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


PR_SET_NAME = 15
WORKER_OPEN_FILES = 1024
"""Files (and pipes, and sockets) a worker may hold open at once. Not the server's limit, which it raises to
its hard limit (`server.raise_open_files_limit`): a run's code would otherwise hold up to that many, kernel
memory that no other limit counts."""


def set_process_name(name: str) -> None:
    """Name this process (what `ps` and /proc/<pid>/comm show), 15 characters at most."""
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def die_with_parent(expected_parent: int | None, sig: int = signal.SIGKILL) -> None:
    """Get `sig` when the parent dies; exit now if it already has."""
    prctl(PR_SET_PDEATHSIG, sig)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(0)


def become_subreaper() -> None:
    """Orphaned descendants of this process become its children (to reap) rather than the first process's."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def first_to_go_out_of_memory() -> None:
    """Make this process (and the children it forks, which inherit it) the kernel's first choice when the machine
    runs out of memory, ahead of the server, whose death would end every run: a worker holds up to
    RLM_WORKER_MEMORY_MB, more than the server holds, but the server can still be the largest process (many
    runs' events, small worker limits). Raising one's own score needs no privilege."""
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as adj:
        adj.write("1000")


WORKER_NICE = 10
"""How much lower than the server's the CPU priority of the zygote and its workers is."""


def yield_cpu_to_the_server(server: int) -> None:
    """Lower this process's CPU priority below the server's (`server`, a pid), and its children's (they inherit
    it): cells that compute for long then take what the server leaves, and the server keeps what it needs to
    stream every run's events and to start new runs. Where the kernel weighs processes by session first
    (autogroup), a niceness only counts within the session: the workers stay in the zygote's session, whose
    weight is set as far below the server's session's. Lowering one's own priority needs no privilege."""
    os.nice(WORKER_NICE)
    try:
        with open(f"/proc/{server}/autogroup") as group:
            shown = group.read().split()  # "/autogroup-<n> nice <nice>"
        # Nothing is shown for the root group, the session of init's that a server in a container may never have
        # left (as in CI): its processes are weighed one by one there, the server by its own niceness.
        server_nice = int(shown[-1]) if shown else os.getpriority(os.PRIO_PROCESS, server)
    except (OSError, ValueError):  # a kernel without autogroup, or a file it does not write this way
        return
    for _ in range(20):
        try:
            with open("/proc/self/autogroup", "w") as group:
                group.write(str(min(server_nice + WORKER_NICE, 19)))
            return
        except BlockingIOError:  # another unprivileged process set a group's weight within the last 100 ms
            time.sleep(0.1)
        except OSError:  # (a weight above the default, under a server's session niced below 0, needs privilege)
            return


def make_non_dumpable() -> None:
    """Only root may then read or write this process's memory or open its /proc files (children inherit it)."""
    prctl(PR_SET_DUMPABLE, 0)


# --- uid switch ------------------------------------------------------------------------------


def _readable_by(path: str, uid: int, gid: int) -> bool:
    """Whether `uid` (in group `gid` alone, with no capability) can reach `path` and read it, or list it
    if it is a directory."""
    current = os.path.realpath(path)
    wanted = stat.S_IROTH
    while True:
        try:
            info = os.stat(current)
        except OSError:
            return False
        if stat.S_ISDIR(info.st_mode):
            wanted |= stat.S_IXOTH
        shift = 6 if info.st_uid == uid else 3 if info.st_gid == gid else 0
        if (info.st_mode >> shift) & wanted != wanted:
            return False
        parent = os.path.dirname(current)
        if parent == current:
            return True
        current, wanted = parent, 0


def _capset(effective: int, permitted: int) -> None:
    header = struct.pack("=Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = struct.pack("=6I", effective & 0xFFFFFFFF, permitted & 0xFFFFFFFF, 0, effective >> 32, permitted >> 32, 0)
    hbuf = ctypes.create_string_buffer(header, len(header))
    dbuf = ctypes.create_string_buffer(data, len(data))
    syscall("capset", hbuf, dbuf)


def drop_to_uid(uid: int, unreadable: list[str]) -> None:
    """As root, become `uid` with no capabilities but, if some `unreadable` paths need it, read-search."""
    keep = 1 << CAP_DAC_READ_SEARCH if unreadable else 0
    for cap in range(64):
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # past the last capability this kernel knows
                break
            raise
    prctl(PR_SET_KEEPCAPS, 1)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    _capset(keep, keep)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


# --- resource limits -------------------------------------------------------------------------


def _tasks_of_uid(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                text = status.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if fields.get("Uid", "").split()[:1] == [str(uid)]:
            count += int(fields.get("Threads", "1"))
    return count


def set_limits(options: SandboxOptions, *, own_uid: bool = False) -> None:
    """rlimits. RLIMIT_NPROC counts every task (process or thread) of the real uid: with `own_uid` (the
    process alone has its uid) that is the run's own, so the run gets exactly `processes` more than the
    worker's two threads; otherwise it is every task of the server's uid, counted now, and the cap is
    that count plus as many (so tasks other processes of the uid start later come out of this run's
    allowance)."""
    memory = options.memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (options.cpu_seconds, options.cpu_seconds + 5))
    resource.setrlimit(resource.RLIMIT_FSIZE, (options.max_file_bytes, options.max_file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    files = min(WORKER_OPEN_FILES, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
    tasks = len(os.listdir("/proc/self/task")) if own_uid else _tasks_of_uid(os.getuid())
    nproc = tasks + 1 + options.processes  # + 1: the channel thread, started after this
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


# --- Landlock --------------------------------------------------------------------------------

_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR = 1, 2, 4, 8
_LL_READ = _LL_EXECUTE | _LL_READ_FILE | _LL_READ_DIR
_LL_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
_LL_SCOPE_ABSTRACT_UNIX, _LL_SCOPE_SIGNAL = 1, 2
_LL_RULE_PATH_BENEATH = 1

_SYSTEM_READ_PATHS = [
    "/usr",
    "/lib",
    "/lib64",
    "/lib32",
    "/bin",
    "/sbin",
    "/proc",
    "/sys/devices/system/cpu",
    "/dev/urandom",
    "/dev/random",
    "/dev/zero",
    "/etc/ld.so.cache",
    "/etc/localtime",
    # Certificates, not the whole of /etc/ssl or /etc/pki, which hold the host's private keys (ssl/private,
    # pki/tls/private): a worker that keeps CAP_DAC_READ_SEARCH (a Python installation only root can read) reads
    # whatever root can read within these rules.
    "/etc/ssl/certs",
    "/etc/ssl/cert.pem",
    "/etc/ssl/openssl.cnf",
    "/etc/ca-certificates",
    "/etc/pki/ca-trust",
    "/etc/pki/tls/certs",
    "/etc/pki/tls/cert.pem",
    "/etc/pki/tls/openssl.cnf",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/host.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/mime.types",
    "/etc/passwd",
    "/etc/group",
    "/etc/matplotlibrc",
]


def python_paths() -> list[str]:
    """Directories the interpreter and its packages are loaded from."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    paths.update(p for p in sys.path if p and os.path.isdir(p))
    return sorted(os.path.realpath(p) for p in paths)


def landlock_abi() -> int:
    try:
        return syscall("landlock_create_ruleset", None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    except OSError:
        return 0


def _add_path_rule(ruleset: int, path: str, access: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return
    try:
        attr = struct.pack("=Qi", access, fd)
        buf = ctypes.create_string_buffer(attr, len(attr))
        syscall(
            "landlock_add_rule", ctypes.c_int(ruleset), ctypes.c_int(_LL_RULE_PATH_BENEATH), buf, ctypes.c_uint32(0)
        )
    finally:
        os.close(fd)


def apply_landlock(options: SandboxOptions, abi: int) -> tuple[str, bool]:
    """Restrict this process; returns the layer's description and whether signals are scoped too."""
    handled = _LL_FS_BY_ABI.get(abi, _LL_FS_BY_ABI[5])
    scoped = (_LL_SCOPE_ABSTRACT_UNIX | _LL_SCOPE_SIGNAL) if abi >= 6 else 0
    if abi >= 6:
        attr = struct.pack("=QQQ", handled, 0, scoped)
    elif abi >= 4:
        attr = struct.pack("=QQ", handled, 0)
    else:
        attr = struct.pack("=Q", handled)
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = syscall("landlock_create_ruleset", buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    try:
        file_read = _LL_EXECUTE | _LL_READ_FILE
        for path in _SYSTEM_READ_PATHS + python_paths():
            is_dir = os.path.isdir(path)
            _add_path_rule(ruleset, path, (_LL_READ if is_dir else file_read) & handled)
        for path in options.readable_files:
            _add_path_rule(ruleset, path, _LL_READ_FILE)
        _add_path_rule(ruleset, "/dev/null", _LL_READ_FILE | _LL_WRITE_FILE)
        _add_path_rule(ruleset, options.workdir, handled)
        syscall("landlock_restrict_self", ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    return f"landlock (ABI {abi}{', signal scope' if scoped else ''})", bool(scoped)


# --- all together ----------------------------------------------------------------------------


def apply(options: SandboxOptions) -> SandboxReport:
    """Confine the calling process; layers the system cannot provide are listed as skipped. Raises
    `SandboxError` when what is left would not be safe to run generated code in."""
    report = SandboxReport()
    own_uid = options.uid is not None and os.geteuid() == 0
    unreadable: list[str] = []
    if own_uid:
        assert options.uid is not None
        needed = python_paths() + options.readable_files + [options.workdir]
        unreadable = [path for path in needed if not _readable_by(path, options.uid, options.uid)]
        drop_to_uid(options.uid, unreadable)
    set_limits(options, own_uid=own_uid)
    report.layers.append("rlimits")
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    landlocked, scoped = False, False
    abi = landlock_abi() if options.landlock else 0
    if abi:
        try:
            layer, scoped = apply_landlock(options, abi)
            report.layers.append(layer)
            landlocked = True
        except OSError as exc:
            report.skipped["landlock"] = str(exc)
    else:
        report.skipped["landlock"] = "not available in this kernel" if options.landlock else "turned off"
    if own_uid:
        if unreadable and not landlocked:
            _capset(0, 0)  # read-search over the whole disk is safe only inside Landlock's rules
            raise SandboxError(
                f"the REPL worker (uid {options.uid}) cannot read {unreadable[0]} without CAP_DAC_READ_SEARCH, "
                f"which it may keep only where Landlock confines it, and Landlock is "
                f"{report.skipped['landlock']}: make the Python installation readable by every user "
                "(chmod -R o+rX on it and its parent directories), or run on Linux 5.13+ with Landlock"
            )
        report.layers.insert(0, f"uid {options.uid}" + (" (+read-search, within Landlock)" if unreadable else ""))
    if ARCH in SYSCALLS:
        try:
            report.layers.append(
                apply_seccomp(
                    network=options.network,
                    protected_pids=options.protected_pids,
                    strict_signals=not own_uid and not scoped,
                )
            )
        except OSError as exc:
            report.skipped["seccomp"] = str(exc)
    else:
        report.skipped["seccomp"] = f"unsupported architecture {ARCH}"
    return report
