"""Scene-level generation settings (saved with the .blend): source, preset, seed, import options."""

from __future__ import annotations

import bpy
from bpy.props import (
    BoolProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

from ..backend import params as backend_params
from ..backend.params import VARIATIONS_MAX, VARIATIONS_MIN
from .sources import SOURCES

# Every choice and bound below comes from backend.params, the one owner of what a request
# may ask for: the sidebar never offers a value the backend refuses, nor hides one it takes.
PRESETS = tuple(
    (name, name.replace("-", " ").title(), backend_params.describe_preset(name))
    for name in backend_params.PRESETS
)
RESOLUTIONS = tuple((str(r), str(r), "") for r in backend_params.RESOLUTIONS)
TEXTURES = tuple((str(s), str(s), "") for s in backend_params.TEXTURE_SIZES)
_DEFAULTS = backend_params.GenerationParams()
_FACES = backend_params.limits("decimation_target")
_STEPS = backend_params.limits("steps_scale")
_IMAGE = backend_params.limits("image_size")
_BAND = backend_params.limits("remesh_band")
TEXTURE_RESULTS = (
    (
        "APPLY",
        "On the Object",
        "A new material on the object (a mesh without UVs is replaced "
        "by the textured one, with the backend's UVs)",
    ),
    ("COPY", "Copy Beside It", "A textured copy next to the object; the object is unchanged"),
)


def _filepath_changed(self, context) -> None:
    from . import runtime

    if self.filepath:  # the thumbnail is loaded now, so drawing only looks it up
        runtime.load_icon(bpy.path.abspath(self.filepath))


def _history_query_changed(self, context) -> None:
    from . import runtime

    ctrl = runtime.get()
    if ctrl is not None:
        ctrl.history_search(self.history_query)


def _history_days_changed(self, context) -> None:
    from . import runtime

    ctrl = runtime.get()
    if ctrl is not None:
        ctrl.history_prune_days(self.history_days)


class TRELLIS2_PG_settings(bpy.types.PropertyGroup):
    source: EnumProperty(name="Source", items=SOURCES, default="FILE")
    filepath: StringProperty(name="Image File", subtype="FILE_PATH", update=_filepath_changed)
    image: PointerProperty(name="Image", type=bpy.types.Image)
    clipboard_image: PointerProperty(name="Pasted Image", type=bpy.types.Image)
    camera_size: IntProperty(
        name="Render Size", default=512, min=128, max=2048, description="Longest side, pixels"
    )

    preset: EnumProperty(name="Preset", items=PRESETS, default="balanced")
    seed: IntProperty(name="Seed", default=42, min=0, max=2**31 - 1)
    random_seed: BoolProperty(
        name="Random Seed", default=True, description="Pick a new seed for every generation"
    )
    last_seed: IntProperty(name="Last Seed", default=-1, options={"SKIP_SAVE"})

    use_advanced: BoolProperty(name="Override Preset", default=False)
    resolution: EnumProperty(name="Resolution", items=RESOLUTIONS, default="1024")
    texture_size: EnumProperty(name="Texture Size", items=TEXTURES, default="2048")
    decimation_target: IntProperty(
        name="Face Target",
        default=_DEFAULTS.decimation_target,
        min=_FACES[0],
        max=_FACES[1],
        step=1000,
    )
    remesh: BoolProperty(name="Remesh", default=_DEFAULTS.remesh)
    remesh_band: FloatProperty(
        name="Remesh Band",
        default=_DEFAULTS.remesh_band,
        min=_BAND[0],
        max=_BAND[1],
        description="Width of the remeshing band in voxels; 0.5 needs about a third less "
        "GPU memory in the export",
    )
    steps_scale: FloatProperty(
        name="Steps Scale", default=_DEFAULTS.steps_scale, min=_STEPS[0], max=_STEPS[1]
    )
    guidance: BoolProperty(name="Guidance (CFG)", default=_DEFAULTS.guidance)
    image_size: IntProperty(
        name="Conditioning Size", default=_DEFAULTS.image_size, min=_IMAGE[0], max=_IMAGE[1]
    )

    auto_import: BoolProperty(name="Import When Done", default=True)
    at_cursor: BoolProperty(
        name="Place at 3D Cursor",
        default=True,
        description="Place the model where the 3D cursor was when Generate was pressed",
    )
    rest_on_cursor: BoolProperty(
        name="Rest on Cursor",
        default=False,
        description="Put the bottom of the model's bounds at the cursor (instead of its centre)",
    )
    use_scale: BoolProperty(name="Scale to Size", default=False)
    scale_to: FloatProperty(name="Size", default=1.0, min=0.001, soft_max=100.0, unit="LENGTH")
    fix_alpha: BoolProperty(
        name="Alpha for Opaque Models",
        default=False,
        description="Also use the texture's alpha when the model says it is opaque: for "
        "results made before the backend wrote alpha modes (transparent models are always "
        "imported with their blend mode)",
    )

    texture_result: EnumProperty(name="Result", items=TEXTURE_RESULTS, default="APPLY")
    variations_count: IntProperty(
        name="Seeds",
        default=4,
        min=VARIATIONS_MIN,
        max=VARIATIONS_MAX,
        description="How many seeds of the image to generate, side by side",
    )
    batch_folder: StringProperty(
        name="Folder", subtype="DIR_PATH", description="Every image in this folder is queued"
    )

    history_query: StringProperty(
        name="Search",
        description="Show only jobs whose name, id, kind, state or preset contain these words",
        update=_history_query_changed,
    )
    history_days: IntProperty(
        name="Older Than (days)",
        default=30,
        min=0,
        max=36500,
        description="Clear History removes finished jobs that ended more than this many days ago",
        update=_history_days_changed,
    )


def params_from(props, seed: int) -> dict:
    """The request's params: the preset, the seed, and overrides when asked for."""
    params = {"preset": props.preset, "seed": int(seed)}
    if props.use_advanced:
        params.update(
            resolution=int(props.resolution),
            texture_size=int(props.texture_size),
            decimation_target=int(props.decimation_target),
            remesh=bool(props.remesh),
            remesh_band=float(props.remesh_band),
            steps_scale=float(props.steps_scale),
            guidance=bool(props.guidance),
            image_size=int(props.image_size),
        )
    return params


def import_options(props):
    from .importer import ImportOptions

    return ImportOptions(
        at_cursor=props.at_cursor,
        rest_on_cursor=props.rest_on_cursor,
        scale_to=props.scale_to if props.use_scale else None,
        fix_alpha=props.fix_alpha,
    )


classes = (TRELLIS2_PG_settings,)


def register() -> None:
    for cls in classes:
        bpy.utils.register_class(cls)
    bpy.types.Scene.trellis2 = PointerProperty(type=TRELLIS2_PG_settings)


def unregister() -> None:
    del bpy.types.Scene.trellis2
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
