"""Where a run's files live, and the worker uids, shared safely by every server process on the host.

Files: each server process has a directory of its own, `<tmp>/rlm-instance-XXXX/`, made when first
needed and locked (flock) while it exists. In it, each run has `run-XXXX/` with `input.txt` (read-only
for the worker) and `work/` (the worker's cwd, HOME and TMPDIR), and uploads still arriving are spooled
to `upload-XXXX.txt`. A run's directory goes when the run ends, the process's directory when the last
engine holding it closes (the server shuts down). A server that starts removes the instance directories
whose lock nobody holds: those of processes that died without cleaning up (kill -9, a crash, a power
cut). It leaves alone those of live processes and of other users.

Uids (a server running as root): each run's worker gets an unprivileged uid of its own from a range
that every server process on the host shares. A uid is a process's while it holds an exclusive lock on
its file in a root-only directory; the kernel drops the lock when the process dies. A uid that some
process still runs as (left over, or used by software that takes no lock) is skipped, as is one that
names a user of the host, so runs never share a uid, and ending a run's processes by uid ends only
that run's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import pwd
import secrets
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path

log = logging.getLogger("rlm_service")

_UID_BASE = 61000
_UID_COUNT = 4000
_UID_LOCK_DIRS = (Path("/run/rlm-service/worker-uids"), Path("/tmp/rlm-service-worker-uids"))
_INSTANCE_PREFIX = "rlm-instance-"
_STAGING_PREFIX = "rlm-starting-"
MAX_ENTRIES = 100_000
"""Files and directories a run may keep in its working directory."""
_TOO_DEEP = "are nested deeper than the server can walk (a path past 4,096 characters)"
_TOKEN = f"{os.getpid()}-{secrets.token_hex(8)}\n"
"""Written into each uid's lock file by the process that takes it: who held it last."""


def kill_uid(uid: int) -> None:
    """SIGKILL every process that runs as `uid`."""
    for pid in _pids_of_uid(uid):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue


def _pids_of_uid(uid: int) -> list[int]:
    """Processes whose real uid is `uid`."""
    return _processes_by_uid().get(uid, [])


def _processes_by_uid() -> dict[int, list[int]]:
    """Every process by its real uid, zombies included (a zombie still counts against its uid's RLIMIT_NPROC),
    in one pass over /proc. Read from each process's status: the owner of /proc/<pid> is root for a process
    that is not dumpable, as workers are."""
    found: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status", "rb") as status:
                    text = status.read()
            except OSError:
                continue
            start = text.find(b"\nUid:\t") + 6
            if start > 5:
                found.setdefault(int(text[start : text.index(b"\t", start)]), []).append(int(entry))
    return found


