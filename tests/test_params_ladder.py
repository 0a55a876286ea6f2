"""Generation parameters and the 13-level degradation ladder (pure data and policy)."""

from __future__ import annotations

import pytest

from backend.engines.base import KNOBS, Stage
from backend.errors import ErrorCode, InputError
from backend.params import PRESETS, parse_params
from backend.pipeline import ladder

STAGES = (
    Stage("cond", "Conditioning", frozenset({"image_size"})),
    Stage("structure", "Structure", frozenset({"resolution", "steps_scale", "guidance"})),
    Stage("shape", "Shape", frozenset({"resolution", "max_num_tokens", "steps_scale", "guidance"})),
    Stage("texture", "Texture", frozenset({"resolution", "steps_scale", "guidance"})),
    Stage(
        "export",
        "Export",
        frozenset({"texture_size", "decimation_target", "remesh", "remesh_band"}),
    ),
)


def test_presets_and_overrides():
    p = parse_params({"preset": "game-asset", "seed": 7})
    assert (p.resolution, p.texture_size, p.decimation_target, p.seed) == (1536, 4096, 800_000, 7)
    assert p.samplers["shape"] == {"steps": 24, "guidance_strength": 6.5}
    p = parse_params({"preset": "game-asset", "samplers": {"shape": {"steps": 30}}})
    assert p.samplers["shape"] == {"steps": 30, "guidance_strength": 6.5}
    assert parse_params(None).preset == "balanced"
    assert set(PRESETS) == {"fast", "balanced", "high", "game-asset"}


@pytest.mark.parametrize(
    "raw",
    [
        {"preset": "ultra"},
        {"resolution": 2048},
        {"resolution": True},
        {"texture_size": 3000},
        {"seed": -1},
        {"seed": 1.5},
        {"seed": "7"},
        {"remesh": "yes"},
        {"remesh_band": 0.1},  # below what to_glb's remesh handles
        {"remesh_band": "narrow"},
        {"remesh_band": True},
        {"colour": "red"},
        {"samplers": {"shape": {"cfg_strength": 3}}},  # TRELLIS v1 key: TypeError upstream
        {"samplers": {"mesh": {"steps": 3}}},
        {"samplers": {"shape": {"steps": 0}}},
        {"samplers": {"shape": {"guidance_interval": [0.9, 0.1]}}},
        {"samplers": {"shape": []}},
        "not a dict",
        {"preset": ["fast"]},  # unhashable: once an internal error
        {"preset": 3},
        {"texture": {}},
        {"texture_size": 2048.0},  # equal to 2048, but the engine would get a float
        {"resolution": 1024.0},
        {"samplers": "fast"},
    ],
)
def test_bad_params_get_typed_errors(raw):
    with pytest.raises(InputError) as err:
        parse_params(raw)
    assert err.value.code is ErrorCode.BAD_PARAMS
    assert err.value.message


def test_ladder_has_13_levels_in_the_documented_order():
    assert len(ladder.LEVELS) == 13
    request = parse_params({"preset": "game-asset", "image_size": 1024})
    at = [ladder.params_at(request, i) for i in range(13)]
    assert at[0] == request
    # structure first, then the input image, texture and decimation last
    assert at[1].max_num_tokens == 32_768 and at[2].remesh_band == 0.5
    assert [at[i].resolution for i in (2, 3, 4, 5, 6)] == [1536, 1024, 1024, 768, 512]
    assert at[3].remesh is True and at[4].remesh is False  # remesh off before 768 (run 8)
    # steps and guidance cannot lower a peak of the real code: no level touches them
    assert all(at[i].steps_scale == 1.0 and at[i].guidance for i in range(13))
    assert [at[i].image_size for i in (6, 7, 8, 9)] == [1024, 768, 512, 384]
    assert all(at[i].texture_size == 4096 for i in range(10))
    assert [at[i].texture_size for i in (10, 11, 12)] == [2048, 1024, 512]
    assert [at[i].decimation_target for i in (9, 10, 11, 12)] == [
        800_000,
        500_000,
        250_000,
        100_000,
    ]


