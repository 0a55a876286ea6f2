"""The history through the protocol: `jobs` pages, searches and reports disk use; `delete_jobs`
removes finished jobs (one, or those older than N days) and never a queued or running one."""

from __future__ import annotations

import time

import pytest

from backend.errors import BackendError, ErrorCode
from backend.store.jobs import JobStore
from tests.conftest import png_bytes

WAIT = 30.0
FAST = {"steps": "1", "step_seconds": "0.001"}


def finish(s, job_ids):
    deadline = time.monotonic() + WAIT
    for job_id in job_ids:
        while s.client.job(job_id)["job"]["state"] not in ("done", "failed", "cancelled"):
            assert time.monotonic() < deadline
            time.sleep(0.02)


def generate(s, names):
    return [s.client.generate(png_bytes(), {"preset": "fast"}, f"{name}.png") for name in names]


def test_every_job_is_reachable_by_pages_and_by_search(make_server):
    s = make_server(engine_options=FAST)
    ids = generate(s, ["duck", "mug", "robot", "duck_two", "plant"])
    finish(s, ids)
    pages, offset = [], 0
    while True:
        reply = s.client.request("jobs", {"limit": 2, "offset": offset})
        assert reply["total"] == 5 and reply["offset"] == offset
        if not reply["jobs"]:
            break
        pages.append([j["job_id"] for j in reply["jobs"]])
        offset += 2
    assert [len(p) for p in pages] == [2, 2, 1]
    assert sorted(sum(pages, [])) == sorted(ids)  # each job exactly once
    assert sum(pages, []) == ids[::-1]  # newest first

    found = s.client.request("jobs", {"query": "DUCK", "limit": 10})
    assert found["total"] == 2
    assert {j["filename"] for j in found["jobs"]} == {"duck.png", "duck_two.png"}
    assert s.client.request("jobs", {"query": "duck two", "limit": 10})["total"] == 1
    assert s.client.request("jobs", {"query": "nothing-like-it"})["jobs"] == []


def test_summaries_say_where_a_job_lives_and_how_much_disk_it_uses(make_server):
    s = make_server(engine_options=FAST)
    (job_id,) = generate(s, ["duck"])
    finish(s, [job_id])
    (entry,) = s.client.request("jobs", {"limit": 1})["jobs"]
    folder = JobStore(s.config.output_dir).folder(job_id)
    assert entry["folder"] == str(folder)
    assert entry["bytes"] == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert entry["thumbnail"] == str(folder / "thumbnail.png")
    assert entry["input"] == str(folder / "input.png")
    assert entry["parent"] is None and entry["kind"] == "generate"


def test_delete_one_job_and_clear_old_ones_with_a_dry_run_first(make_server):
    s = make_server(engine_options=FAST)
    ids = generate(s, ["a", "b", "c"])
    finish(s, ids)
    sizes = {j["job_id"]: j["bytes"] for j in s.client.request("jobs")["jobs"]}

    gone = s.client.request("delete_jobs", {"job_id": ids[0]})
    assert gone["job_ids"] == [ids[0]] and gone["bytes"] == sizes[ids[0]]
    with pytest.raises(BackendError) as err:
        s.client.job(ids[0])
    assert err.value.code is ErrorCode.NOT_FOUND

    assert s.client.request("delete_jobs", {"older_than_days": 1})["count"] == 0  # all new
    preview = s.client.request("delete_jobs", {"older_than_days": 0, "dry_run": True})
    assert preview["count"] == 2 and preview["bytes"] == sizes[ids[1]] + sizes[ids[2]]
    assert s.client.request("jobs")["total"] == 2  # a dry run removes nothing
    cleared = s.client.request("delete_jobs", {"older_than_days": 0})
    assert sorted(cleared["job_ids"]) == sorted(ids[1:])
    assert s.client.request("jobs")["total"] == 0


def test_a_queued_or_running_job_is_never_deleted(make_server):
    s = make_server(engine_options={"steps": "200", "step_seconds": "0.02"})
    running, queued = generate(s, ["running", "queued"])
    for job_id in (running, queued):
        with pytest.raises(BackendError) as err:
            s.client.request("delete_jobs", {"job_id": job_id})
        assert err.value.code is ErrorCode.BUSY
    assert s.client.request("delete_jobs", {"older_than_days": 0})["count"] == 0
    for job_id in (queued, running):
        s.client.cancel(job_id)


@pytest.mark.parametrize(
    "content",
    [
        {},
        {"job_id": "20990101-000000-abcdef", "older_than_days": 1},
        {"older_than_days": -1},
        {"job_id": "../../etc"},
    ],
)
def test_bad_delete_requests_are_refused(make_server, content):
    s = make_server()
    with pytest.raises(BackendError) as err:
        s.client.request("delete_jobs", content)
    assert err.value.code in (ErrorCode.BAD_PARAMS, ErrorCode.NOT_FOUND)


def _list_by_next(store, monkeypatch) -> tuple[list[str], int, int]:
    """A whole listing as a client makes it: the first page, then `before: next` until the
    end (8 KiB replies: ~12 jobs a page). Returns (job ids, pages, records read after page 1)."""
    from types import SimpleNamespace

    from backend.server import handlers

    monkeypatch.setattr(handlers, "JOBS_REPLY_BUDGET", 8 << 10)
    backend = SimpleNamespace(store=store)
    first = handlers.on_jobs(backend, SimpleNamespace(content={"limit": 5000}))
    seen = [j["job_id"] for j in first["jobs"]]
    reads: list[str] = []
    real_get = JobStore.get
    monkeypatch.setattr(
        JobStore, "get", lambda self, name: reads.append(name) or real_get(self, name)
    )
    before, pages = first["next"], 1
    while before is not None:
        reply = handlers.on_jobs(
            backend, SimpleNamespace(content={"limit": 5000, "before": before})
        )
        assert reply["jobs"]
        seen += [j["job_id"] for j in reply["jobs"]]
        before, pages = reply["next"], pages + 1
    monkeypatch.setattr(JobStore, "get", real_get)
    return seen, pages, len(reads)


def test_following_next_lists_a_batch_once_each_in_the_first_pages_order(tmp_path, monkeypatch):
    """120 jobs made within a second or two (a batch): pages cut inside a second by the reply
    budget. The page's last job is the cursor, so the listing order must hold across pages:
    jobs were skipped and repeated when a page was cut by id but ordered by creation."""
    from backend.store import listing

    store = JobStore(tmp_path)
    made = [store.create("generate", "preview", {}, filename=f"o{i:03}.png").id for i in range(120)]
    seen, pages, _ = _list_by_next(store, monkeypatch)
    assert sorted(seen) == sorted(made)  # each job once
    assert seen == [r.id for r in listing.newest(store, None)[0]]  # in the listing order
    assert pages >= 8  # the budget cut the pages, not the limit of 5,000


def test_a_page_by_next_reads_only_as_far_as_the_reply_reaches(tmp_path, monkeypatch):
    """300 jobs, three a second. A page read `limit` records (here 5,000: every job below the
    cursor) to send a dozen: a whole listing read ~N^2 / 24 records. Now each job once, plus
    per page the cursor and the rest of the second the page stopped in."""
    now = iter(1_790_000_000 + 0.3 * i for i in range(10_000))
    store = JobStore(tmp_path, clock=lambda: next(now))
    made = [store.create("generate", "preview", {}, filename=f"o{i:03}.png").id for i in range(300)]
    seen, pages, reads = _list_by_next(store, monkeypatch)
    assert sorted(seen) == sorted(made) and pages >= 20
    assert reads <= len(made) + 4 * pages
