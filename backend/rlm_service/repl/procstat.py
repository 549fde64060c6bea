"""Fields of `/proc/<pid>/stat`, read by the server and by the worker zygote (standard library only)."""

from __future__ import annotations


def stat_fields(pid: int | str, *numbers: int) -> tuple[int, ...] | None:
    """The numeric fields of process `pid` (`"self"`: this one) numbered as in proc(5), e.g. 4 the parent's pid,
    22 the start time, 50 and 51 the environment's bounds; None if there is no such process. They are counted
    after the command name (field 2), which may hold spaces and parentheses."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            after_name = stat.read().rsplit(b")", 1)[1].split()  # field 3 onwards
        return tuple(int(after_name[number - 3]) for number in numbers)
    except (OSError, ValueError, IndexError):
        return None
