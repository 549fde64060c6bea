"""Hardening of the server process itself, applied once at start by `main.py`.

Generated code runs in workers that must not learn the server's secrets. Two things protect the
secrets the server was started with:

- the server marks itself non-dumpable, so `/proc/<server pid>/environ` and `/mem` need
  CAP_SYS_PTRACE, which no worker has (workers drop every capability, and run as another uid when
  the server is root);
- the secret values are wiped from the process's original environment block, the memory that
  `/proc/<pid>/environ` shows, and removed from `os.environ`, so even a reader with privileges finds
  nothing there. Settings have already been read by then.
"""

from __future__ import annotations

import ctypes
import logging
import os

from .repl.procstat import stat_fields

log = logging.getLogger("rlm_service")

SECRET_VARIABLES = ("OPENAI_API_KEY", "RLM_API_TOKEN", "RLM_DATABASE_URL")
"""Compared without case, as the settings read them (`openai_api_key=…` is the key too)."""
PR_SET_DUMPABLE = 4
MIN_SECRET_CHARS = 8
"""Shorter "keys" are placeholders (`x`, `none`), as local servers take: hiding them would garble text."""


def redact(text: str, secret: str | None) -> str:
    """`text` with every occurrence of `secret` replaced by `***`: for error messages that may quote the
    key back (a model server's 401 body), before they reach generated code, events or logs."""
    if secret and len(secret) >= MIN_SECRET_CHARS:
        return text.replace(secret, "***")
    return text


def _environment_block() -> tuple[int, bytes] | None:
    """The address and contents of this process's original environment block."""
    bounds = stat_fields("self", 50, 51)  # env_start, env_end
    if bounds is None:
        return None
    env_start, env_end = bounds
    return env_start, ctypes.string_at(env_start, env_end - env_start)


def wipe_secrets_from_environment(names: tuple[str, ...] = SECRET_VARIABLES) -> int:
    """Zero the values of `names` in the original environment block and drop them from `os.environ`.

    Returns how many values were wiped in the block.
    """
    wiped = 0
    secret = {name.upper() for name in names}
    block = _environment_block()
    if block is not None:
        start, contents = block
        offset = 0
        for entry in contents.split(b"\0"):
            name, sep, value = entry.partition(b"=")
            if sep and name.decode("latin-1").upper() in secret and value:
                ctypes.memset(start + offset + len(name) + 1, 0, len(value))
                wiped += 1
            offset += len(entry) + 1
    for variable in [variable for variable in os.environ if variable.upper() in secret]:
        del os.environ[variable]
    return wiped


def make_non_dumpable() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)
    except OSError:
        return False


def harden_server_process() -> None:
    """Apply both protections; log what could not be done."""
    if not make_non_dumpable():
        log.warning("could not mark the server non-dumpable; workers of the same user may read its memory")
    wipe_secrets_from_environment()
