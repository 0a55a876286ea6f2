"""The job store as a trust boundary and a shared resource, attacked through real backend
processes: planted symbolic links, a permissive umask, another user's folders, a disk that
fills or turns read-only or is deleted under running jobs, and the protocol's own limits
(history paging, resent requests, cancel before a crash, stats)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend.errors import BackendError, ErrorCode
from backend.store.jobs import JobStore
from backend.wire import protocol
from backend.wire.client import TERMINAL_EVENTS, Client
from tests.conftest import png_bytes
from tests.reliability.support import ROOT, WAIT, record, scale

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="links, modes, mounts, /proc")

SLOW = "tests.cpu_engines:SlowEngine"
FAULT = "tests.reliability.engines:FaultFsEngine"
ROOT_USER = os.geteuid() == 0


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _ends(client: Client, job_ids, timeout: float = WAIT) -> dict[str, dict]:
    """The terminal event of every job, from one loop (waiting for one job at a time would
    drop the others' events); the backend is asked now and then, as PUB may drop events."""
    pending, ends = set(job_ids), {}
    deadline = time.monotonic() + timeout
    next_check = time.monotonic() + 2.0
    while pending:
        assert time.monotonic() < deadline, f"no end for {sorted(pending)}"
        for m in client.poll(0.2):
            job_id = m.content.get("job_id")
            if m.msg_type in TERMINAL_EVENTS and job_id in pending:
                ends[job_id] = dict(m.content, event=m.msg_type)
                pending.discard(job_id)
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + 2.0
            for job_id in sorted(pending):
                job = client.job(job_id)["job"]
                if job["state"] in ("done", "failed", "cancelled"):
                    ends[job_id] = dict(job.get("error") or {}, event=f"job_{job['state']}")
                    pending.discard(job_id)
    return ends


def _until(predicate, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _running(client: Client, job_id: str) -> bool:
    return client.job(job_id)["job"]["state"] == "running"


def _idle_status(client: Client) -> dict | None:
    """`status` once no job runs (a worker lets go of a job just after its last event)."""
    status = client.status()
    return None if status["running"] else status


def _refused(client: Client, code: ErrorCode) -> BackendError:
    with pytest.raises(BackendError) as err:
        client.generate(png_bytes((64, 64)))
    assert err.value.code is code, err.value
    assert err.value.hint and err.value.message
    return err.value


# -- links --------------------------------------------------------------------------------------


def test_planted_links_are_refused_and_nothing_outside_changes(backend_proc, tmp_path):
    out = tmp_path / "out"
    first = backend_proc("preview", output_dir=out)
    parent = first.client.generate(png_bytes((96, 96)), {"preset": "fast"})
    assert first.client.wait_for_job(parent, WAIT)["event"] == "job_done"
    assert first.stop() == 0

    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("glb", "cache_image", "cache_mask", "log"):
        (outside / name).write_bytes(f"outside file {name}\n".encode())
    (outside / "stats.jsonl").write_text('{"kind": "job", "job_id": "secret-job"}\n')
    (outside / "image.png").write_bytes(png_bytes((32, 32)))
    fake = outside / "fakejob"
    fake.mkdir()
    store = JobStore(out)
    queued = {name: store.create("generate", "preview", {}, image=png_bytes()).id for name in "ABC"}
    jobs = out / "jobs"
    plants = {
        f"{queued['A']}/result.tmp.glb": outside / "glb",
        f"{queued['B']}/preview_cache_image.png": outside / "cache_image",
        f"{queued['B']}/preview_cache_mask.png": outside / "cache_mask",
        f"{queued['C']}/log.txt": outside / "log",
        f"{parent}/preview_cache_image.png": outside / "image.png",
        f"{parent}/preview_cache_mask.png": outside / "image.png",
    }
    for where, target in plants.items():
        (jobs / where).unlink(missing_ok=True)
        (jobs / where).symlink_to(target)
    linked_job = "20990101-000000-abcdef"  # a job folder that is itself a link
    (fake / "job.json").write_text(
        json.dumps(
            {"id": linked_job, "kind": "generate", "state": "queued", "engine": "x", "params": {}}
        )
    )
    (fake / "input.png").write_bytes(png_bytes())
    (jobs / linked_job).symlink_to(fake)
    (out / "state" / "stats.jsonl").unlink()
    (out / "state" / "stats.jsonl").symlink_to(outside / "stats.jsonl")
    before = _snapshot(outside)

    b = backend_proc("preview", output_dir=out)  # recovers A, B, C: each has a link
    ends = _ends(b.client, queued.values())
    for end in ends.values():
        assert end["event"] == "job_failed", end
        assert end["code"] == "output_unwritable" and "symbolic link" in end["message"], end
    reexport = b.client.reexport(parent, {"texture_size": 512})  # its parent's cache: links
    end = b.client.wait_for_job(reexport, WAIT)
    assert end["event"] == "job_failed" and end["code"] == "output_unwritable", end
    reply = b.client.request("job", {"job_id": queued["C"], "log": True})
    assert "outside file" not in (reply["log"] or "") and "log.txt" not in reply["files"]
    with pytest.raises(BackendError) as err:
        b.client.job(linked_job)
    assert err.value.code is ErrorCode.NOT_FOUND
    listing = b.client.jobs(limit=100)
    assert linked_job not in {j["job_id"] for j in listing["jobs"]}
    assert any(linked_job in w for w in listing["warnings"])
    stats = b.client.stats()
    assert "secret-job" not in json.dumps(stats)
    good = b.client.generate(png_bytes((64, 64)))  # the backend is fine
    assert b.client.wait_for_job(good, WAIT)["event"] == "job_done"
    assert b.stop() == 0
    assert _snapshot(outside) == before, "a file outside the store changed"
    record(
        "links",
        {
            "links_planted": len(plants) + 2,
            "jobs_refused": len(ends) + 1,
            "codes": sorted({e["code"] for e in ends.values()}),
            "outside_files_changed": 0,
            "outside_content_served": False,
        },
    )


def test_a_logs_folder_that_is_a_link_is_never_written_or_pruned(tmp_path):
    from backend.supervision.supervisor import BackendSpec, RespawnPolicy, Supervisor

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    for i in range(4):
        old = elsewhere / f"backend-2000010{i}-000000-00000{i}-{100 + i}.log"
        old.write_text("not yours\n")
        os.utime(old, (1000, 1000))
    (out / "logs").symlink_to(elsewhere)
    before = _snapshot(elsewhere)
    spec = BackendSpec(
        output_dir=out,
        connection_file=tmp_path / "run" / "b.json",
        engine="preview",
        min_free_disk_mb=1,
        keep_logs=1,
    )
    sup = Supervisor(spec, RespawnPolicy(fresh_per_job=True))
    try:
        sup.start_and_wait(WAIT)
        job = sup.submit(png_bytes((64, 64)))
        assert sup.wait_for_job(job, WAIT)["state"] == "done"
        log_path = sup.log_path
        assert log_path is not None and elsewhere not in log_path.parents
        assert "backend" in log_path.read_text()  # the logs went to a private folder instead
    finally:
        sup.stop(timeout=15)
    assert _snapshot(elsewhere) == before


# -- modes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_every_folder_is_0700_and_every_file_0600_whatever_the_umask(tmp_path, umask):
    out, run = tmp_path / "out", tmp_path / "run" / "deeper"
    conn = run / "backend.json"
    command = [sys.executable, "-m", "backend", "supervise", "--connection-file", str(conn)]
    command += ["--output-dir", str(out), "--min-free-disk-mb", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cli = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: os.umask(umask),  # noqa: PLW1509 - the attack is the umask
    )
    try:
        info = _until(lambda: _conn(conn), "the connection file")
        with Client(info) as client:
            client.hello(timeout=WAIT)
            job = client.generate(png_bytes((96, 96)), {"preset": "fast"})
            assert client.wait_for_job(job, WAIT)["event"] == "job_done"
            again = client.reexport(job, {"texture_size": 512})
            assert client.wait_for_job(again, WAIT)["event"] == "job_done"
            modes = _modes(out) | _modes(tmp_path / "run")
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(WAIT) == 0
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    wrong = {path: oct(m) for path, (kind, m) in modes.items() if m != (0o700 if kind else 0o600)}
    assert not wrong, wrong
    names = {Path(p).name for p in modes}
    assert {"result.glb", "preview_cache_image.png", "input.png", "stats.jsonl"} <= names
    assert {"owner.lock", "backend.lock", "logs", "backend.json"} <= names
    record(
        f"modes_umask_{umask:03o}",
        {
            "umask": f"{umask:03o}",
            "folders": sum(1 for kind, _ in modes.values() if kind),
            "files": sum(1 for kind, _ in modes.values() if not kind),
            "not_private": len(wrong),
        },
    )


def _conn(path: Path):
    try:
        return protocol.read_connection_file(path)
    except BackendError:
        return None


def _modes(folder: Path) -> dict[str, tuple[bool, int]]:
    out = {}
    for p in [folder, *folder.rglob("*")]:
        st = p.lstat()
        out[str(p)] = (stat.S_ISDIR(st.st_mode), stat.S_IMODE(st.st_mode))
    return out


@pytest.mark.skipif(not ROOT_USER, reason="chown needs root")
def test_a_connection_folder_of_another_user_is_refused(tmp_path, backend_proc):
    run = tmp_path / "run"
    run.mkdir(mode=0o777)
    os.chmod(run, 0o777)
    os.chown(run, 65534, 65534)  # another local user made it, and could swap files in it
    done = subprocess.run(
        [sys.executable, "-m", "backend", "serve", "--connection-file", str(run / "b.json")]
        + ["--output-dir", str(tmp_path / "out"), "--engine", "preview"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode != 0 and "another user" in done.stderr, done.stderr[-2000:]
    assert not (run / "b.json").exists()
    # A connection file another user wrote is not trusted either.
    b = backend_proc("preview")
    os.chown(b.conn, 65534, 65534)
    with pytest.raises(BackendError) as err:
        protocol.read_connection_file(b.conn)
    assert "another user" in err.value.message
    os.chown(b.conn, 0, 0)
    assert b.stop() == 0


# -- a full, read-only or deleted folder -------------------------------------------------------


def test_a_full_disk_while_writing_job_records_ends_every_job_and_recovers(backend_proc, tmp_path):
    """Injected ENOSPC exactly where the record is written (the fault hook of safefs)."""
    control = tmp_path / "fault"
    control.write_text("")
    out = tmp_path / "out"
    b = backend_proc(
        FAULT,
        "--engine-opt",
        "steps=8",
        "--engine-opt",
        "step_seconds=0.1",
        output_dir=out,
        env={"REL_FS_FAULT": str(control)},
    )
    jobs = [b.client.generate(png_bytes((64, 64))) for _ in range(3)]
    _until(lambda: _running(b.client, jobs[0]), "the first job to run")
    control.write_text("ENOSPC job.json")  # every record write fails from now on
    ends = _ends(b.client, jobs)
    assert {e["code"] for e in ends.values()} == {"disk_full"}, ends
    refused = _refused(b.client, ErrorCode.DISK_FULL)
    status = _until(lambda: _idle_status(b.client), "the backend to be idle")
    assert status["state"] == "ready" and not status["output"]["ok"] and status["queue"] == []
    assert sorted(status["output"]["unrecorded"]) == sorted(jobs)
    assert b.client.ping()["pong"] and b.alive()
    control.write_text("")  # space again: it recovers by itself
    _until(lambda: b.client.status()["output"]["ok"], "the store to recover")
    on_disk = {r.id: r for r in JobStore(out).list()[0]}
    assert all(on_disk[j].state.value == "failed" for j in jobs)
    assert all(on_disk[j].error["code"] == "disk_full" for j in jobs)
    again = b.client.generate(png_bytes((64, 64)))
    assert b.client.wait_for_job(again, WAIT)["event"] == "job_done"
    assert b.client.stats()["aggregate"]["jobs"] == 4  # each job once
    assert b.stop() == 0
    record(
        "disk_full_job_record",
        {
            "jobs": len(jobs),
            "ended_with": sorted({e["code"] for e in ends.values()}),
            "new_job_refused_with": refused.code.value,
            "recovered_by_itself": True,
            "records_written_after_recovery": len(jobs),
        },
    )


def test_a_disk_that_fills_under_running_jobs_then_stays_full(backend_proc, small_disk, tmp_path):
    """A real 8 MiB tmpfs, filled to the last byte while a job runs and two wait."""
    from backend.supervision.supervisor import BackendSpec, RespawnPolicy, Supervisor

    out = small_disk / "out"
    b = backend_proc(
        SLOW, "--engine-opt", "steps=10", output_dir=out, min_free_disk_mb=0
    )  # no threshold: the writes themselves must meet ENOSPC
    jobs = [b.client.generate(png_bytes((64, 64))) for _ in range(3)]
    _until(lambda: _running(b.client, jobs[0]), "the first job to run")
    filler = small_disk / "filler"
    _fill_completely(filler)
    ends = _ends(b.client, jobs)
    assert {e["code"] for e in ends.values()} == {"disk_full"}, ends
    _refused(b.client, ErrorCode.DISK_FULL)
    assert b.alive() and b.stop() == 0  # a clean stop with a full disk

    # The disk stays full: a new backend starts anyway, and so does a supervisor.
    again = backend_proc(SLOW, output_dir=out, min_free_disk_mb=0)
    _refused(again.client, ErrorCode.DISK_FULL)
    assert again.client.ping()["pong"]
    assert again.stop() == 0
    spec = BackendSpec(
        output_dir=out, connection_file=tmp_path / "run" / "s.json", engine=SLOW, min_free_disk_mb=0
    )
    sup = Supervisor(spec, RespawnPolicy(heartbeat_timeout=5.0))
    try:
        sup.start_and_wait(WAIT)
        with pytest.raises(BackendError) as err:
            sup.submit(png_bytes((64, 64)))
        assert err.value.code is ErrorCode.DISK_FULL
        filler.unlink()  # space again
        client = sup.client
        _until(lambda: client.status()["output"]["ok"], "the store to recover")
        job = sup.submit(png_bytes((64, 64)))
        assert sup.wait_for_job(job, WAIT)["state"] == "done"
        records = {r.id: r for r in JobStore(out).list()[0]}
        assert all(records[j].state.value == "failed" for j in jobs)  # written at last
    finally:
        sup.stop(timeout=15)
    record(
        "disk_full_real",
        {
            "jobs_running_or_queued": len(jobs),
            "ended_with": sorted({e["code"] for e in ends.values()}),
            "backend_started_on_full_disk": True,
            "supervisor_started_on_full_disk": True,
            "recovered_after_space_freed": True,
        },
    )


def _fill_completely(path: Path) -> None:
    """Write until the file system has not one byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (64 << 10, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


def test_a_read_only_output_folder(backend_proc, read_only, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ro = read_only(out)
    b = backend_proc(SLOW, "--engine-opt", "steps=10", output_dir=out)
    jobs = [b.client.generate(png_bytes((64, 64))) for _ in range(3)]
    _until(lambda: _running(b.client, jobs[0]), "the first job to run")
    ro.on()
    ends = _ends(b.client, jobs)
    assert {e["code"] for e in ends.values()} == {"output_unwritable"}, ends
    refused = _refused(b.client, ErrorCode.OUTPUT_UNWRITABLE)
    assert "This is a bug" not in refused.hint
    assert b.alive() and b.stop() == 0
    # Read-only from the start: the backend starts and refuses with the typed error.
    b2 = backend_proc(SLOW, output_dir=out)
    _refused(b2.client, ErrorCode.OUTPUT_UNWRITABLE)
    ro.off()  # writable again: it recovers by itself
    _until(lambda: b2.client.status()["output"]["ok"], "the store to recover")
    job = b2.client.generate(png_bytes((64, 64)))
    assert b2.client.wait_for_job(job, WAIT)["event"] == "job_done"
    records = {r.id: r for r in JobStore(out).list()[0]}
    assert all(records[j].state.value == "failed" for j in jobs)
    assert b2.stop() == 0
    record(
        "read_only",
        {
            "how": ro.how,
            "jobs": len(jobs),
            "ended_with": sorted({e["code"] for e in ends.values()}),
            "start_on_read_only": "started; refused jobs with output_unwritable",
            "recovered_by_itself": True,
        },
    )


def test_a_supervisor_starts_on_a_read_only_folder_and_recovers(read_only, tmp_path):
    from backend.supervision.supervisor import BackendSpec, RespawnPolicy, Supervisor

    out = tmp_path / "out"
    out.mkdir()
    ro = read_only(out)
    ro.on()
    spec = BackendSpec(
        output_dir=out, connection_file=tmp_path / "run" / "s.json", engine=SLOW, min_free_disk_mb=1
    )
    sup = Supervisor(spec, RespawnPolicy())
    try:
        sup.start_and_wait(WAIT)  # no traceback: its log goes elsewhere, the backend starts
        assert not sup.status()["owns_output_dir"]
        with pytest.raises(BackendError) as err:
            sup.submit(png_bytes((64, 64)))
        assert err.value.code is ErrorCode.OUTPUT_UNWRITABLE
        ro.off()

        def usable() -> bool:
            sup.tick()
            return sup.status()["owns_output_dir"] and sup.client.status()["output"]["ok"]

        _until(usable, "the supervisor and its backend to take the folder")
        job = sup.submit(png_bytes((64, 64)))
        assert sup.wait_for_job(job, WAIT)["state"] == "done"
    finally:
        sup.stop(timeout=15)


def test_a_deleted_output_folder(backend_proc, tmp_path):
    out = tmp_path / "out"
    b = backend_proc(SLOW, "--engine-opt", "steps=10", output_dir=out)
    jobs = [b.client.generate(png_bytes((64, 64))) for _ in range(3)]
    _until(lambda: _running(b.client, jobs[0]), "the first job to run")
    shutil.rmtree(out)  # the user deletes the whole folder under a running job
    ends = _ends(b.client, jobs)
    assert {e["code"] for e in ends.values()} == {"output_unwritable"}, ends
    job = b.client.generate(png_bytes((64, 64)))  # the next job makes the folder again
    assert b.client.wait_for_job(job, WAIT)["event"] == "job_done"
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    other = subprocess.run(  # and the backend owns the new folder: a second one is refused
        [sys.executable, "-m", "backend", "serve", "--connection-file", str(tmp_path / "c.json")]
        + ["--output-dir", str(out), "--engine", "preview"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert other.returncode == 73 and "in use by" in other.stderr, other.stderr[-2000:]
    assert b.stop() == 0
    record(
        "deleted_output_dir",
        {
            "jobs": len(jobs),
            "ended_with": sorted({e["code"] for e in ends.values()}),
            "next_job": "done (folder made again, 0700, locked)",
        },
    )


# -- history, resent requests, cancel and stats ----------------------------------------------


def test_every_unfinished_job_is_recovered_at_start(backend_proc, tmp_path):
    out = tmp_path / "out"
    store = JobStore(out)
    count = scale(40, 80)
    ids = [store.create("generate", "slow", {}, image=png_bytes((48, 48))).id for _ in range(count)]
    for job_id in ids[:5]:  # some were running when their backend died
        store.transition(job_id, "start")
    b = backend_proc(
        SLOW, "--engine-opt", "steps=1", "--engine-opt", "step_seconds=0", output_dir=out
    )
    ends = _ends(b.client, ids, timeout=WAIT * 4)
    assert all(e["event"] == "job_done" for e in ends.values())
    assert b.stop() == 0
    record("recover_all", {"unfinished_at_start": count, "recovered_and_done": len(ends)})


def test_a_long_history_is_paged_under_the_reply_limit(backend_proc, tmp_path):
    out = tmp_path / "out"
    jobs = out / "jobs"
    jobs.mkdir(parents=True)
    count = scale(2_500, 5_000)
    ids = set()
    for i in range(count):  # written directly: the store's fsyncs would make this slow
        job_id = f"20250101-{i // 3600:02d}{i // 60 % 60:02d}{i % 60:02d}-{i:06x}"
        (jobs / job_id).mkdir()
        payload = {
            "id": job_id,
            "kind": "generate",
            "state": "done",
            "engine": "preview",
            "params": {"preset": "balanced", "seed": i},
            "filename": f"a fairly long file name for job number {i}.png",
            "created": 1_735_689_600 + i,
            "result": {"glb_path": str(jobs / job_id / "result.glb"), "mesh_stats": {"v": i}},
        }
        (jobs / job_id / "job.json").write_text(json.dumps(payload))
        ids.add(job_id)
    b = backend_proc("preview", output_dir=out)
    seen, before, pages, largest = [], None, 0, 0
    while True:
        reply = b.client.request(
            "jobs", {"limit": 10_000, **({"before": before} if before else {})}
        )
        largest = max(largest, len(json.dumps(reply)))
        seen += [j["job_id"] for j in reply["jobs"]]
        pages += 1
        before = reply["next"]
        if before is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))
    assert pages > 1 and largest < protocol.MAX_JSON_FRAME
    assert b.stop() == 0
    record("paging", {"jobs": count, "pages": pages, "largest_reply_bytes": largest})


def test_a_resent_generate_with_its_key_makes_one_job(backend_proc, tmp_path):
    out = tmp_path / "out"
    b = backend_proc(SLOW, output_dir=out)
    image = png_bytes((64, 64))
    key = "client-7f3a-0001"
    first = b.client.request("generate", {"idempotency_key": key}, [image])
    again = b.client.request("generate", {"idempotency_key": key}, [image])  # timed out, resent
    assert again["job_id"] == first["job_id"] and again["duplicate"] is True
    assert b.client.wait_for_job(first["job_id"], WAIT)["event"] == "job_done"
    assert b.stop() == 0
    b2 = backend_proc(SLOW, output_dir=out)  # a later backend remembers the key (on disk)
    third = b2.client.request("generate", {"idempotency_key": key}, [image])
    assert third["job_id"] == first["job_id"] and third["state"] == "done"
    other = b2.client.generate(image)  # no key: a new job, as before
    assert other != first["job_id"]
    assert len(JobStore(out).list()[0]) == 2
    assert b2.stop() == 0
    record("idempotency", {"sends": 3, "jobs_made": 1})


def test_a_cancelled_job_stays_cancelled_across_a_crash(backend_proc, tmp_path):
    out = tmp_path / "out"
    # One slow step: the cancel is noticed only at the next checkpoint, after the crash.
    b = backend_proc(
        SLOW, "--engine-opt", "steps=2", "--engine-opt", "step_seconds=10", output_dir=out
    )
    job = b.client.generate(png_bytes((64, 64)))
    _until(lambda: _running(b.client, job), "the job to run")
    assert b.client.cancel(job)["state"] == "cancelling"
    _until(lambda: JobStore(out).get(job).cancel_requested, "the cancel to be on disk")
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait(WAIT)
    b2 = backend_proc(SLOW, output_dir=out)
    end = b2.client.wait_for_job(job, WAIT)
    assert end["event"] == "job_cancelled", end
    assert JobStore(out).log_excerpt(job).count("started on") <= 1  # never run again
    assert not (out / "jobs" / job / "result.glb").exists()
    assert b2.stop() == 0
    record("cancel_then_crash", {"state_after_restart": "cancelled", "runs": 1})
