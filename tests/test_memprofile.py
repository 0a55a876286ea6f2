"""Adaptive start: the memory profile learns from attempts and picks the start level."""

from __future__ import annotations

import json

from backend.params import parse_params
from backend.pipeline import ladder
from backend.pipeline.memprofile import MAX_OBSERVATIONS, MemoryProfile

GIB = 2**30
CAPS = frozenset(
    {
        "resolution",
        "max_num_tokens",
        "remesh",
        "remesh_band",
        "steps_scale",
        "guidance",
        "image_size",
        "texture_size",
        "decimation_target",
    }
)
HIGH = parse_params({"preset": "high"})  # 1536: every structure level is useful
BALANCED = parse_params({"preset": "balanced"})


def _profile(tmp_path, key="NVIDIA H100 sm90 80GiB"):
    return MemoryProfile(tmp_path / "memprofile.json", key)


def _record(profile, request, level, peak, free, ok, engine="trellis2"):
    profile.record(engine, level, ladder.params_at(request, level), peak, free, ok)


def test_empty_profile_starts_at_the_requested_quality(tmp_path):
    level, reason = _profile(tmp_path).choose_start_level("trellis2", HIGH, CAPS, 16 * GIB)
    assert level == 0
    assert "no memory record" in reason


def test_an_oom_moves_the_start_level_down(tmp_path):
    profile = _profile(tmp_path)
    _record(profile, HIGH, 0, 15 * GIB, 16 * GIB, ok=False)
    level, reason = profile.choose_start_level("trellis2", HIGH, CAPS, 16 * GIB)
    assert level == 1  # the next useful level: nothing known against it
    assert "out of memory" in reason
    # with more memory free than when it failed, level 0 is worth trying again
    assert profile.choose_start_level("trellis2", HIGH, CAPS, 40 * GIB)[0] == 0


def test_a_lower_level_failing_rules_out_every_better_level(tmp_path):
    profile = _profile(tmp_path)
    _record(profile, HIGH, 3, 15 * GIB, 16 * GIB, ok=False)  # resolution 1024 failed
    level, _ = profile.choose_start_level("trellis2", HIGH, CAPS, 16 * GIB)
    useful = ladder.useful_levels(HIGH, CAPS)
    assert level == useful[useful.index(3) + 1]


def test_a_success_with_a_small_peak_keeps_level_zero(tmp_path):
    profile = _profile(tmp_path)
    _record(profile, BALANCED, 0, 9 * GIB, 20 * GIB, ok=True)
    level, reason = profile.choose_start_level("trellis2", BALANCED, CAPS, 16 * GIB)
    assert level == 0
    assert "peaked at 9.0 GiB" in reason


def test_a_known_peak_above_free_memory_starts_lower(tmp_path):
    profile = _profile(tmp_path)
    _record(profile, HIGH, 0, 30 * GIB, 80 * GIB, ok=True)
    _record(profile, HIGH, 1, 20 * GIB, 80 * GIB, ok=True)
    assert profile.choose_start_level("trellis2", HIGH, CAPS, 24 * GIB)[0] == 1
    assert profile.choose_start_level("trellis2", HIGH, CAPS, 40 * GIB)[0] == 0
    # margin: 20 GiB does not fit in 90% of 21 GiB, and level 2 is unknown
    assert profile.choose_start_level("trellis2", HIGH, CAPS, 21 * GIB)[0] == 2


def test_the_latest_decisive_observation_wins(tmp_path):
    profile = _profile(tmp_path)
    _record(profile, BALANCED, 0, 12 * GIB, 16 * GIB, ok=False)
    assert profile.choose_start_level("trellis2", BALANCED, CAPS, 16 * GIB)[0] > 0
    _record(profile, BALANCED, 0, 14 * GIB, 16 * GIB, ok=True)  # e.g. another program quit
    assert profile.choose_start_level("trellis2", BALANCED, CAPS, 16 * GIB)[0] == 0


def test_what_is_learned_is_shared_between_requests_with_the_same_effective_params(tmp_path):
    profile = _profile(tmp_path)
    fast_like = parse_params({"preset": "balanced", "resolution": 512})
    _record(profile, fast_like, 0, 15 * GIB, 16 * GIB, ok=False)
    # level 5 of a 1024 request runs at 512 too, but other knobs (remesh) differ by level 4,
    # so only an identical effective parameter set shares the record
    same = ladder.params_at(fast_like, 0)
    verdict, _ = profile.predict("trellis2", same, 16 * GIB)
    assert verdict == "fails"
    assert profile.predict("preview", same, 16 * GIB)[0] == "unknown"  # per engine


def test_partial_attempts_do_not_vouch_for_a_full_run(tmp_path):
    profile = _profile(tmp_path)
    params = ladder.params_at(HIGH, 0)
    profile.record("trellis2", 0, params, 2 * GIB, 16 * GIB, ok=True, partial=True)
    assert profile.predict("trellis2", params, 16 * GIB)[0] == "unknown"


