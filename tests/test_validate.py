"""Input-image, mesh and GLB validation, checked against a corpus of bad images and against the
Khronos glTF-Validator."""

from __future__ import annotations

import base64
import copy
import io
import json
import struct

import numpy as np
import pytest
import trimesh
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from backend.checks import meshcheck
from backend.checks.glbcheck import validate_glb, validate_glb_file
from backend.checks.images import ImageLimits, has_usable_alpha, load_image
from backend.checks.meshcheck import validate_mesh
from backend.errors import ErrorCode, InputError, OutputError
from tests.badimages import Case, bad_image_cases, encode, rgba_with_alpha
from tests.khronos import error_codes, khronos_reports, requires_khronos

CASES = bad_image_cases()

# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def test_corpus_is_broad_and_named_uniquely():
    names = [case.name for case in CASES]
    assert len(names) == len(set(names))
    assert len(CASES) >= 35
    expectations = {case.expect.split(":")[0] for case in CASES}
    assert expectations == {"ok", "bad_image", "image_too_large", "empty_alpha"}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_load_image_corpus(case: Case):
    limits = case.limits or ImageLimits()
    if case.expect.startswith("ok:"):
        image = load_image(case.data, limits)
        assert image.mode == case.expect[3:]
        assert min(image.size) >= limits.min_side
        # decoded to 8-bit pixels of the stated size
        assert np.asarray(image).dtype == np.uint8
        assert np.asarray(image).shape == (image.size[1], image.size[0], len(image.mode))
        if case.check is not None:
            case.check(image)
    else:
        with pytest.raises(InputError) as caught:
            load_image(case.data, limits)
        error = caught.value
        assert error.code == ErrorCode(case.expect), f"{error.code}: {error.message}"
        assert error.message and error.hint
        assert "\n" not in error.hint


def test_load_image_leaves_pillow_global_limit_alone():
    before = Image.MAX_IMAGE_PIXELS
    for case in CASES:
        if case.expect == "image_too_large":
            with pytest.raises(InputError):
                load_image(case.data, case.limits or ImageLimits())
    assert before == Image.MAX_IMAGE_PIXELS


def test_load_image_accepts_bytearray_and_memoryview_but_not_str():
    data = encode(Image.new("RGB", (16, 16), (1, 2, 3)), "PNG")
    assert load_image(bytearray(data)).getpixel((0, 0)) == (1, 2, 3)
    assert load_image(memoryview(data)).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(InputError) as caught:
        load_image("/path/to/image.png")  # type: ignore[arg-type]
    assert caught.value.code == ErrorCode.BAD_IMAGE


def test_pixel_limits_are_inclusive():
    data = encode(Image.new("RGB", (20, 10), (9, 9, 9)), "PNG")
    assert load_image(data, ImageLimits(max_pixels=200, max_side=20, min_side=10)).size == (20, 10)
    for limits in (ImageLimits(max_pixels=199), ImageLimits(max_side=19)):
        with pytest.raises(InputError) as caught:
            load_image(data, limits)
        assert caught.value.code == ErrorCode.IMAGE_TOO_LARGE
    with pytest.raises(InputError) as caught:
        load_image(data, ImageLimits(min_side=11))
    assert caught.value.code == ErrorCode.BAD_IMAGE


