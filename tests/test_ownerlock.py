"""One owner per output folder: OS locks that name their holder, die with their process and
follow the folder when it is deleted and made again."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import pytest

from backend.errors import BackendError, ErrorCode
from backend.store.jobs import JobStore
from backend.store.ownerlock import BACKEND_LOCK, OWNER_LOCK, OutputLock, OutputLocked
from tests.conftest import ROOT

HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from backend.store.ownerlock import OutputLock
lock = OutputLock({folder!r}, "owner.lock", "supervisor", "/run/x/backend.json")
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_holder_is_refused_with_the_owner_named(tmp_path):
    first = OutputLock(tmp_path / "out", OWNER_LOCK, "supervisor", tmp_path / "run" / "b.json")
    first.acquire()
    second = OutputLock(tmp_path / "out", OWNER_LOCK, "supervisor")
    with pytest.raises(OutputLocked) as err:
        second.acquire()
    error = err.value
    assert error.code is ErrorCode.OUTPUT_LOCKED and not error.retryable
    assert error.owner["role"] == "supervisor" and error.owner["host"]
    assert f"pid {error.owner['pid']}" in error.message and str(tmp_path / "out") in error.message
    assert str(tmp_path / "run" / "b.json") in error.hint  # so the add-on can connect to it
    assert error.to_dict()["owner"] == error.owner
    assert BackendError.from_dict(error.to_dict()).code is ErrorCode.OUTPUT_LOCKED
    first.release()
    second.acquire()  # free again
    assert second.held and not first.held
    second.release()


def test_the_lock_of_another_process_names_it_and_dies_with_it(tmp_path):
    folder = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(root=str(ROOT), folder=str(folder))],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        lock = OutputLock(folder, OWNER_LOCK, "supervisor")
        with pytest.raises(OutputLocked) as err:
            lock.acquire()
        assert err.value.owner["pid"] == holder.pid
        assert err.value.owner["connection_file"] == "/run/x/backend.json"
        holder.send_signal(signal.SIGKILL)  # no cleanup at all: the kernel drops the lock
        holder.wait(30)
        lock.acquire()
        assert lock.held
        lock.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(30)


def test_a_deleted_and_remade_folder_is_locked_again(tmp_path):
    folder = tmp_path / "out"
    lock = OutputLock(folder, BACKEND_LOCK, "backend")
    lock.acquire()
    assert lock.current()
    shutil.rmtree(folder)
    assert lock.held and not lock.current()  # our lock is on a file that no longer exists
    lock.acquire()  # takes the new folder's lock
    assert lock.current()
    with pytest.raises(OutputLocked):
        OutputLock(folder, BACKEND_LOCK, "backend").acquire()
    lock.release()


def test_a_store_writes_only_while_it_holds_its_locks(tmp_path):
    out = tmp_path / "out"
    mine = JobStore(out, locks=[OutputLock(out, BACKEND_LOCK, "backend")])
    with pytest.raises(BackendError) as err:
        mine.create("generate", "slow", {})
    assert err.value.code is ErrorCode.OUTPUT_LOCKED  # not claimed yet
    mine.claim()
    job = mine.create("generate", "slow", {})
    other = JobStore(out, locks=[OutputLock(out, BACKEND_LOCK, "backend")])
    with pytest.raises(OutputLocked):
        other.claim()
    assert other.get(job.id).id == job.id  # reading needs no lock
    shutil.rmtree(out)  # the user deletes the folder: the store takes the new one's lock
    again = mine.create("generate", "slow", {})
    assert mine.get(again.id).state.value == "queued"
    with pytest.raises(OutputLocked):
        JobStore(out, locks=[OutputLock(out, BACKEND_LOCK, "backend")]).claim()
    mine.release()


def test_the_lock_file_is_private_and_never_a_link(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("outside")
    (out / OWNER_LOCK).symlink_to(victim)
    lock = OutputLock(out, OWNER_LOCK, "supervisor")
    with pytest.raises(OSError, match="symbolic link"):
        lock.acquire()
    assert victim.read_text() == "outside"
    (out / OWNER_LOCK).unlink()
    lock.acquire()
    assert (out / OWNER_LOCK).stat().st_mode & 0o777 == 0o600
    lock.release()