def test_kept_across_a_reload_and_separate_per_gpu(tmp_path):
    profile = _profile(tmp_path, "gpu-a")
    _record(profile, HIGH, 0, 15 * GIB, 16 * GIB, ok=False)
    other = _profile(tmp_path, "gpu-b")
    _record(other, HIGH, 0, 9 * GIB, 16 * GIB, ok=True)
    reloaded = _profile(tmp_path, "gpu-a")
    assert reloaded.choose_start_level("trellis2", HIGH, CAPS, 16 * GIB)[0] == 1
    assert _profile(tmp_path, "gpu-b").choose_start_level("trellis2", HIGH, CAPS, 16 * GIB)[0] == 0
    assert _profile(tmp_path, "gpu-c").choose_start_level("trellis2", HIGH, CAPS, 16 * GIB)[0] == 0
    data = json.loads((tmp_path / "memprofile.json").read_text())
    assert set(data["gpus"]) == {"gpu-a", "gpu-b"}


def test_corrupt_file_starts_empty_and_is_repaired(tmp_path, caplog):
    path = tmp_path / "memprofile.json"
    for junk in ("{not json", "[1, 2]", '{"version": 1, "gpus": {"g": {"k": {"obs": [7]}}}}'):
        path.write_text(junk)
        profile = MemoryProfile(path, "g")
        assert profile.entries() == {}
        assert profile.choose_start_level("trellis2", HIGH, CAPS, 16 * GIB)[0] == 0
    assert "starting empty" in caplog.text
    _record(profile, HIGH, 0, 15 * GIB, 16 * GIB, ok=False)
    assert MemoryProfile(path, "g").choose_start_level("trellis2", HIGH, CAPS, 16 * GIB)[0] == 1
    assert not list(tmp_path.glob(".memprofile-*"))  # no temp files left behind


def test_profile_stays_bounded(tmp_path):
    profile = _profile(tmp_path)
    for i in range(MAX_OBSERVATIONS * 3):
        _record(profile, BALANCED, 0, (1 + i % 3) * GIB, 20 * GIB, ok=True)
    (entry,) = profile.entries().values()
    assert len(entry["obs"]) == MAX_OBSERVATIONS
    assert entry["levels"] == [0]


def test_runs_without_vram_figures_are_not_recorded(tmp_path):
    profile = _profile(tmp_path)
    profile.record("trellis2", 0, HIGH, None, None, ok=False)
    profile.record("trellis2", 0, HIGH, None, 0, ok=True)
    assert profile.entries() == {}


def test_every_level_predicted_to_fail_tries_the_lowest(tmp_path):
    profile = _profile(tmp_path)
    last = ladder.useful_levels(BALANCED, CAPS)[-1]
    _record(profile, BALANCED, last, 3 * GIB, 4 * GIB, ok=False)
    level, reason = profile.choose_start_level("trellis2", BALANCED, CAPS, 4 * GIB)
    assert level == last
    assert "lowest" in reason


def test_only_useful_levels_are_chosen(tmp_path):
    profile = _profile(tmp_path)
    caps = frozenset({"resolution", "texture_size"})  # an engine with two knobs
    _record(profile, BALANCED, 0, 15 * GIB, 16 * GIB, ok=False)
    level, _ = profile.choose_start_level("trellis2", BALANCED, caps, 16 * GIB)
    assert level == 5  # levels 1-4 change nothing this engine reads for a 1024 request


STRUCTURE_INPUTS = {"image_size", "resolution", "max_num_tokens", "steps_scale", "guidance"}


def test_a_stage_oom_rules_out_levels_that_do_not_change_that_stage(tmp_path):
    profile = _profile(tmp_path)
    params = ladder.params_at(BALANCED, 0)
    profile.record("trellis2", 0, params, 15 * GIB, 16 * GIB, ok=False, depends_on=STRUCTURE_INPUTS)
    # levels 2 and 4 only change the remesh, which the failed structure stage never reads
    # (and levels 1 and 3 change nothing at 1024): level 5, the 768 cascade, is the first
    level, reason = profile.choose_start_level("trellis2", BALANCED, CAPS, 16 * GIB)
    assert level == 5
    assert "ran out of memory" in reason
    # without the stage's inputs, only the exact parameters are known to fail
    plain = _profile(tmp_path, "other-gpu")
    plain.record("trellis2", 0, params, 15 * GIB, 16 * GIB, ok=False)
    assert plain.choose_start_level("trellis2", BALANCED, CAPS, 16 * GIB)[0] == 2
    # a later success of exactly level 2's parameters outweighs the older stage OOM
    profile.record("trellis2", 2, ladder.params_at(BALANCED, 2), 14 * GIB, 16 * GIB, ok=True)
    assert profile.choose_start_level("trellis2", BALANCED, CAPS, 16 * GIB)[0] == 2
    assert _profile(tmp_path).stage_ooms()  # kept on disk


def test_tokens_per_voxel_are_kept_across_restarts_and_bad_values_dropped(tmp_path):
    profile = _profile(tmp_path)
    profile.learn_tokens_per_voxel(1024, 3.86)
    profile.learn_tokens_per_voxel(1536, 0)  # nonsense is not learned
    assert _profile(tmp_path).tokens_per_voxel() == {1024: 3.86}
    assert _profile(tmp_path, "other-gpu").tokens_per_voxel() == {}
    # a hand-edited file with junk keeps what is sound
    path = tmp_path / "memprofile.json"
    data = json.loads(path.read_text())
    data["gpus"]["NVIDIA H100 sm90 80GiB"]["tokens_per_voxel"] = {"1024": 2.5, "x": 1, "15": "a"}
    path.write_text(json.dumps(data))
    assert _profile(tmp_path).tokens_per_voxel() == {1024: 2.5}