def test_has_usable_alpha():
    assert has_usable_alpha(rgba_with_alpha(255))
    assert has_usable_alpha(rgba_with_alpha(205))
    assert not has_usable_alpha(rgba_with_alpha(204))  # TRELLIS.2 would crop to nothing
    assert not has_usable_alpha(rgba_with_alpha(0))
    assert not has_usable_alpha(Image.new("RGBA", (8, 8), (1, 2, 3, 255)))  # hides nothing
    assert not has_usable_alpha(Image.new("RGB", (8, 8)))
    assert not has_usable_alpha(Image.new("L", (8, 8)))
    palette = Image.new("P", (8, 8), 0)
    palette.paste(1, (0, 0, 4, 8))
    assert not has_usable_alpha(palette)
    palette.info["transparency"] = 0
    assert has_usable_alpha(palette)
    la = Image.new("LA", (8, 8), (100, 0))
    la.paste((100, 255), (0, 0, 4, 8))
    assert has_usable_alpha(la)
    # and it agrees with load_image on every corpus image that loads
    for case in CASES:
        if case.expect.startswith("ok:"):
            image = load_image(case.data, case.limits or ImageLimits())
            assert has_usable_alpha(image) == (image.mode == "RGBA"), case.name


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_load_image_random_bytes_only_raise_input_error(data: bytes):
    try:
        image = load_image(data)
    except InputError as error:
        assert error.code in (ErrorCode.BAD_IMAGE, ErrorCode.IMAGE_TOO_LARGE, ErrorCode.EMPTY_ALPHA)
    else:  # a few formats (TGA) have no magic; whatever decodes must still be a clean image
        assert image.mode in ("RGB", "RGBA")


_SEED_IMAGES = [
    encode(rgba_with_alpha(255, size=(24, 24)), "PNG"),
    encode(Image.new("RGB", (24, 24), (200, 10, 10)), "JPEG"),
    encode(Image.new("RGB", (24, 24), (10, 200, 10)), "GIF"),
    encode(rgba_with_alpha(255, size=(24, 24)), "WEBP", lossless=True),
    encode(Image.new("RGB", (24, 24), (10, 10, 200)), "TIFF"),
]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(_SEED_IMAGES),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    st.integers(1, 10_000),
)
def test_load_image_mutated_images_only_raise_input_error(seed, flips, keep):
    data = bytearray(seed[: max(1, len(seed) * keep // 10_000)])
    for where, value in flips:
        data[where % len(data)] = value
    try:
        image = load_image(bytes(data))
    except InputError as error:
        assert error.code in (ErrorCode.BAD_IMAGE, ErrorCode.IMAGE_TOO_LARGE, ErrorCode.EMPTY_ALPHA)
    else:
        assert image.mode in ("RGB", "RGBA")
        image.tobytes()


# ---------------------------------------------------------------------------------------------
# Meshes
# ---------------------------------------------------------------------------------------------


def _box():
    mesh = trimesh.creation.box()
    return np.asarray(mesh.vertices, np.float32), np.asarray(mesh.faces, np.int64)


def _mesh_error(vertices, faces) -> str:
    with pytest.raises(OutputError) as caught:
        validate_mesh(vertices, faces)
    assert caught.value.code == ErrorCode.INVALID_MESH
    return caught.value.message


def test_validate_mesh_accepts_a_clean_mesh():
    vertices, faces = _box()
    assert validate_mesh(vertices, faces) == []
    assert validate_mesh(vertices.astype(np.float64), faces.astype(np.uint32)) == []


@pytest.mark.parametrize(
    "vertices, faces, words",
    [
        (np.zeros((4, 2), np.float32), np.array([[0, 1, 2]]), "[V, 3]"),
        (np.zeros(12, np.float32), np.array([[0, 1, 2]]), "[V, 3]"),
        (np.eye(3, dtype=np.float32), np.array([0, 1, 2]), "[F, 3]"),
        (np.eye(3, dtype=np.float32), np.array([[0, 1, 2, 0]]), "[F, 3]"),
        (np.eye(3, dtype=np.float32), np.array([[0.0, 1.0, 2.0]]), "integer"),
        (np.eye(3).astype(bool), np.array([[0, 1, 2]]), "real numbers"),
        (np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64), "no vertices"),
        (np.eye(3, dtype=np.float32), np.zeros((0, 3), np.int64), "no faces"),
        (np.array([[0, 0, 0], [1, 0, np.nan], [0, 1, 0]], np.float32), [[0, 1, 2]], "NaN"),
        (np.array([[0, 0, 0], [1, 0, np.inf], [0, 1, 0]], np.float32), [[0, 1, 2]], "infinite"),
        (np.eye(3, dtype=np.float32), np.array([[0, 1, 3]]), "out of range"),
        (np.eye(3, dtype=np.float32), np.array([[0, 1, -1]]), "negative"),
        (np.eye(3, dtype=np.float32), np.array([[0, 0, 1], [2, 2, 2]]), "All 2 faces are degen"),
        # collinear points: no repeated index, but zero area
        (np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2]], np.float32), [[0, 1, 2]], "degenerate"),
    ],
)
def test_validate_mesh_rejects(vertices, faces, words):
    assert words in _mesh_error(vertices, faces)


