"""safefs: no symbolic link is ever followed below a root, folders 0700 and files 0600 whatever
the umask, other users' files refused, and the fault hook that tests use for disk faults."""

from __future__ import annotations

import errno
import os
import stat
import sys

import pytest

from backend import safefs
from backend.safefs import Folder, UnsafePath

pytestmark = pytest.mark.skipif(not safefs.HANDLES, reason="POSIX directory handles")
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def outside(tmp_path):
    """A folder outside the tree, with a file that must never change."""
    folder = tmp_path / "outside"
    folder.mkdir()
    victim = folder / "victim.txt"
    victim.write_bytes(b"outside content")
    return victim


@pytest.fixture
def umask():
    def set_umask(value: int) -> None:
        os.umask(value)

    old = os.umask(0o022)
    os.umask(old)
    yield set_umask
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_link_at_any_name_is_refused_and_its_target_untouched(tmp_path, outside):
    tree = tmp_path / "tree"
    with Folder.root(tree) as root:
        os.symlink(outside, tree / "file")
        os.symlink(outside.parent, tree / "folder")
        with pytest.raises(UnsafePath, match="symbolic link"):
            root.read("file")
        with pytest.raises(UnsafePath, match="symbolic link"):
            root.read_tail("file", 10)
        with pytest.raises(UnsafePath, match="symbolic link"):
            root.append("file", b"appended")
        with pytest.raises(UnsafePath, match="symbolic link"):
            root.open_rw("file")
        with pytest.raises(UnsafePath, match="symbolic link"):
            root.sub("folder")
        with pytest.raises(UnsafePath, match="symbolic link"):
            root.sub("folder", create=True)
        root.write("file", b"replaced")  # the link itself is replaced, never written through
        assert not os.path.islink(tree / "file") and (tree / "file").read_bytes() == b"replaced"
        root.fresh("folder")  # a link where a file belongs is removed, not followed
        assert (tree / "folder").is_file() and outside.parent.is_dir()
        os.symlink(outside.parent, tree / "gone")
        root.remove_tree("gone")  # only the link goes
    assert outside.read_bytes() == b"outside content" and not (tree / "gone").exists()


def test_remove_tree_never_deletes_outside_through_links(tmp_path, outside):
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("x")
    os.symlink(outside.parent, tree / "a" / "b" / "escape")
    os.symlink(outside, tree / "a" / "victim")
    with Folder.root(tree) as root:
        root.remove_tree("a")
    assert not (tree / "a").exists()
    assert outside.read_bytes() == b"outside content"


def test_a_fifo_or_a_folder_is_not_read_as_a_file(tmp_path):
    tree = tmp_path / "tree"
    with Folder.root(tree) as root:
        os.mkfifo(tree / "fifo")  # opening it without O_NONBLOCK would hang forever
        (tree / "dir").mkdir()
        for name in ("fifo", "dir"):
            with pytest.raises(OSError):
                root.read(name)
        with pytest.raises(OSError):
            root.append("fifo", b"x")


def test_append_refuses_a_hard_link(tmp_path, outside):
    tree = tmp_path / "tree"
    with Folder.root(tree) as root:
        os.link(outside, tree / "stats.jsonl")
        with pytest.raises(UnsafePath, match="more than one link"):
            root.append("stats.jsonl", b"line\n")
    assert outside.read_bytes() == b"outside content"


@pytest.mark.parametrize("value", [0o000, 0o022, 0o277])
def test_folders_0700_and_files_0600_whatever_the_umask(tmp_path, umask, value):
    umask(value)
    tree = tmp_path / "a" / "b" / "tree"
    with Folder.root(tree) as root, root.sub("jobs", create=True) as jobs:
        jobs.mkdir("one")
        jobs.write("record.json", b"{}")
        jobs.append("stats.jsonl", b"line\n")
        os.close(jobs.create("backend.log"))
        os.close(jobs.open_rw("owner.lock"))
    umask(0o022)
    for folder in (
        tmp_path / "a",
        tmp_path / "a" / "b",
        tree,
        tree / "jobs",
        tree / "jobs" / "one",
    ):
        assert mode(folder) == 0o700, folder
    for name in ("record.json", "stats.jsonl", "backend.log", "owner.lock"):
        assert mode(tree / "jobs" / name) == 0o600, name


def test_existing_folders_lose_group_and_other_access(tmp_path):
    tree = tmp_path / "tree"
    (tree / "jobs").mkdir(parents=True)
    os.chmod(tree, 0o777)  # made by an older version under umask 000
    os.chmod(tree / "jobs", 0o755)
    (tree / "jobs" / "log").write_text("x")
    os.chmod(tree / "jobs" / "log", 0o666)
    with Folder.root(tree) as root, root.sub("jobs") as jobs:
        jobs.append("log", b"more")
    assert mode(tree) == 0o700 and mode(tree / "jobs") == 0o700
    assert mode(tree / "jobs" / "log") == 0o600


def test_a_named_folder_that_others_cannot_write_keeps_its_mode(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    with Folder.at(shared):
        pass
    assert mode(shared) == 0o755


@pytest.mark.skipif(not ROOT_USER, reason="chown needs root")
def test_another_users_folder_or_file_is_refused(tmp_path):
    tree = tmp_path / "tree"
    (tree / "jobs").mkdir(parents=True)
    (tree / "mine").mkdir()
    (tree / "mine" / "job.json").write_text("{}")
    os.chown(tree / "jobs", 65534, 65534)
    os.chown(tree / "mine" / "job.json", 65534, 65534)
    with Folder.root(tree) as root:
        with pytest.raises(UnsafePath, match="another user"):
            root.sub("jobs")
        with root.sub("mine") as mine, pytest.raises(UnsafePath, match="another user"):
            mine.read("job.json")
    other = tmp_path / "other-root"
    other.mkdir()
    os.chown(other, 65534, 65534)
    with pytest.raises(UnsafePath, match="another user"):
        Folder.root(other)


def test_names_must_be_one_component(tmp_path):
    with Folder.root(tmp_path / "tree") as root:
        for name in ("", ".", "..", "a/b", "../x", "a\x00b"):
            with pytest.raises(UnsafePath):
                root.read(name)


def test_the_fault_hook_fails_writes_and_leaves_no_temp_file(tmp_path, monkeypatch):
    def full(operation, path):
        if operation == "write":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with Folder.root(tmp_path / "tree") as root:
        root.write("kept", b"old")
        monkeypatch.setattr(safefs, "fault", full)
        with pytest.raises(OSError) as err:
            root.write("kept", b"new")
        assert err.value.errno == errno.ENOSPC
        monkeypatch.setattr(safefs, "fault", None)
        assert root.read("kept") == b"old"
        assert root.names() == ["kept"]


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/fd")
def test_folders_do_not_leak_descriptors(tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        with Folder.at(tmp_path / "tree", create=True) as folder:
            folder.write("x", b"1")
            folder.read("x")
            folder.entries()
    assert len(os.listdir("/proc/self/fd")) == before
