"""A run's private directory: the input file and the worker's working directory.

Layout: `<tmp>/rlm-run-XXXX/input.txt` (read-only for the worker) and `<tmp>/rlm-run-XXXX/work/`
(the worker's cwd, HOME and TMPDIR). Everything goes when the run ends, whatever the outcome.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

_UID_BASE = 61000
_UID_COUNT = 4000


class _UidPool:
    """Hands each live run its own unprivileged uid when the server runs as root."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken: set[int] = set()

    def take(self) -> int:
        with self._lock:
            for uid in range(_UID_BASE, _UID_BASE + _UID_COUNT):
                if uid not in self._taken:
                    self._taken.add(uid)
                    return uid
        raise RuntimeError("no free worker uid")

    def give_back(self, uid: int) -> None:
        with self._lock:
            self._taken.discard(uid)


UID_POOL = _UidPool()


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
        root = Path(tempfile.mkdtemp(prefix="rlm-run-"))
        workspace = cls(root, worker_uid=uid)
        workspace.workdir.mkdir()
        if uid is not None:
            os.chmod(root, 0o711)
            os.chown(workspace.workdir, uid, uid)
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

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self.worker_uid is not None:
            UID_POOL.give_back(self.worker_uid)
            self.worker_uid = None