def test_validate_mesh_rejects_unconvertible_input():
    assert "cannot be read" in _mesh_error(np.eye(3), [[0, 1], [2]])


def test_validate_mesh_counts_degenerate_faces(monkeypatch):
    vertices, faces = _box()
    bad = np.array([[0, 0, 1], [3, 4, 4], [5, 6, 5]])
    # collinear triple: vertex 8 is the midpoint of vertices 0 and 1
    vertices = np.vstack([vertices, (vertices[0] + vertices[1]) / 2])
    bad = np.vstack([bad, [[0, 8, 1]]])
    all_faces = np.vstack([faces, bad])
    monkeypatch.setattr(meshcheck, "_FACE_CHUNK", 5)  # exercise the chunked area computation
    warnings = validate_mesh(vertices, all_faces)
    assert len(warnings) == 1
    assert warnings[0].startswith("4 of 16 faces are degenerate")


def test_validate_mesh_warns_on_face_vertex_ratio():
    vertices, _ = _box()  # 8 corners; no three of them collinear
    rng = np.random.default_rng(0)
    faces = np.array([rng.permutation(8)[:3] for _ in range(81)])
    assert any("face:vertex ratio" in w for w in validate_mesh(vertices, faces))  # 10.1:1
    assert not any("ratio" in w for w in validate_mesh(vertices, faces[:80]))  # 10:1


# ---------------------------------------------------------------------------------------------
# GLB
# ---------------------------------------------------------------------------------------------


def _textured_box_glb() -> bytes:
    mesh = trimesh.creation.box()
    rng = np.random.default_rng(3)
    texture = Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8))
    mesh.visual = trimesh.visual.TextureVisuals(
        uv=rng.random((len(mesh.vertices), 2)), image=texture
    )
    return mesh.export(file_type="glb")


def _two_mesh_glb() -> bytes:
    scene = trimesh.Scene()
    scene.add_geometry(trimesh.creation.icosphere(subdivisions=2), node_name="sphere")
    scene.add_geometry(trimesh.creation.cylinder(radius=0.3, height=1.0), node_name="cyl")
    return scene.export(file_type="glb")


VALID_GLB = _textured_box_glb()


def unpack(glb: bytes) -> tuple[dict, bytes]:
    json_length = struct.unpack_from("<I", glb, 12)[0]
    doc = json.loads(glb[20 : 20 + json_length])
    bin_start = 20 + json_length
    bin_length = struct.unpack_from("<I", glb, bin_start)[0]
    return doc, glb[bin_start + 8 : bin_start + 8 + bin_length]


def pack(doc, binary: bytes, raw_json: bytes | None = None) -> bytes:
    text = raw_json if raw_json is not None else json.dumps(doc).encode()
    text += b" " * (-len(text) % 4)
    binary += b"\x00" * (-len(binary) % 4)
    body = struct.pack("<II", len(text), 0x4E4F534A) + text
    body += struct.pack("<II", len(binary), 0x004E4942) + binary
    return struct.pack("<4sII", b"glTF", 2, 12 + len(body)) + body


def _edit(change) -> bytes:
    doc, binary = unpack(VALID_GLB)
    doc = copy.deepcopy(doc)
    binary = bytearray(binary)
    result = change(doc, binary)
    return result if isinstance(result, bytes) else pack(doc, bytes(binary))


