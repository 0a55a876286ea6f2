"""`doctor`: checks everything the TRELLIS.2 engine needs and says how to fix each problem."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import platform
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import attention
from .engines import trellis2 as adapter
from .errors import BackendError

MIN_FREE_DISK = 2 << 30  # a few jobs' GLBs, textures and latents
MIN_PYTHON = (3, 10)
TRANSFORMERS_RANGE = ((4, 56), (5, 0))  # DINOv3 needs >= 4.56; 5.x breaks the extractor

# (import name, distribution names, required, hint)
PACKAGES: tuple[tuple[str, tuple[str, ...], bool, str], ...] = (
    ("torch", ("torch",), True, adapter.FIX_HINTS["torch"]),
    ("transformers", ("transformers",), True, adapter.FIX_HINTS["transformers"]),
    ("trellis2", ("trellis2",), True, adapter.FIX_HINTS["trellis2"]),
    ("o_voxel", ("o_voxel", "o-voxel"), True, adapter.FIX_HINTS["o_voxel"]),
    ("cumesh", ("cumesh",), True, adapter.FIX_HINTS["cumesh"]),
    ("flex_gemm", ("flex_gemm", "flex-gemm"), True, adapter.FIX_HINTS["flex_gemm"]),
    ("nvdiffrast", ("nvdiffrast",), True, adapter.FIX_HINTS["nvdiffrast"]),
    ("safetensors", ("safetensors",), True, adapter.FIX_HINTS["safetensors"]),
    ("flash_attn", ("flash_attn", "flash-attn"), False, "pip install flash-attn (Ampere+ GPUs)"),
    ("xformers", ("xformers",), False, "pip install xformers"),
    ("triton", ("triton", "triton-windows"), False, "pip install triton (FlexGEMM needs it)"),
    ("trimesh", ("trimesh",), True, adapter.FIX_HINTS["trimesh"]),
)


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
                adapter.FIX_HINTS["torch"],
            )
        ]
    adapter.configure_allocator()
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
            _check("attention", False, "needs torch", adapter.FIX_HINTS["torch"]),
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
        adapter.read_safetensors_header(tensors)
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
        args = adapter.read_pipeline_config(root)
    except BackendError as exc:
        return [_check("weights", False, exc.message, exc.hint)]
    problems = []
    total = 0
    for name in adapter.MODEL_NAMES:
        if name not in args["models"]:
            problems.append(f"{name} not listed in pipeline.json")
            continue
        entry, problem = _file_entry(adapter.resolve_model_path(root, args["models"][name]))
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
            f"{len(adapter.MODEL_NAMES)} models, {total / 2**30:.2f} GiB in {root}"
            if not problems
            else "; ".join(problems[:4]),
            "Download the missing or damaged files again (docs/TRELLIS2.md lists the layout).",
        )
    ]
    tex_stem = adapter.resolve_model_path(root, adapter.DEFAULT_SHAPE_ENCODER)
    if (root / "texturing_pipeline.json").is_file():
        try:
            tex_args = adapter.read_pipeline_config(root, "texturing_pipeline.json")
            rel = tex_args["models"].get("shape_slat_encoder", adapter.DEFAULT_SHAPE_ENCODER)
            tex_stem = adapter.resolve_model_path(root, rel)
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
    dino, rmbg = adapter.resolve_aux_paths(root, dinov3, rembg, args)
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


def _disk(report: dict[str, Any], output_dir: str | None) -> list[dict[str, Any]]:
    target = Path(output_dir or os.environ.get("TRELLIS2_OUTPUT_DIR") or os.getcwd()).expanduser()
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


def _resolve(call: adapter.UpstreamCall) -> Any:
    obj: Any = importlib.import_module(call.module)
    for part in call.qualname.split("."):
        obj = getattr(obj, part)
    return obj


def check_signature(call: adapter.UpstreamCall) -> dict[str, Any]:
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
                adapter.FIX_HINTS["trellis2"],
            )
        ]
    adapter.configure_allocator()
    if report.get("attention_backend") and "trellis2" not in sys.modules:
        # trellis2 reads its backend at import; import it the way the engine would.
        attention.apply(report["attention_backend"])
    # trellis2 prints its backend choice at import; keep stdout clean for --json.
    with contextlib.redirect_stdout(sys.stderr):
        entries = [check_signature(call) for call in adapter.UPSTREAM_CALLS]
    report["signatures"] = entries
    bad = [e for e in entries if not e["ok"]]
    if not bad:
        return [_check("signatures", True, f"{len(entries)} upstream calls match")]
    first = bad[0]
    hint = "Use the TRELLIS.2 revision the add-on supports (docs/TRELLIS2.md)."
    if first["detail"].startswith("cannot import"):
        module = first["detail"].split("'")[1] if "'" in first["detail"] else ""
        hint = adapter.FIX_HINTS.get(module.split(".")[0], hint)
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
) -> dict[str, Any]:
    """Everything the TRELLIS.2 engine needs, as JSON-able data; never raises."""
    env = os.environ.get
    weights_dir = weights_dir or env("TRELLIS2_WEIGHTS") or None
    dinov3_path = dinov3_path or env("TRELLIS2_DINOV3") or None
    rembg_path = rembg_path or env("TRELLIS2_REMBG") or None
    trellis_checkout = trellis_checkout or env("TRELLIS2_CHECKOUT") or None
    if trellis_checkout:
        checkout = str(Path(trellis_checkout).expanduser())
        if checkout not in sys.path:
            sys.path.insert(0, checkout)
    report: dict[str, Any] = {
        "ok": False,
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
    checks += _safe("packages", lambda: _packages(report))
    checks += _safe("gpu", lambda: _torch_and_gpu(report))
    checks += _safe("attention", lambda: _attention(report))
    checks += _safe("weights", lambda: _weights(report, weights_dir, dinov3_path, rembg_path))
    checks += _safe("disk", lambda: _disk(report, output_dir))
    checks += _safe("signatures", lambda: _signatures(report))
    report["checks"] = checks
    report["ok"] = all(c["ok"] for c in checks)
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = ["TRELLIS.2 backend doctor", ""]
    for check in report.get("checks", []):
        mark = " ok " if check["ok"] else "FAIL"
        lines.append(f"[{mark}] {check['name']}: {check['detail']}")
        if not check["ok"] and check.get("hint"):
            lines.append(f"       fix: {check['hint']}")
    bad_signatures = [s for s in report.get("signatures", []) if not s["ok"]]
    if bad_signatures:
        lines += ["", "Upstream calls that do not match:"]
        lines += [f"  {s['target']}: {s['detail']}" for s in bad_signatures[:10]]
    lines.append("")
    failed = sum(1 for c in report.get("checks", []) if not c["ok"])
    lines.append("All checks passed." if report.get("ok") else f"{failed} problem(s) found.")
    return "\n".join(lines)
