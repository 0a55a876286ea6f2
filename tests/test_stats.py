"""The stats log: each job counted once, a private file in a private folder, never a link."""

from __future__ import annotations

import os
import stat

from backend.store.stats import StatsLog, aggregate


def test_a_job_with_two_lines_counts_once_with_its_last_outcome(tmp_path):
    log = StatsLog(tmp_path / "state" / "stats.jsonl")
    log.append("job", job_id="a", outcome="done", seconds=1.0, level=0)
    log.append("job", job_id="b", outcome="done", seconds=2.0, level=0)
    # The same job again: recorded before its backend died, then settled for good.
    log.append("job", job_id="a", outcome="failed", error_code="disk_full")
    log.append("job", outcome="done", seconds=3.0)  # an old line without an id still counts
    figures = aggregate(log.read())
    assert figures["jobs"] == 3
    assert figures["outcomes"] == {"done": 2, "failed": 1}
    assert figures["failures_by_code"] == {"disk_full": 1}


def test_the_stats_file_is_private_and_never_written_through_a_link(tmp_path):
    state = tmp_path / "state"
    log = StatsLog(state / "stats.jsonl")
    log.append("ready", engine="slow", seconds=0.1)
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "stats.jsonl").st_mode) == 0o600
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"kind": "job", "job_id": "secret", "outcome": "done"}\n')
    (state / "stats.jsonl").unlink()
    (state / "stats.jsonl").symlink_to(outside)
    log.append("job", job_id="x", outcome="done")  # refused with a warning
    assert log.read() == []  # the outside file is not read either
    assert outside.read_text().count("\n") == 1


def test_a_state_folder_that_is_a_link_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "state").symlink_to(elsewhere)
    log = StatsLog(tmp_path / "out" / "state" / "stats.jsonl")
    log.append("job", job_id="x", outcome="done")
    assert list(elsewhere.iterdir()) == [] and log.read() == []