def _index_view(doc):
    indices = doc["accessors"][doc["meshes"][0]["primitives"][0]["indices"]]
    return doc["bufferViews"][indices["bufferView"]], indices


def _set_index(doc, binary, value):
    view, indices = _index_view(doc)
    assert indices["componentType"] == 5125
    struct.pack_into("<I", binary, view.get("byteOffset", 0) + 4, value)


def _position(doc):
    return doc["accessors"][doc["meshes"][0]["primitives"][0]["attributes"]["POSITION"]]


def _image_view(doc):
    return doc["bufferViews"][doc["images"][0]["bufferView"]]


def _poke(binary, offset, data):
    binary[offset : offset + len(data)] = data


def _replace_image(doc, binary, content: bytes, mime: str | None = None):
    view = _image_view(doc)
    assert len(content) <= view["byteLength"]
    padded = content + b"\x00" * (view["byteLength"] - len(content))
    _poke(binary, view.get("byteOffset", 0), padded)
    if mime:
        doc["images"][0]["mimeType"] = mime


def _header_length(data: bytes, length: int) -> bytes:
    return data[:8] + struct.pack("<I", length) + data[12:]


def _grow(obj: dict, key: str, by: int):
    obj[key] += by


_SMALL = Image.new("RGB", (8, 8), (200, 100, 0))
_GIF = encode(_SMALL.convert("P"), "GIF")
_WEBP = encode(_SMALL, "WEBP", lossless=True)
_NAN = struct.pack("<f", float("nan"))
_JSON_LENGTH = struct.unpack_from("<I", VALID_GLB, 12)[0]

# Each variant is broken in one way: (name, bytes, words in validate_glb's message, what the
# Khronos validator says). Where Khronos only warns, we are stricter on purpose: Blender
# cannot use an undecodable texture, a primitive without positions, or a partial triangle.
BROKEN_GLBS = [
    ("index_out_of_range", _edit(lambda d, b: _set_index(d, b, 999)), "out of range", "error"),
    ("truncated", VALID_GLB[:-300], "header says", "error"),
    (
        "truncated_header_fixed",
        _header_length(VALID_GLB[:-300], len(VALID_GLB) - 300),
        "runs past the end",
        "error",
    ),
    ("bad_magic", b"glTX" + VALID_GLB[4:], "bad magic", "error"),
    ("bad_version", VALID_GLB[:4] + struct.pack("<I", 1) + VALID_GLB[8:], "version 1", "error"),
    ("wrong_total_length", _header_length(VALID_GLB, len(VALID_GLB) + 4), "header says", "error"),
    (
        "unaligned_json_chunk",
        VALID_GLB[:12] + struct.pack("<I", _JSON_LENGTH - 1) + VALID_GLB[16:],
        "not a multiple of 4",
        "error",
    ),
    (
        "json_not_object",
        _edit(lambda d, b: pack(None, bytes(b), b"[1, 2, 3]")),
        "not an object",
        "error",
    ),
    (
        "json_not_json",
        _edit(lambda d, b: pack(None, bytes(b), b'{"asset": ')),
        "does not parse",
        "error",
    ),
    (
        "missing_asset_version",
        _edit(lambda d, b: d["asset"].pop("version")),
        "asset.version",
        "error",
    ),
    (
        "accessor_past_bufferview",
        _edit(lambda d, b: _position(d).update(count=9)),
        "needs",
        "error",
    ),
    (
        "bufferview_past_buffer",
        _edit(lambda d, b: _grow(d["bufferViews"][-1], "byteLength", 64)),
        "past the end of buffer",
        "error",
    ),
    (
        "buffer_bigger_than_bin",
        _edit(lambda d, b: _grow(d["buffers"][0], "byteLength", 64)),
        "exceeds the BIN chunk",
        "error",
    ),
    (
        "external_buffer",
        _edit(lambda d, b: d["buffers"][0].update(uri="model.bin")),
        "external",
        "error",
    ),
    (
        "bad_component_type",
        _edit(lambda d, b: _position(d).update(componentType=5127)),
        "componentType",
        "error",
    ),
    (
        "position_nan",
        _edit(
            lambda d, b: _poke(
                b, d["bufferViews"][_position(d)["bufferView"]].get("byteOffset", 0), _NAN
            )
        ),
        "NaN",
        "error",
    ),
    (
        "image_gif",
        _edit(lambda d, b: _replace_image(d, b, _GIF, "image/gif")),
        "neither PNG nor JPEG",
        "error",
    ),
    (
        "image_webp_without_extension",
        _edit(lambda d, b: _replace_image(d, b, _WEBP)),
        "EXT_texture_webp is not used",
        "error",
    ),
    (
        "image_mime_mismatch",
        _edit(lambda d, b: d["images"][0].update(mimeType="image/jpeg")),
        "declares",
        "error",
    ),
    (
        "image_unrecognised",
        _edit(lambda d, b: _replace_image(d, b, b"GIF89a\x00\x00")),
        "neither PNG nor JPEG",
        "warning",
    ),
    (
        "material_out_of_range",
        _edit(lambda d, b: d["meshes"][0]["primitives"][0].update(material=42)),
        "material index",
        "error",
    ),
    (
        "texture_source_out_of_range",
        _edit(lambda d, b: d["textures"][0].update(source=5)),
        "image index",
        "error",
    ),
    (
        "material_texture_out_of_range",
        _edit(
            lambda d, b: d["materials"][0]["pbrMetallicRoughness"]["baseColorTexture"].update(
                index=3
            )
        ),
        "texture index",
        "error",
    ),
    (
        "mesh_without_primitives",
        _edit(lambda d, b: d["meshes"][0].update(primitives=[])),
        "no primitives",
        "error",
    ),
    (
        "primitive_without_position",
        _edit(lambda d, b: d["meshes"][0]["primitives"][0]["attributes"].pop("POSITION")),
        "no POSITION",
        "warning",
    ),
    (
        "index_count_not_triangles",
        _edit(lambda d, b: _index_view(d)[1].update(count=35)),
        "multiple of 3",
        "warning",
    ),
]