def _private_directory(path: Path) -> Path:
    """`path`, created if missing; it must be a real directory that only root can write to."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
        raise RuntimeError(f"{path} must be a directory owned by root and writable by root only")
    return path


class _UidPool:
    """Hands each live run an unprivileged uid that no other run on the host has."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, int] = {}
        self._in_use: set[int] = set()
        """The pool's uids that processes ran as at the last pass over /proc."""
        self._directory: Path | None = None

    def _lock_directory(self) -> Path:
        if self._directory is None:
            problems = []
            for candidate in _UID_LOCK_DIRS:
                try:
                    self._directory = _private_directory(candidate)
                    break
                except (OSError, RuntimeError) as exc:
                    problems.append(str(exc))
            else:
                raise RuntimeError("no directory for worker uid locks: " + "; ".join(problems))
        return self._directory

    def take(self) -> int:
        """A uid for a new run. Each candidate is locked first, then checked against one fresh pass over /proc:
        from the moment its lock is ours no server can start a process as it, so the pass stays true for it.
        The uids that pass found in use are skipped by the next candidates and the next call without a pass
        of their own; each call's pass replaces them, so one found free again is given out again."""
        with self._lock:
            directory = self._lock_directory()
            for uid in range(_UID_BASE, _UID_BASE + _UID_COUNT):
                if uid in self._held or uid in self._in_use:
                    continue
                fd = self._lock_uid(directory, uid)
                if fd is None:
                    continue
                in_use = _processes_by_uid()
                self._in_use = {found for found in in_use if _UID_BASE <= found < _UID_BASE + _UID_COUNT}
                if uid in self._in_use:
                    os.close(fd)  # processes still running as it (left over, or software that takes no lock)
                    continue
                os.ftruncate(fd, 0)
                os.pwrite(fd, _TOKEN.encode(), 0)
                self._held[uid] = fd
                return uid
        raise RuntimeError("no free worker uid")

    def _lock_uid(self, directory: Path, uid: int) -> int | None:
        """The uid's lock file, locked: None if another process holds it or the uid names a user of this host."""
        fd = os.open(directory / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        held_last = os.pread(fd, 100, 0).decode("ascii", "replace") == _TOKEN
        if not held_last and _is_known_user(uid):
            os.close(fd)
            return None
        return fd

    def give_back(self, uid: int) -> None:
        with self._lock:
            fd = self._held.pop(uid, None)
            if fd is not None:
                os.close(fd)


def _is_known_user(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


UID_POOL = _UidPool()


class _Instance:
    """This process's directory for run files, locked while the process lives."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._root: Path | None = None
        self._fd: int | None = None
        self._holders = 0

    def directory(self) -> Path:
        with self._lock:
            if self._root is None:
                base = Path(tempfile.gettempdir())
                remove_stale_instances(base)
                staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=base))
                fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                fcntl.flock(fd, fcntl.LOCK_EX)  # before its name makes other servers look at it
                root = base / (_INSTANCE_PREFIX + staging.name[len(_STAGING_PREFIX) :])
                os.rename(staging, root)
                os.chmod(root, 0o711 if os.geteuid() == 0 else 0o700)  # workers of other uids pass through
                self._root, self._fd = root, fd
            return self._root

    def hold(self) -> Path:
        with self._lock:
            self._holders += 1
        return self.directory()

    def release(self) -> None:
        """The last holder gone (the server shutting down, its runs ended): the directory, and whatever
        its runs left in it, goes; a later use makes a new one."""
        with self._lock:
            if self._holders == 0:
                return  # an engine closed that never started
            self._holders -= 1
            if self._holders == 0 and self._root is not None and self._fd is not None:
                remove_tree(self._root)
                os.close(self._fd)
                self._root, self._fd = None, None


_INSTANCE = _Instance()


def instance_directory() -> Path:
    """This process's directory for run files; the first call also removes those of dead processes."""
    return _INSTANCE.directory()


def hold_instance_directory() -> Path:
    """`instance_directory()`, kept until as many `release_instance_directory()` calls (an engine's life)."""
    return _INSTANCE.hold()


def release_instance_directory() -> None:
    _INSTANCE.release()


def remove_stale_instances(base: Path) -> list[Path]:
    """Remove the instance directories in `base` that are ours (our uid) and that no live process holds."""
    removed = []
    for entry in os.scandir(base):
        if not entry.name.startswith(_INSTANCE_PREFIX):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its process is alive
        else:
            remove_tree(Path(entry.path))
            removed.append(Path(entry.path))
        finally:
            os.close(fd)
    return removed


def remove_tree(path: Path) -> None:
    """Delete `path` and everything under it, also directories a run made unreadable or unwritable, and trees
    nested deeper than `shutil.rmtree` goes (it recurses once a level, and raises RecursionError past the
    interpreter's limit)."""
    with contextlib.suppress(RecursionError):
        shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path) and os.geteuid() != 0:
        _open_up(path)
        with contextlib.suppress(RecursionError):
            shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        _remove_deep(path)


_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _remove_deep(path: Path) -> None:
    """Delete the directory `path` and everything under it however deep, without recursion and holding two
    descriptors at a time: each directory is entered by its descriptor and left through "..", which must be the
    directory it was entered from (else nothing more is deleted: nothing outside `path` is ever touched)."""
    try:
        fd = os.open(path, _DIRECTORY)
    except OSError:
        return
    above: list[tuple[str, tuple[int, int], list[str]]] = []
    """For each directory entered below `path`: its name, its parent's identity, the parent's subdirectories left."""
    try:
        pending = _unlink_files(fd)
        while pending or above:
            if pending:
                name = pending.pop()
                parent = os.fstat(fd)
                try:
                    child = _open_directory(name, fd)
                except OSError:
                    continue
                above.append((name, (parent.st_dev, parent.st_ino), pending))
                os.close(fd)
                fd = child  # at once: `fd` is always the one descriptor the `finally` below closes
                try:
                    pending = _unlink_files(fd)
                except OSError:  # not listed (out of descriptors, say): left, and the rest still goes
                    pending = []
                continue
            name, identity, pending = above.pop()
            parent_fd = os.open("..", _DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = parent_fd
            parent = os.fstat(fd)
            if (parent.st_dev, parent.st_ino) != identity:
                return
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=fd)
    except OSError:
        return
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _unlink_files(fd: int) -> list[str]:
    """Delete what the directory `fd` holds but directories; returns their names."""
    directories = []
    with os.scandir(fd) as entries:
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    directories.append(entry.name)
                else:
                    os.unlink(entry.name, dir_fd=fd)
            except OSError:
                continue
    return directories


def _open_directory(name: str, parent: int) -> int:
    try:
        return os.open(name, _DIRECTORY, dir_fd=parent)
    except PermissionError:
        if os.geteuid() == 0:
            raise
        os.chmod(name, 0o700, dir_fd=parent)  # a run cannot hide a directory from a server of its own uid
        return os.open(name, _DIRECTORY, dir_fd=parent)


def _open_up(path: Path) -> None:
    """Give the owner back access to every directory under `path` (a non-root server needs it to delete)."""
    stack = [str(path)]
    while stack:
        directory = stack.pop()
        try:
            os.chmod(directory, 0o700)
            with os.scandir(directory) as entries:
                stack.extend(entry.path for entry in entries if entry.is_dir(follow_symlinks=False))
        except OSError:
            continue


class Workspace:
    """Owns the run directory; `input_path` is where `context` is read from."""

    def __init__(self, root: Path, *, worker_uid: int | None) -> None:
        self.root = root
        self.input_path = root / "input.txt"
        self.workdir = root / "work"
        self.worker_uid = worker_uid

    @classmethod
    def create(cls, *, isolate_uid: bool = True) -> Workspace:
        uid = UID_POOL.take() if isolate_uid and os.geteuid() == 0 else None
        try:
            root = Path(tempfile.mkdtemp(prefix="run-", dir=instance_directory()))
        except BaseException:
            if uid is not None:
                UID_POOL.give_back(uid)
            raise
        workspace = cls(root, worker_uid=uid)
        try:
            workspace.workdir.mkdir(mode=0o700)
            if uid is not None:
                os.chmod(root, 0o711)
                os.chown(workspace.workdir, uid, uid)
        except BaseException:  # (a full disk, say) the run fails; its directory and uid must not stay taken
            workspace.remove()
            raise
        return workspace

    def adopt_input(self, source: Path) -> None:
        """Move an already spooled input file in (it must be on the same filesystem, or it is copied)."""
        try:
            os.replace(source, self.input_path)
        except OSError:
            shutil.copyfile(source, self.input_path)
            source.unlink(missing_ok=True)
        self._protect_input()

    def write_input(self, text: str) -> None:
        with open(self.input_path, "w", encoding="utf-8", errors="replace", newline="") as handle:
            handle.write(text)
        self._protect_input()

    def _protect_input(self) -> None:
        if self.worker_uid is not None:
            os.chown(self.input_path, self.worker_uid, self.worker_uid)
        os.chmod(self.input_path, 0o400)

    def over_disk_limit(self, limit: int) -> str | None:
        """What is wrong when the working directory takes more than `limit` bytes of disk or holds more
        than `MAX_ENTRIES` files and directories; None when it does not. Stops counting at the first."""
        used, entries = 0, 0
        stack = [str(self.workdir)]
        while stack:
            directory = stack.pop()
            try:
                listing = list(os.scandir(directory))
            except FileNotFoundError:
                continue
            except PermissionError:
                if os.geteuid() == 0:
                    raise
                _open_up(Path(directory))  # a run cannot hide a directory from a server of its own uid
                try:
                    listing = list(os.scandir(directory))
                except OSError:
                    return "include a directory the server cannot read"
            except OSError as exc:
                if exc.errno != errno.ENAMETOOLONG:
                    raise
                return _TOO_DEEP
            for entry in listing:
                entries += 1
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno != errno.ENAMETOOLONG:
                        raise
                    return _TOO_DEEP
                used += info.st_blocks * 512
                if stat.S_ISDIR(info.st_mode):
                    stack.append(entry.path)
            if used > limit:
                return f"take more than {limit // 2**20:,} MB of disk"
            if entries > MAX_ENTRIES:
                return f"are more than {MAX_ENTRIES:,} files and directories"
        return None

    def empty_workdir(self) -> None:
        """Delete everything in the working directory, leaving the directory itself."""
        for entry in os.scandir(self.workdir):
            if entry.is_dir(follow_symlinks=False):
                remove_tree(Path(entry.path))
            else:
                Path(entry.path).unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the run's files, then give its uid back. A uid whose files could not all be deleted stays taken
        until the server stops: given to a later run, it would own what is left of this run's."""
        remove_tree(self.root)
        if self.worker_uid is None:
            return
        if os.path.lexists(self.root):
            log.warning(
                "the files of a run stay in %s (not all could be deleted); its worker uid %d is not given "
                "out again until the server stops",
                self.root,
                self.worker_uid,
            )
        else:
            UID_POOL.give_back(self.worker_uid)
        self.worker_uid = None
