"""Upstream TRELLIS.2 on its own, as example.py runs it: the reference our adapter is compared
with (`bench_upstream.py`) and what a card completes without our backend (`cards.py`)."""

from __future__ import annotations

from typing import Any

NVDIFFRAST_LIMIT = 16_777_216  # example.py simplifies to this before baking


def upstream_run(engine: Any, image: Any, params: Any, steps: int | None = None) -> Any:
    """`pipeline.run()` for our tier, on the engine's loaded models; `steps` (every sampler)
    lowers the work, not a stage's peak. Returns upstream's decoded mesh."""
    from backend.engines.trellis2 import PIPELINE_TYPES

    sampler = {} if steps is None else {"steps": steps}
    return engine.pipeline.run(
        image,
        seed=params.seed,
        sparse_structure_sampler_params=sampler,
        shape_slat_sampler_params=sampler,
        tex_slat_sampler_params=sampler,
        pipeline_type=PIPELINE_TYPES[params.resolution],
        max_num_tokens=params.max_num_tokens,
    )[0]


def upstream_export(engine: Any, mesh: Any, params: Any) -> Any:
    """example.py's export of a decoded mesh: simplify to nvdiffrast's limit, then `to_glb`
    with the demo's remesh settings. Returns the textured trimesh."""
    from backend.engines.trellis2 import AABB

    mesh.simplify(NVDIFFRAST_LIMIT)
    return engine._up["postprocess"].to_glb(
        vertices=mesh.vertices,
        faces=mesh.faces,
        attr_volume=mesh.attrs,
        coords=mesh.coords,
        attr_layout=mesh.layout,
        voxel_size=mesh.voxel_size,
        aabb=AABB,
        decimation_target=params.decimation_target,
        texture_size=params.texture_size,
        remesh=params.remesh,
        remesh_band=1,
        remesh_project=0,
    )