def test_validate_glb_report_on_valid_files():
    report = validate_glb(VALID_GLB)
    assert report == {
        "meshes": 1,
        "primitives": 1,
        "vertices": 8,
        "triangles": 12,
        "images": 1,
        "image_mime_types": ["image/png"],
        "materials": 1,
        "extensions_required": [],
        "warnings": [],
    }
    scene = validate_glb(_two_mesh_glb())
    sphere = trimesh.creation.icosphere(subdivisions=2)
    cylinder = trimesh.creation.cylinder(radius=0.3, height=1.0)
    assert scene["meshes"] == 2 and scene["images"] == 0
    assert scene["triangles"] == len(sphere.faces) + len(cylinder.faces)


def test_validate_glb_file(tmp_path):
    path = tmp_path / "a.glb"
    path.write_bytes(VALID_GLB)
    assert validate_glb_file(path)["triangles"] == 12
    with pytest.raises(OutputError) as caught:
        validate_glb_file(tmp_path / "missing.glb")
    assert caught.value.code == ErrorCode.INVALID_GLB


@pytest.mark.parametrize(
    "name, data, words, _khronos", BROKEN_GLBS, ids=[b[0] for b in BROKEN_GLBS]
)
def test_validate_glb_rejects(name, data, words, _khronos):
    with pytest.raises(OutputError) as caught:
        validate_glb(data)
    assert caught.value.code == ErrorCode.INVALID_GLB
    assert words in caught.value.message
    assert "could not check" not in caught.value.message  # a real finding, not the safety net


def test_validate_glb_rejects_short_and_empty_input():
    for data in (b"", b"glTF", VALID_GLB[:11]):
        with pytest.raises(OutputError, match="too short"):
            validate_glb(data)


