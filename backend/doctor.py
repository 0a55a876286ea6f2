"""`doctor`: checks everything the backend and the TRELLIS.2 engine need and says how to fix
each problem. For the preview engine the TRELLIS.2 items are reported as optional."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import platform
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import settings
from .engines import attention, upstream
from .engines import weights as layout
from .errors import BackendError
from .paths import output_dir_problem
from .pipeline import gpu as gpu_hygiene

MIN_FREE_DISK = settings.DOCTOR_FREE_DISK
MIN_PYTHON = (3, 10)
TRANSFORMERS_RANGE = ((4, 56), (5, 0))  # DINOv3 needs >= 4.56; 5.x breaks the extractor

# (import name, distribution names, required, hint)
PACKAGES: tuple[tuple[str, tuple[str, ...], bool, str], ...] = (
    ("torch", ("torch",), True, upstream.FIX_HINTS["torch"]),
    ("transformers", ("transformers",), True, upstream.FIX_HINTS["transformers"]),
    ("trellis2", ("trellis2",), True, upstream.FIX_HINTS["trellis2"]),
    ("o_voxel", ("o_voxel", "o-voxel"), True, upstream.FIX_HINTS["o_voxel"]),
    ("cumesh", ("cumesh",), True, upstream.FIX_HINTS["cumesh"]),
    ("flex_gemm", ("flex_gemm", "flex-gemm"), True, upstream.FIX_HINTS["flex_gemm"]),
    ("nvdiffrast", ("nvdiffrast",), True, upstream.FIX_HINTS["nvdiffrast"]),
    ("safetensors", ("safetensors",), True, upstream.FIX_HINTS["safetensors"]),
    ("flash_attn", ("flash_attn", "flash-attn"), False, "pip install flash-attn (Ampere+ GPUs)"),
    ("xformers", ("xformers",), False, "pip install xformers"),
    ("triton", ("triton", "triton-windows"), False, "pip install triton (FlexGEMM needs it)"),
    ("trimesh", ("trimesh",), True, upstream.FIX_HINTS["trimesh"]),
)


# What every backend process imports, whatever its engine: (import name, shown as, fix).
BACKEND_PACKAGES: tuple[tuple[str, str, str], ...] = (
    ("zmq", "pyzmq", "pip install pyzmq (the backend talks to Blender over ZeroMQ)"),
    ("PIL", "Pillow", "pip install Pillow"),
    ("numpy", "numpy", "pip install numpy"),
)

# Checks that only the TRELLIS.2 engine needs: optional when the preview engine runs.
TRELLIS2_CHECKS = frozenset(
    {m for m, _, _, _ in PACKAGES if m != "trimesh"}
    | {"gpu", "vram", "attention", "weights", "texturing weights", "dinov3"}
    | {"background removal", "signatures"}
)

# The add-on's preferences, for hints shown in Blender (the command line names its flags and
# environment variables instead).
BLENDER_HINTS = {
    "trellis2": "Set TRELLIS.2 Checkout in the add-on's preferences to your TRELLIS.2 clone.",
    "weights": "Set Weights Directory in the add-on's preferences to the folder with "
    "pipeline.json and ckpts/ (docs/TRELLIS2.md).",
    "dinov3": "Download a DINOv3 ViT-L/16 copy once into a folder named dinov3 inside the "
    "Weights Directory set in the add-on's preferences (docs/TRELLIS2.md).",
    "python": "Set Backend Python in the add-on's preferences to a Python 3.10 or newer.",
    "output folder": "Choose another Output Directory in the add-on's preferences.",
    "disk": "Free some disk space or choose another Output Directory in the add-on's preferences.",
}


# Any other hint that still names a command-line setting, in the preferences' words.
BLENDER_WORDS = (
    (re.compile(r"\s*\(or --engine-opt [^)]*\)"), ""),
    (re.compile(r"TRELLIS2_CHECKOUT"), "TRELLIS.2 Checkout (add-on preferences)"),
    (re.compile(r"TRELLIS2_WEIGHTS"), "Weights Directory (add-on preferences)"),
    (re.compile(r"TRELLIS2_(DINOV3|REMBG)"), "a folder inside the Weights Directory"),
)


def _blender_hint(name: str, hint: str) -> str:
    names_a_setting = "TRELLIS2_" in hint or "--" in hint
    if name in BLENDER_HINTS and (names_a_setting or name not in ("weights", "dinov3")):
        hint = BLENDER_HINTS[name]  # weights, dinov3: other hints (download...) stay as they are
    for pattern, words in BLENDER_WORDS:
        hint = pattern.sub(words, hint)
    return hint


def _check(name: str, ok: bool, detail: str, hint: str = "") -> dict[str, Any]:
    return {"name": name, "ok": bool(ok), "detail": detail, "hint": "" if ok else hint}


def _safe(name: str, fn: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """A check that crashes becomes a failed check: doctor itself never fails."""
    try:
        return fn()
    except Exception as exc:
        return [
            _check(
                name,
                False,
                f"doctor could not check this: {type(exc).__name__}: {exc}",
                "Report this with the output of `python -m backend doctor --json`.",
            )
        ]


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():
            break
    return tuple(parts)


def _find(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _dist_version(names: tuple[str, ...], module: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    loaded = sys.modules.get(module)
    return getattr(loaded, "__version__", None) if loaded else None


def _packages(report: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    versions = report["versions"]
    for module, dists, required, hint in PACKAGES:
        present = _find(module)
        version = _dist_version(dists, module) if present else None
        versions[module] = version if present else None
        if not present:
            detail = "not installed" + ("" if required else " (optional)")
            checks.append(_check(module, not required, detail, hint))
            continue
        detail = f"{version or 'installed (no version metadata)'}"
        ok = True
        if module == "transformers" and version:
            low, high = TRANSFORMERS_RANGE
            ok = low <= _version_tuple(version) < high
            if not ok:
                detail += " (TRELLIS.2 needs >= 4.56 for DINOv3 and < 5)"
        if module == "trellis2":
            spec = importlib.util.find_spec("trellis2")
            where = spec.submodule_search_locations or [spec.origin]
            detail = f"found at {list(where)[0]}"
        checks.append(_check(module, ok, detail, hint))
    return checks


def _torch_and_gpu(report: dict[str, Any]) -> list[dict[str, Any]]:
    if not _find("torch"):
        report["gpu"] = {"available": False}
        return [
            _check(
                "gpu",
                False,
                "torch is not installed, so no GPU can be used",
                upstream.FIX_HINTS["torch"],
            )
        ]
    gpu_hygiene.configure_allocator()
    import torch

    report["versions"]["torch_cuda"] = torch.version.cuda
    gpu: dict[str, Any] = {"available": bool(torch.cuda.is_available())}
    report["gpu"] = gpu
    if not gpu["available"]:
        hint = (
            "This torch build has no CUDA; install a CUDA build (setup.sh --new-env)."
            if torch.version.cuda is None
            else "No CUDA GPU is visible: check the NVIDIA driver and CUDA_VISIBLE_DEVICES."
        )
        return [_check("gpu", False, f"no CUDA GPU (torch {torch.__version__})", hint)]
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    gpu.update(
        name=props.name,
        compute_capability=list(torch.cuda.get_device_capability(0)),
        vram_total=int(total),
        vram_free=int(free),
    )
    detail = (
        f"{props.name}, sm_{props.major}{props.minor}, "
        f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free), CUDA {torch.version.cuda}"
    )
    checks = [_check("gpu", True, detail)]
    if total < 16 * 2**30:
        checks.append(_check("vram", True, "under 16 GiB: expect the ladder to lower quality"))
    return checks


def _attention(report: dict[str, Any]) -> list[dict[str, Any]]:
    report["attention_backend"] = None
    if not _find("torch"):
        return [
            _check("attention", False, "needs torch", upstream.FIX_HINTS["torch"]),
        ]
    chosen = attention.choose(attention.detect())
    problem = attention.usable(chosen)
    note = ""
    if problem is not None:
        note = f"{chosen} cannot be used ({problem}); "
        chosen = "sdpa"
    report["attention_backend"] = chosen
    if chosen == "sdpa":
        detail = (
            f"{note}sparse attention on torch SDPA (the built-in fallback; flash-attn or "
            "xformers is faster where installed); dense attention on SDPA"
        )
    else:
        detail = f"sparse attention on {chosen}; dense attention on SDPA"
    return [_check("attention", True, detail)]


def _file_entry(stem: Path) -> tuple[dict[str, Any], str | None]:
    entry: dict[str, Any] = {"path": str(stem)}
    for suffix in (".json", ".safetensors"):
        if not stem.with_suffix(suffix).is_file():
            return entry, f"{stem.with_suffix(suffix).name} missing"
    tensors = stem.with_suffix(".safetensors")
    entry["bytes"] = tensors.stat().st_size
    try:
        layout.read_safetensors_header(tensors)
    except (ValueError, OSError) as exc:
        return entry, str(exc)
    return entry, None


def _weights(
    report: dict[str, Any], weights_dir: str | None, dinov3: str | None, rembg: str | None
) -> list[dict[str, Any]]:
    info: dict[str, Any] = {"dir": weights_dir, "files": {}, "complete": False}
    report["weights"] = info
    if not weights_dir:
        return [
            _check(
                "weights",
                False,
                "no weights folder configured",
                "Set TRELLIS2_WEIGHTS (or --engine-opt weights_dir=...) to the folder "
                "with pipeline.json and ckpts/ (docs/TRELLIS2.md).",
            )
        ]
    root = Path(weights_dir).expanduser()
    try:
        args = layout.read_pipeline_config(root)
    except BackendError as exc:
        return [_check("weights", False, exc.message, exc.hint)]
    problems = []
    total = 0
    for name in layout.MODEL_NAMES:
        if name not in args["models"]:
            problems.append(f"{name} not listed in pipeline.json")
            continue
        entry, problem = _file_entry(layout.resolve_model_path(root, args["models"][name]))
        info["files"][name] = entry
        total += entry.get("bytes", 0)
        if problem:
            problems.append(f"{name}: {problem}")
    info["bytes"] = total
    info["complete"] = not problems
    checks = [
        _check(
            "weights",
            not problems,
            f"{len(layout.MODEL_NAMES)} models, {total / 2**30:.2f} GiB in {root}"
            if not problems
            else "; ".join(problems[:4]),
            "Download the missing or damaged files again (docs/TRELLIS2.md lists the layout).",
        )
    ]
    tex_stem = layout.resolve_model_path(root, layout.DEFAULT_SHAPE_ENCODER)
    if (root / "texturing_pipeline.json").is_file():
        try:
            tex_args = layout.read_pipeline_config(root, "texturing_pipeline.json")
            rel = tex_args["models"].get("shape_slat_encoder", layout.DEFAULT_SHAPE_ENCODER)
            tex_stem = layout.resolve_model_path(root, rel)
        except BackendError:
            pass
    entry, problem = _file_entry(tex_stem)
    info["files"]["shape_slat_encoder"] = entry
    checks.append(
        _check(
            "texturing weights",
            True,
            "present (texturing an existing mesh works)"
            if problem is None
            else f"not available ({problem}): texturing existing meshes is disabled",
        )
    )
    dino, rmbg = layout.resolve_aux_paths(root, dinov3, rembg, args)
    info["dinov3"], info["rembg"] = dino, rmbg
    dino_ok = bool(dino) and (Path(dino) / "config.json").is_file()
    checks.append(
        _check(
            "dinov3",
            dino_ok,
            f"local folder {dino}" if dino_ok else f"no local DINOv3 folder (configured: {dino})",
            "Download a DINOv3 ViT-L/16 copy once and set TRELLIS2_DINOV3 to its folder "
            "(an ungated mirror works; docs/TRELLIS2.md).",
        )
    )
    rembg_ok = bool(rmbg) and (Path(rmbg) / "config.json").is_file()
    checks.append(
        _check(
            "background removal",
            True,
            f"local folder {rmbg}"
            if rembg_ok
            else "no local BiRefNet/RMBG folder: only images with transparency can be used",
        )
    )
    return checks


def _backend_packages(report: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    for module, shown, hint in BACKEND_PACKAGES:
        present = _find(module)
        version = _dist_version((shown, module), module) if present else None
        report["versions"][module] = version
        detail = (version or "installed") if present else "not installed"
        checks.append(_check(shown, present, f"{detail} (the backend needs it)", hint))
    return checks


def _output_folder(output_dir: str | None) -> list[dict[str, Any]]:
    target = Path(output_dir or os.environ.get(settings.ENV_OUTPUT_DIR) or os.getcwd()).expanduser()
    problem = output_dir_problem(target.absolute())
    return [
        _check(
            "output folder",
            problem is None,
            f"{target} can hold job folders" if problem is None else problem,
            "Choose an output folder you can write to (--output-dir).",
        )
    ]


def _preview_engine() -> list[dict[str, Any]]:
    from .engines import create

    engine = create("preview")
    engine.load()
    return [_check("preview engine", True, f"{engine.label}: runs on the CPU, no weights needed")]


def _disk(report: dict[str, Any], output_dir: str | None) -> list[dict[str, Any]]:
    target = Path(output_dir or os.environ.get(settings.ENV_OUTPUT_DIR) or os.getcwd()).expanduser()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    report["disk"] = {"path": str(target), "free": int(free)}
    return [
        _check(
            "disk",
            free >= MIN_FREE_DISK,
            f"{free / 2**30:.1f} GiB free at {probe}",
            "Free some disk space or choose another output folder.",
        )
    ]


def _resolve(call: upstream.UpstreamCall) -> Any:
    obj: Any = importlib.import_module(call.module)
    for part in call.qualname.split("."):
        obj = getattr(obj, part)
    return obj


def check_signature(call: upstream.UpstreamCall) -> dict[str, Any]:
    """Whether the installed callable accepts the keyword arguments the adapter passes."""
    entry = {"target": call.target, "args": list(call.args), "ok": False, "detail": ""}
    try:
        target = _resolve(call)
    except Exception as exc:  # ImportError, AttributeError, or an extension failing to load
        entry["detail"] = f"cannot import: {type(exc).__name__}: {exc}"
        return entry
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError) as exc:
        entry["detail"] = f"no signature: {exc}"
        return entry
    positional = (None,) if call.method else ()
    try:
        signature.bind_partial(*positional, **dict.fromkeys(call.args))
    except TypeError as exc:
        entry["detail"] = f"signature {signature} rejects the adapter's arguments: {exc}"
        return entry
    entry["ok"] = True
    entry["detail"] = str(signature)
    return entry


def _signatures(report: dict[str, Any]) -> list[dict[str, Any]]:
    if not _find("trellis2"):
        report["signatures"] = []
        return [
            _check(
                "signatures",
                False,
                "not checked: trellis2 is not importable",
                upstream.FIX_HINTS["trellis2"],
            )
        ]
    gpu_hygiene.configure_allocator()
    if report.get("attention_backend") and "trellis2" not in sys.modules:
        # trellis2 reads its backend at import; import it the way the engine would.
        attention.apply(report["attention_backend"])
    # trellis2 prints its backend choice at import; keep stdout clean for --json.
    with contextlib.redirect_stdout(sys.stderr):
        entries = [check_signature(call) for call in upstream.UPSTREAM_CALLS]
    report["signatures"] = entries
    bad = [e for e in entries if not e["ok"]]
    if not bad:
        return [_check("signatures", True, f"{len(entries)} upstream calls match")]
    first = bad[0]
    hint = "Use the TRELLIS.2 revision the add-on supports (docs/TRELLIS2.md)."
    if first["detail"].startswith("cannot import"):
        module = first["detail"].split("'")[1] if "'" in first["detail"] else ""
        hint = upstream.FIX_HINTS.get(module.split(".")[0], hint)
    return [
        _check(
            "signatures",
            False,
            f"{len(bad)} of {len(entries)} do not match, e.g. {first['target']}: {first['detail']}",
            hint,
        )
    ]


def run_doctor(
    weights_dir: str | None = None,
    dinov3_path: str | None = None,
    rembg_path: str | None = None,
    trellis_checkout: str | None = None,
    output_dir: str | None = None,
    engine: str | None = None,
    for_blender: bool = False,
) -> dict[str, Any]:
    """Everything the backend and the TRELLIS.2 engine need, as JSON-able data; never raises.
    With `engine="preview"` the preview engine is checked and the TRELLIS.2 items become
    optional (they do not decide `ok`); `for_blender` words the hints for the add-on's
    preferences."""
    env = os.environ.get
    weights_dir = weights_dir or env(settings.ENV_WEIGHTS) or None
    dinov3_path = dinov3_path or env(settings.ENV_DINOV3) or None
    rembg_path = rembg_path or env(settings.ENV_REMBG) or None
    trellis_checkout = trellis_checkout or env(settings.ENV_CHECKOUT) or None
    if trellis_checkout:
        checkout = str(Path(trellis_checkout).expanduser())
        if checkout not in sys.path:
            sys.path.insert(0, checkout)
    report: dict[str, Any] = {
        "ok": False,
        "engine": engine,
        "checks": [],
        "versions": {"python": platform.python_version()},
        "gpu": {},
        "attention_backend": None,
        "weights": {},
        "signatures": [],
    }
    python_ok = sys.version_info[:2] >= MIN_PYTHON
    checks = [
        _check(
            "python",
            python_ok,
            f"{platform.python_version()} ({sys.executable})",
            "Use Python 3.10 or newer for the backend.",
        )
    ]
    checks += _safe("backend packages", lambda: _backend_packages(report))
    if engine == "preview":
        checks += _safe("preview engine", _preview_engine)
    checks += _safe("output folder", lambda: _output_folder(output_dir))
    checks += _safe("packages", lambda: _packages(report))
    checks += _safe("gpu", lambda: _torch_and_gpu(report))
    checks += _safe("attention", lambda: _attention(report))
    checks += _safe("weights", lambda: _weights(report, weights_dir, dinov3_path, rembg_path))
    checks += _safe("disk", lambda: _disk(report, output_dir))
    checks += _safe("signatures", lambda: _signatures(report))
    for check in checks:
        check["optional"] = engine == "preview" and check["name"] in TRELLIS2_CHECKS
        if for_blender and check["hint"]:
            check["hint"] = _blender_hint(check["name"], check["hint"])
    report["checks"] = checks
    report["ok"] = all(c["ok"] or c["optional"] for c in checks)
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = ["TRELLIS.2 backend doctor", ""]
    for check in report.get("checks", []):
        mark = " ok " if check["ok"] else "opt " if check.get("optional") else "FAIL"
        lines.append(f"[{mark}] {check['name']}: {check['detail']}")
        if not check["ok"] and check.get("hint"):
            lines.append(f"       fix: {check['hint']}")
    bad_signatures = [s for s in report.get("signatures", []) if not s["ok"]]
    if bad_signatures:
        lines += ["", "Upstream calls that do not match:"]
        lines += [f"  {s['target']}: {s['detail']}" for s in bad_signatures[:10]]
    lines.append("")
    failed = sum(1 for c in report.get("checks", []) if not (c["ok"] or c.get("optional")))
    optional = sum(1 for c in report.get("checks", []) if not c["ok"] and c.get("optional"))
    if not report.get("ok"):
        lines.append(f"{failed} problem(s) found.")
    elif optional:
        lines.append(f"Ready. {optional} TRELLIS.2 item(s) missing: needed only for TRELLIS.2.")
    else:
        lines.append("All checks passed.")
    return "\n".join(lines)
