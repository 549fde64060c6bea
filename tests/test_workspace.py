"""Deleting a run's directory however its code left it (repl/workspace.py)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rlm_service.repl import workspace as workspace_module


def test_a_directory_that_cannot_be_listed_leaves_the_rest_deleted_and_no_descriptor_closed_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deletion of a deep tree enters a directory it then cannot list (out of descriptors, say). Old behaviour
    caught: it closed the directory it came from, kept that number as its own, and closed it again on the way out,
    which was by then another descriptor of the server (here, `victim`: another thread's file, a client's
    socket); and it gave up on the directories still to delete."""
    root = tmp_path / "run"
    (root / "unlisted" / "below").mkdir(parents=True)
    for n in range(5):
        (root / f"sibling{n}").mkdir()
        (root / f"sibling{n}" / "file").write_text("x")
    unlisted = (root / "unlisted").stat().st_ino
    scandir = os.scandir
    victims: list[int] = []

    def failing(path: int) -> Iterator[os.DirEntry[str]]:
        if isinstance(path, int) and os.fstat(path).st_ino == unlisted:
            victims.append(os.open(tmp_path / "victim", os.O_WRONLY | os.O_CREAT))  # the lowest number free
            raise OSError(errno.EMFILE, "Too many open files")
        return scandir(path)

    monkeypatch.setattr(workspace_module.os, "scandir", failing)
    try:
        workspace_module._remove_deep(root)
        assert victims
        os.fstat(victims[0])  # still open
    finally:
        monkeypatch.undo()
        for victim in victims:
            os.close(victim)
    assert sorted(path.name for path in root.iterdir()) == ["unlisted"]


def test_a_tree_deeper_than_rmtree_goes_is_deleted_without_following_its_links(tmp_path: Path) -> None:
    """1,500 nested directories (past the recursion `shutil.rmtree` manages) with, at the bottom, links to a
    directory and a file outside the run's: the tree goes, what the links point to stays."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("kept")
    root = tmp_path / "run"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(1500):
            os.mkdir("d", dir_fd=fd)
            deeper = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = deeper
        os.symlink(outside, "dir-link", dir_fd=fd)
        os.symlink(outside / "keep", "file-link", dir_fd=fd)
    finally:
        os.close(fd)
    workspace_module.remove_tree(root)
    assert not root.exists()
    assert (outside / "keep").read_text() == "kept"


@pytest.mark.skipif(os.geteuid() != 0, reason="a uid of its own per run: the server as root")
def test_a_uid_whose_files_stay_is_not_given_out_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's files that could not all be deleted keep its worker uid taken: a later run given the uid would own
    what is left of them. Old behaviour caught (the review): the uid was given back whatever the deletion did."""
    run = workspace_module.Workspace.create()
    kept = run.worker_uid
    assert kept is not None
    monkeypatch.setattr(workspace_module, "remove_tree", lambda path: None)  # nothing deleted
    run.remove()
    monkeypatch.undo()
    taken: list[int] = []
    try:
        # uids are given out lowest first: the first at or past `kept` would be `kept` if it were free
        while not taken or taken[-1] < kept:
            taken.append(workspace_module.UID_POOL.take())
        assert taken[-1] != kept
    finally:
        for uid in taken:
            workspace_module.UID_POOL.give_back(uid)
        workspace_module.remove_tree(run.root)
        workspace_module.UID_POOL.give_back(kept)


def test_a_workspace_that_cannot_be_made_leaves_no_directory_and_gives_its_uid_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run's workspace whose working directory cannot be made (the disk filled up between its two directories,
    say) fails the run. Old behaviour caught: the run's directory stayed, and its worker uid stayed taken, until the
    server stopped."""
    pool = workspace_module.UID_POOL
    taken: list[int] = []
    take, make_directory = pool.take, os.mkdir

    def take_and_note() -> int:
        taken.append(take())
        return taken[-1]

    def mkdir(path: str | os.PathLike[str], *args: Any, **kwargs: Any) -> None:
        if os.path.basename(path) == "work":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
        make_directory(path, *args, **kwargs)

    before = set(workspace_module.instance_directory().iterdir())
    monkeypatch.setattr(pool, "take", take_and_note)
    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(OSError, match="No space left"):
        workspace_module.Workspace.create()
    monkeypatch.undo()
    assert set(workspace_module.instance_directory().iterdir()) == before
    assert not any(uid in pool._held for uid in taken)