def test_validate_glb_warns_on_required_webp():
    def require_webp(doc, binary):
        doc["extensionsUsed"] = ["EXT_texture_webp"]
        doc["extensionsRequired"] = ["EXT_texture_webp"]
        webp = encode(Image.new("RGB", (8, 8), (1, 2, 3)), "WEBP", lossless=True)
        offset = len(binary)
        binary.extend(webp + b"\x00" * (-len(webp) % 4))
        doc["buffers"][0]["byteLength"] = len(binary)
        doc["bufferViews"].append({"buffer": 0, "byteOffset": offset, "byteLength": len(webp)})
        doc["images"].append({"bufferView": len(doc["bufferViews"]) - 1, "mimeType": "image/webp"})
        doc["textures"][0] = {"extensions": {"EXT_texture_webp": {"source": 1}}}

    report = validate_glb(_edit(require_webp))
    assert report["extensions_required"] == ["EXT_texture_webp"]
    assert report["image_mime_types"] == ["image/png", "image/webp"]
    assert any("EXT_texture_webp" in w for w in report["warnings"])
    # a WebP image without the extension declared is refused
    with pytest.raises(OutputError, match="EXT_texture_webp"):
        validate_glb(
            _edit(
                lambda d, b: (
                    require_webp(d, b),
                    d.pop("extensionsRequired"),
                    d.pop("extensionsUsed"),
                )
            )
        )


@requires_khronos
def test_khronos_agrees_on_valid_and_broken_files(tmp_path):
    """Our checker and the Khronos validator agree: valid files pass both, each broken
    variant fails both. One node process validates all files."""
    valid = {"textured_box": VALID_GLB, "two_meshes": _two_mesh_glb()}
    paths = []
    for name, data in valid.items():
        paths.append(tmp_path / f"valid_{name}.glb")
        paths[-1].write_bytes(data)
    for name, data, _words, _khronos in BROKEN_GLBS:
        paths.append(tmp_path / f"broken_{name}.glb")
        paths[-1].write_bytes(data)
    reports = dict(zip(paths, khronos_reports(paths), strict=True))

    for name, data in valid.items():
        report = reports[tmp_path / f"valid_{name}.glb"]
        assert report["issues"]["numErrors"] == 0, error_codes(report)
        ours = validate_glb(data)
        assert ours["vertices"] == report["info"]["totalVertexCount"]
        assert ours["triangles"] == report["info"]["totalTriangleCount"]
        assert ours["materials"] == report["info"]["materialCount"]
    for name, _data, _words, khronos in BROKEN_GLBS:
        report = reports[tmp_path / f"broken_{name}.glb"]
        found = report["issues"]["numErrors" if khronos == "error" else "numWarnings"]
        assert found > 0, f"Khronos found no {khronos} in {name}: {report['issues']['messages']}"
    assert sum(b[3] == "error" for b in BROKEN_GLBS) >= 20


def test_validated_box_matches_trimesh_reload():
    """The report's counts describe what an importer gets back."""
    scene = trimesh.load(io.BytesIO(VALID_GLB), file_type="glb")
    geometry = next(iter(scene.geometry.values()))
    report = validate_glb(VALID_GLB)
    assert report["vertices"] == len(geometry.vertices)
    assert report["triangles"] == len(geometry.faces)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, len(VALID_GLB)),
    st.lists(st.tuples(st.integers(0, len(VALID_GLB) - 1), st.integers(0, 255)), max_size=8),
)
def test_validate_glb_mutations_only_raise_output_error(keep, flips):
    data = bytearray(VALID_GLB[:keep])
    for where, value in flips:
        if data:
            data[where % len(data)] = value
    try:
        report = validate_glb(bytes(data))
    except OutputError as error:
        assert error.code == ErrorCode.INVALID_GLB
        assert "could not check" not in error.message, error.message
    else:
        assert report["meshes"] >= 0 and isinstance(report["warnings"], list)


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 2000)
    | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)

