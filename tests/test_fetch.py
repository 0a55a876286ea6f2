"""`fetch` on the local backend (the same implementation as the gateway's, backend/store/fetch.py):
a job's result and thumbnail come back as bytes in bounded chunks, and nothing outside the
job folder (or through a link) can be read."""

from __future__ import annotations

import os

import pytest

from backend.errors import BackendError
from backend.wire import protocol
from tests.test_server import collect_until


@pytest.fixture
def done_job(make_server, image_png):
    s = make_server("preview")
    job_id = s.client.generate(image_png, {"preset": "fast"})
    assert collect_until(s.client, job_id)[-1].msg_type == "job_done"
    return s, job_id


def test_result_and_thumbnail_come_back_chunk_by_chunk_equal_to_the_files(done_job):
    s, job_id = done_job
    folder = s.client.job(job_id)["folder"]
    for name in ("result.glb", "thumbnail.png"):
        with open(f"{folder}/{name}", "rb") as f:
            on_disk = f.read()
        size = len(on_disk)
        assert size > 100, name
        chunk = max(1, size // 5)  # several requests, the last one short
        sent = s.client.stats()["requests"].get("fetch", 0)
        assert s.client.download(job_id, name, chunk=chunk) == on_disk
        asked = s.client.stats()["requests"]["fetch"] - sent
        assert asked == -(-size // chunk)
    reply, data = s.client.fetch(job_id, "result.glb", 0, length=1 << 30)
    assert len(data) == min(reply["size"], protocol.FETCH_MAX) and reply["eof"] is True
    reply, data = s.client.fetch(job_id, "result.glb", reply["size"] + 10)
    assert data == b"" and reply["eof"] is True and reply["length"] == 0


@pytest.mark.parametrize(
    ("job", "name", "offset", "length", "code"),
    [
        ("JOB", "../job.json", 0, 100, "not_found"),
        ("JOB", "..", 0, 100, "not_found"),
        ("JOB", "/etc/passwd", 0, 100, "not_found"),
        ("JOB", ".hidden", 0, 100, "not_found"),
        ("JOB", "no-such-file.glb", 0, 100, "not_found"),
        ("JOB", "link.glb", 0, 100, "not_found"),  # a symbolic link is never followed
        ("JOB", "result.glb", -1, 100, "bad_params"),
        ("JOB", "result.glb", 0, 0, "bad_params"),
        ("20990101-000000-abcdef", "result.glb", 0, 100, "not_found"),
        ("../../etc", "passwd", 0, 100, "not_found"),
    ],
)
def test_bad_names_paths_jobs_and_offsets_are_typed_errors(
    done_job, job, name, offset, length, code
):
    s, job_id = done_job
    folder = s.client.job(job_id)["folder"]
    os.symlink(f"{folder}/result.glb", f"{folder}/link.glb")
    with pytest.raises(BackendError) as refused:
        s.client.fetch(job_id if job == "JOB" else job, name, offset, length)
    assert refused.value.code.value == code
    assert s.client.ping()["pong"] is True  # the backend goes on
