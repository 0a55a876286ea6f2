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


def test_lines_with_wrong_types_count_as_far_as_they_are_sound(tmp_path):
    """Another program may append to the stats file: `stats` must still answer, with
    figures a client can decode, and the tally must agree with a full read."""
    import json

    from backend.store.stats import StatsTally

    path = tmp_path / "state" / "stats.jsonl"
    log = StatsLog(path)
    log.append("job", job_id="a", outcome="done", seconds=2.0, level=1, attempts=2)
    with open(path, "ab") as f:
        for line in (
            {"kind": "job", "job_id": "b", "outcome": "done", "attempts": "x", "level": [1]},
            {"kind": "job", "job_id": "c", "outcome": "failed", "attempts": True},
            {"kind": "attempt", "outcome": "oom", "vram_peak": "lots"},
            {"kind": "ready", "seconds": {"a": 1}},
        ):
            f.write(json.dumps(line).encode() + b"\n")
        f.write(b'{"kind": "job", "job_id": "d", "outcome": "done", "seconds": NaN}\n')
    figures = aggregate(log.read())
    assert figures["jobs"] == 3  # the NaN line is a bad line, the others count
    assert figures["seconds_mean"] == 2.0
    assert figures["level_distribution"] == {"0": 1, "1": 1}
    assert figures["vram_peak_max"] is None and figures["time_to_ready_mean"] is None
    json.dumps(figures, allow_nan=False)  # sendable
    assert StatsTally(path).aggregate() == figures


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


# -- the reader process's running tally ---------------------------------------------------------


def _lines(*records) -> bytes:
    import json

    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def test_the_tally_reads_only_what_was_appended_and_agrees_with_a_full_read(tmp_path):
    """Every step: the tally's figures are `aggregate(read())`'s (jobs counted once at their
    last line, lines without an id, bad lines, a line still being written), and the file is
    read from the start only once."""
    import random

    from backend.store.stats import StatsTally

    path = tmp_path / "state" / "stats.jsonl"
    log = StatsLog(path)
    tally = StatsTally(path)
    assert tally.aggregate() == aggregate(log.read())  # no file yet
    rng = random.Random(7)
    outcomes = ["done", "done", "failed", "cancelled"]
    for step in range(300):
        choice = rng.random()
        job_id = f"j{rng.randrange(40)}"
        if choice < 0.5:
            fields = {"outcome": rng.choice(outcomes), "seconds": rng.random() * 10}
            fields.update(level=rng.randrange(4), attempts=rng.randrange(1, 4), error_code="oom")
            log.append("job", job_id=job_id, params={"seed": step}, **fields)
        elif choice < 0.75:
            log.append("attempt", job_id=job_id, outcome="oom", vram_peak=rng.randrange(1 << 30))
        elif choice < 0.8:
            log.append("ready", engine="preview", seconds=rng.random())
        elif choice < 0.85:
            log.append("job", outcome="done", seconds=0.5)  # an old line without an id
        elif choice < 0.9:
            with open(path, "ab") as f:
                f.write(b"not json\n")
        else:  # a line still being written, finished some steps later
            with open(path, "ab") as f:
                f.write(b'{"kind": "job", "job_id": "' + job_id.encode())
            assert tally.aggregate() == aggregate(log.read())
            with open(path, "ab") as f:
                f.write(b'", "outcome": "done", "seconds": 2.5}\n')
        if step % 7 == 0:
            assert tally.aggregate() == aggregate(log.read()), step
    assert tally.aggregate() == aggregate(log.read())
    assert tally.full_reads == 1


def test_the_tally_reads_again_a_file_rotated_truncated_or_removed(tmp_path):
    from backend.store.stats import StatsTally

    path = tmp_path / "state" / "stats.jsonl"
    log = StatsLog(path)
    tally = StatsTally(path)
    for i in range(5):
        log.append("job", job_id=f"a{i}", outcome="done", seconds=1.0 + i)
    assert tally.aggregate()["jobs"] == 5 and tally.full_reads == 1

    path.rename(path.with_name("stats.1.jsonl"))  # rotated: a new file at the name
    log.append("job", job_id="b", outcome="failed", error_code="disk_full")
    assert tally.aggregate() == aggregate(log.read()) and tally.aggregate()["jobs"] == 1

    path.write_bytes(b"")  # truncated in place (same inode)
    assert tally.aggregate() == aggregate([])
    log.append("job", job_id="c", outcome="done", seconds=3.0)
    assert tally.aggregate() == aggregate(log.read())

    # Rewritten in place to more than it had: the bytes before the offset changed.
    path.write_bytes(
        _lines(*({"kind": "job", "job_id": f"d{i}", "outcome": "done"} for i in range(9)))
    )
    assert tally.aggregate() == aggregate(log.read()) and tally.aggregate()["jobs"] == 9

    path.unlink()
    assert tally.aggregate() == aggregate([])
    log.append("ready", engine="x", seconds=0.25)
    assert tally.aggregate() == aggregate(log.read())
    assert tally.full_reads == 5


def test_the_tally_never_reads_through_a_link(tmp_path):
    from backend.store.stats import StatsTally

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    outside = tmp_path / "outside.jsonl"
    outside.write_bytes(_lines({"kind": "job", "job_id": "secret", "outcome": "done"}))
    (state / "stats.jsonl").symlink_to(outside)
    assert StatsTally(state / "stats.jsonl").aggregate() == aggregate([])