# Keys the checker reads, so that edits both replace and add the fields that matter.
_GLTF_KEYS = st.sampled_from(
    [
        "buffers",
        "bufferViews",
        "accessors",
        "meshes",
        "materials",
        "textures",
        "images",
        "nodes",
        "scenes",
        "scene",
        "samplers",
        "extensionsUsed",
        "extensionsRequired",
        "asset",
        "version",
        "buffer",
        "byteLength",
        "byteOffset",
        "byteStride",
        "uri",
        "bufferView",
        "componentType",
        "count",
        "type",
        "min",
        "max",
        "sparse",
        "indices",
        "values",
        "primitives",
        "attributes",
        "POSITION",
        "TEXCOORD_0",
        "mode",
        "material",
        "pbrMetallicRoughness",
        "baseColorTexture",
        "normalTexture",
        "index",
        "source",
        "sampler",
        "extensions",
        "EXT_texture_webp",
        "mimeType",
        "mesh",
        "children",
        "nodes",
    ]
)


def _dicts(node) -> list[dict]:
    """Every object in a JSON tree, parents before children."""
    found = []
    if isinstance(node, dict):
        found.append(node)
        for value in node.values():
            found += _dicts(value)
    elif isinstance(node, list):
        for value in node:
            found += _dicts(value)
    return found


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 10_000), _GLTF_KEYS, _JSON_VALUES), max_size=4))
def test_validate_glb_json_mutations_only_raise_output_error(edits):
    """Set fields anywhere in the glTF JSON to arbitrary JSON: the checker must report, not
    crash, and never fall back to its safety net."""
    doc, binary = unpack(VALID_GLB)
    for where, key, value in edits:
        objects = _dicts(doc)
        objects[where % len(objects)][key] = value
    try:
        validate_glb(pack(doc, binary))
    except OutputError as error:
        assert error.code == ErrorCode.INVALID_GLB
        assert "could not check" not in error.message, error.message


def test_validate_glb_container_edges():
    # trailing bytes after the last chunk, even zeros, break Blender's chunk loop
    for tail in (b"\x00\x00\x00\x00", b"junk"):
        data = _header_length(VALID_GLB + tail, len(VALID_GLB) + 4)
        with pytest.raises(OutputError, match="stray bytes"):
            validate_glb(data)
    # an unknown chunk type after BIN is skipped (the spec says to ignore it), with a warning
    extra = struct.pack("<II", 4, 0x12345678) + b"abcd"
    report = validate_glb(_header_length(VALID_GLB + extra, len(VALID_GLB) + len(extra)))
    assert report["triangles"] == 12
    assert any("unknown chunk" in w for w in report["warnings"])
    # a second BIN chunk is not allowed
    second_bin = struct.pack("<II", 4, 0x004E4942) + b"\x00" * 4
    with pytest.raises(OutputError, match="unexpected BIN chunk"):
        validate_glb(_header_length(VALID_GLB + second_bin, len(VALID_GLB) + 12))


def test_validate_glb_reads_data_uri_buffers():
    """A buffer embedded as a base64 data URI is read like the BIN chunk, so its indices are
    checked too."""
    doc, binary = unpack(VALID_GLB)
    doc["buffers"][0]["uri"] = "data:application/octet-stream;base64," + base64.b64encode(
        binary
    ).decode("ascii")
    report = validate_glb(pack(doc, b""))
    assert report["triangles"] == 12
    assert any("BIN chunk is not used" in w for w in report["warnings"])

    broken = bytearray(binary)
    _set_index(doc, broken, 999)
    doc["buffers"][0]["uri"] = "data:application/octet-stream;base64," + base64.b64encode(
        bytes(broken)
    ).decode("ascii")
    with pytest.raises(OutputError, match="out of range"):
        validate_glb(pack(doc, b""))
    doc["buffers"][0]["uri"] = "data:application/octet-stream;base64,@@@"
    with pytest.raises(OutputError, match="base64"):
        validate_glb(pack(doc, b""))