def test_caps_never_raise_quality():
    request = parse_params({"preset": "fast", "texture_size": 512, "image_size": 300})
    for level in range(13):
        p = ladder.params_at(request, level)
        assert p.resolution <= request.resolution
        assert p.texture_size <= 512 and p.image_size <= 300


def test_no_op_levels_are_skipped_for_the_request_and_engine():
    request = parse_params({"preset": "balanced"})  # 1024: token caps change nothing
    step = ladder.next_step(request, 0, failed_stage=2, stages=STAGES, capabilities=KNOBS)
    # token budgets only matter at 1536, the remesh band and remesh (levels 2 and 4) are read
    # only by export, after the failed stage, and resolution is already 1024 at level 3:
    # next is level 5.
    assert step.level == 5 and step.skipped == (1, 2, 3, 4)
    assert step.params.resolution == 768 and step.resume_stage == 1


def test_resume_point_is_the_earliest_stage_reading_a_changed_knob():
    request = parse_params({"preset": "high"})
    step = ladder.next_step(request, 0, failed_stage=3, stages=STAGES, capabilities=KNOBS)
    assert step.level == 1 and step.resume_stage == 2  # token budget: rerun from shape
    step = ladder.next_step(request, 1, failed_stage=3, stages=STAGES, capabilities=KNOBS)
    assert step.level == 3 and step.resume_stage == 1  # resolution: rerun from structure
    assert step.skipped == (2,)  # the remesh band is read by export only


def test_export_failure_reaches_texture_levels_only_after_structure_levels():
    request = parse_params({"preset": "high"})
    levels, level = [], 0
    while True:
        step = ladder.next_step(request, level, failed_stage=4, stages=STAGES, capabilities=KNOBS)
        if step is None:
            break
        levels.append(step.level)
        level = step.level
    assert levels == list(range(1, 13))


def test_engine_capabilities_limit_the_useful_levels():
    only_texture = frozenset({"texture_size"})
    request = parse_params({"preset": "game-asset"})  # texture 4096
    assert ladder.useful_levels(request, only_texture) == [0, 10, 11, 12]
    request = parse_params({"preset": "high"})  # texture 2048: level 10 changes nothing
    assert ladder.useful_levels(request, only_texture) == [0, 11, 12]
    assert ladder.next_step(request, 12, 4, STAGES, KNOBS) is None


def test_failed_stage_before_any_knob_gets_no_useful_level():
    request = parse_params({"preset": "high"})
    stages = (Stage("load", "Load", frozenset()), *STAGES)
    assert ladder.next_step(request, 0, failed_stage=0, stages=stages, capabilities=KNOBS) is None


def test_reexport_keeps_the_parents_settings_and_changes_only_export_ones():
    from backend.params import reexport_params

    requested = {"preset": "high", "seed": 5, "max_num_tokens": 8000}
    # TRELLIS.2 settled on 1152 (token budget) and the ladder lowered the texture
    final = dict(parse_params(requested).to_dict(), resolution=1152, texture_size=1024)
    params = reexport_params(requested, final, {"decimation_target": 50_000})
    assert params.resolution == 1536  # a tier again: the latents say what was used
    assert (params.seed, params.texture_size, params.decimation_target) == (5, 1024, 50_000)
    with pytest.raises(InputError) as err:
        reexport_params(requested, final, {"seed": 1})
    assert err.value.code is ErrorCode.BAD_PARAMS and "texture_size" in err.value.message
    with pytest.raises(InputError):
        reexport_params(requested, final, ["texture_size"])


def test_preset_descriptions_and_limits_come_from_the_tables():
    from backend.params import PRESETS, describe_preset, limits

    for name, table in PRESETS.items():
        text = describe_preset(name)
        assert f"{table['resolution']} voxels" in text
        assert ("tuned samplers" in text) == bool(table.get("samplers"))
    assert describe_preset("fast") == "512 voxels, 1K texture, 200K faces"
    assert limits("decimation_target") == (1_000, 16_777_216)
    with pytest.raises(KeyError):
        limits("preset")
